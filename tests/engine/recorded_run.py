"""A training run that records the losses of every iteration, run as a script by the resume and
elastic-restart tests (through ``--num-gpus`` or ``torchrun``).

    python tests/engine/recorded_run.py --losses FILE --data-root DIR [--kill-after-iter N]
        [--kill-once-marker FILE] <train_net.py arguments>

The training set is two synthetic shapes splits, one landscape and one portrait, so that
aspect-ratio grouping has two buckets. Rank 0 appends one JSON line per iteration (iteration,
world size, data-stream position, losses averaged over ranks) to ``--losses``. With
``--kill-after-iter N`` rank 0 kills its process group with SIGKILL after iteration N (under
``--num-gpus`` all ranks and data workers; under torchrun, which starts every worker in its own
session, that worker); ``--kill-node`` kills its torchrun agent too (the loss of a machine).
With ``--kill-once-marker`` any process given the option may kill, but only the first to
create the marker file does, so a restarted run goes on.
"""
import argparse
import functools
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from detector.data import DatasetCatalog, register_coco_instances  # noqa: E402
from detector.data.datasets.synthetic import SHAPES_CLASSES, generate_shapes_dataset  # noqa: E402
from detector.engine import (  # noqa: E402
    DefaultTrainer,
    default_argument_parser,
    default_setup,
    launch_from_args,
    scale_for_world_size,
    setup_cfg,
)
from detector.engine.hooks import CallbackHook  # noqa: E402
from detector.utils import comm  # noqa: E402

# (name, (height, width), number of images)
MIXED_SPLITS = (("mixed_landscape", (112, 160), 10), ("mixed_portrait", (160, 112), 9))


def make_mixed_shapes(data_root: str) -> None:
    """Write the two splits under ``data_root`` (once; call before starting the ranks)."""
    for seed, (name, size, count) in enumerate(MIXED_SPLITS):
        folder = os.path.join(data_root, name)
        if not os.path.isfile(os.path.join(folder, "instances.json")):
            generate_shapes_dataset(folder, count, seed=100 + seed, image_size=size)


def register_mixed_shapes(data_root: str) -> None:
    for name, _, _ in MIXED_SPLITS:
        if name not in DatasetCatalog:
            folder = os.path.join(data_root, name)
            register_coco_instances(name, {"thing_classes": list(SHAPES_CLASSES)},
                                    os.path.join(folder, "instances.json"),
                                    os.path.join(folder, "images"))


def recorded_main(args, *, losses_path, data_root, kill_after_iter, kill_once_marker,
                  kill_node):
    """tools/train_net.py's main function plus the recording hook."""
    register_mixed_shapes(data_root)
    cfg = setup_cfg(args)
    default_setup(cfg, args)
    cfg = scale_for_world_size(cfg, comm.get_world_size())
    trainer = DefaultTrainer(cfg)

    def record(t):
        if comm.is_main_process():
            history = t.storage.history
            keys = sorted(k for k in t.storage.histories()
                          if k.startswith("loss") or k == "total_loss")
            line = {"iter": t.iter, "world_size": comm.get_world_size(),
                    "position": t.data_loader.state_dict()["position"],
                    "losses": {k: history(k).latest() for k in keys}}
            with open(losses_path, "a") as f:
                f.write(json.dumps(line) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if kill_after_iter is not None and t.iter == kill_after_iter and (
                kill_once_marker or comm.is_main_process()):
            if kill_once_marker:
                try:  # atomic: of several processes with the option, one kills
                    os.close(os.open(kill_once_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return
            if kill_node:
                os.kill(os.getppid(), signal.SIGKILL)  # torchrun's agent: the node is gone
            os.killpg(os.getpgrp(), signal.SIGKILL)

    trainer.register_hooks([CallbackHook(after_step=record)])
    trainer.resume_or_load(resume=args.resume)
    trainer.train()


def main(argv=None):
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--losses", required=True)
    own.add_argument("--data-root", required=True)
    own.add_argument("--kill-after-iter", type=int, default=None)
    own.add_argument("--kill-once-marker", default="")
    own.add_argument("--kill-node", action="store_true")
    known, rest = own.parse_known_args(argv)
    args = default_argument_parser().parse_args(rest)
    make_mixed_shapes(known.data_root)
    run = functools.partial(recorded_main, losses_path=known.losses, data_root=known.data_root,
                            kill_after_iter=known.kill_after_iter,
                            kill_once_marker=known.kill_once_marker,
                            kill_node=known.kill_node)
    launch_from_args(run, args, prog="recorded_run.py")


if __name__ == "__main__":
    main()
