"""The linear scaling rule for a run on another number of processes than its config was written
for (SOLVER.REFERENCE_WORLD_SIZE, as in detectron2): the images per process stay the same, so the
total batch and learning rate grow with the world size and the schedule shrinks with it."""
import logging

__all__ = ["scale_for_world_size"]


def _scaled_iterations(iterations: int, reference: int, world_size: int) -> int:
    """``iterations * reference / world_size`` rounded half up, in integers (no float error)."""
    return (2 * int(iterations) * reference + world_size) // (2 * world_size)


def _scaled_period(period: int, reference: int, world_size: int) -> int:
    """A period of 0 (disabled / only at the end) stays 0; a positive one stays at least 1."""
    if period <= 0:
        return period
    return max(1, _scaled_iterations(period, reference, world_size))


def scale_for_world_size(cfg, world_size: int, *, log: bool = True):
    """A copy of ``cfg`` for ``world_size`` processes when SOLVER.REFERENCE_WORLD_SIZE (the world
    size the config was written for) is set and differs; ``cfg`` itself otherwise.

    With ``scale = world_size / REFERENCE_WORLD_SIZE``: SOLVER.IMS_PER_BATCH and SOLVER.BASE_LR are
    multiplied by ``scale``; SOLVER.MAX_ITER, WARMUP_ITERS, STEPS, CHECKPOINT_PERIOD and
    TEST.EVAL_PERIOD are divided by it (rounded); REFERENCE_WORLD_SIZE becomes ``world_size``, so
    applying it twice changes nothing. The copy is frozen if ``cfg`` was. With ``log`` the changes
    are logged in one line. A one-line ValueError when IMS_PER_BATCH is not a multiple of
    REFERENCE_WORLD_SIZE (the images per process would not be a whole number).
    """
    reference = int(cfg.SOLVER.REFERENCE_WORLD_SIZE)
    world_size = int(world_size)
    if reference < 0:
        raise ValueError(f"SOLVER.REFERENCE_WORLD_SIZE must be >= 0 (0 = no scaling), "
                         f"got {reference}")
    if world_size < 1:
        raise ValueError(f"The world size must be positive, got {world_size}")
    if reference == 0 or reference == world_size:
        return cfg
    solver = cfg.SOLVER
    batch = int(solver.IMS_PER_BATCH)
    if batch <= 0 or batch % reference != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={batch} is not a positive multiple of "
            f"SOLVER.REFERENCE_WORLD_SIZE={reference}: scaled to world size {world_size} it would "
            f"be {batch * world_size / reference:g} images ({batch / reference:g} per process); "
            f"fix IMS_PER_BATCH, or set REFERENCE_WORLD_SIZE 0 to train the config as written")

    def iters(value):
        return _scaled_iterations(value, reference, world_size)

    def period(value):
        return _scaled_period(value, reference, world_size)

    old = {
        "IMS_PER_BATCH": batch, "BASE_LR": solver.BASE_LR, "MAX_ITER": solver.MAX_ITER,
        "WARMUP_ITERS": solver.WARMUP_ITERS, "STEPS": tuple(solver.STEPS),
        "CHECKPOINT_PERIOD": solver.CHECKPOINT_PERIOD, "TEST.EVAL_PERIOD": cfg.TEST.EVAL_PERIOD,
    }
    new = {
        "IMS_PER_BATCH": batch // reference * world_size,
        "BASE_LR": solver.BASE_LR * world_size / reference,
        "MAX_ITER": max(1, iters(solver.MAX_ITER)),
        "WARMUP_ITERS": iters(solver.WARMUP_ITERS),
        "STEPS": tuple(iters(step) for step in solver.STEPS),
        "CHECKPOINT_PERIOD": period(solver.CHECKPOINT_PERIOD),
        "TEST.EVAL_PERIOD": period(cfg.TEST.EVAL_PERIOD),
    }
    frozen = cfg.is_frozen()
    cfg = cfg.clone()
    cfg.defrost()
    for key, value in new.items():
        section, name = key.split(".") if "." in key else ("SOLVER", key)
        setattr(cfg[section], name, value)
    cfg.SOLVER.REFERENCE_WORLD_SIZE = world_size
    if frozen:
        cfg.freeze()
    if log:
        changes = ", ".join(f"{key} {_fmt(old[key])} -> {_fmt(new[key])}" for key in new)
        logging.getLogger("detector").info(
            "Scaled SOLVER from REFERENCE_WORLD_SIZE %d to world size %d (linear rule, x%s): %s",
            reference, world_size, _fmt(world_size / reference), changes)
    return cfg


def _fmt(value):
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(str(v) for v in value) + ")"
    return str(value)
