"""The command line shared by the tools: argument parser, config set-up, run set-up and the
checked entry point that launches the processes."""
import argparse
import logging
import os
import sys
from typing import List

import torch

from detector.config import get_cfg
from detector.data.build import per_process_batch_size
from detector.evaluation import check_backend
from detector.utils import comm
from detector.utils.env import collect_env_info, seed_all_rng
from detector.utils.logger import setup_logger

from .launch import LaunchError, check_launch_arguments, launch, launched_by_torchrun
from .scaling import scale_for_world_size

__all__ = ["default_argument_parser", "setup_cfg", "default_setup", "launch_from_args",
           "expected_world_size", "CommandLineParser"]


def _looks_like_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


class CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose trailing ``opts`` (KEY VALUE config overrides) may be followed or
    interleaved by flags: ``... OUTPUT_DIR out --resume`` means ``--resume ... OUTPUT_DIR out``.

    A token is taken as a flag only where a KEY is expected (even positions of the overrides),
    so override values such as ``-1`` are never mistaken for flags; an unknown ``--flag`` in a
    KEY position is an error, not a config key.
    """

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        opts = getattr(namespace, "opts", None)
        if not opts:
            return namespace, extras
        flags, overrides = self._split_flags(list(opts))
        if flags:
            namespace, more_extras = super().parse_known_args(flags, namespace)
            extras = list(extras) + list(more_extras)
        namespace.opts = overrides
        return namespace, extras

    def _split_flags(self, tokens: List[str]):
        flags: List[str] = []
        overrides: List[str] = []
        i = 0
        while i < len(tokens):
            token = tokens[i]
            at_key_position = len(overrides) % 2 == 0
            if at_key_position and token.startswith("-") and not _looks_like_number(token):
                name = token.split("=", 1)[0]
                action = self._option_string_actions.get(name)
                if action is None:
                    self.error(f"unrecognized argument {token} among the KEY VALUE overrides")
                num_values = 0 if "=" in token else _values_taken(action)
                flags.extend(tokens[i:i + 1 + num_values])
                i += 1 + num_values
                continue
            overrides.append(token)
            i += 1
        return flags, overrides


def _values_taken(action: argparse.Action) -> int:
    """Tokens that follow the flag: none for store_true/--help, else its count (one when it
    varies: the tools have no such flags)."""
    return action.nargs if isinstance(action.nargs, int) else 1


def default_argument_parser(description: str = "detector training and evaluation"):
    """detectron2's command line: --config-file, --resume, --eval-only, --num-gpus,
    --num-machines, --machine-rank, --dist-url and KEY VALUE overrides. Flags may come before,
    between or after the overrides."""
    parser = CommandLineParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags may also follow the KEY VALUE overrides.\n"
        "Multi-node: torchrun --nnodes=2 --nproc_per_node=G --rdzv-backend=c10d "
        "--rdzv-endpoint=HOST:PORT tools/train_net.py --config-file cfg.yaml",
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in OUTPUT_DIR if there is one")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate MODEL.WEIGHTS")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="processes to launch on this machine (one per GPU; CPU uses gloo)")
    parser.add_argument("--num-machines", type=int, default=1, help="total machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="rank of this machine")
    parser.add_argument("--dist-url", default="auto",
                        help="rendezvous URL for --num-gpus/--num-machines launches")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. SOLVER.BASE_LR 0.01")
    return parser


def setup_cfg(args):
    """Defaults, then the config file, then the command-line overrides; frozen."""
    cfg = get_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts or [])
    cfg.freeze()
    return cfg


def default_setup(cfg, args):
    """Create OUTPUT_DIR, set up logging, log the environment and config, seed every RNG."""
    rank = comm.get_rank()
    output_dir = cfg.OUTPUT_DIR
    if comm.is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
    setup_logger(output_dir, distributed_rank=rank, name="detector")
    logger = logging.getLogger("detector")
    logger.info("Rank %d of world size %d", rank, comm.get_world_size())
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restarts > 0:
        # torchrun restarted the workers after one failed (or the nodes changed): with --resume
        # the run continues from the newest checkpoint
        logger.warning("torchrun restart %d of at most %s (TORCHELASTIC_RESTART_COUNT), world "
                       "size now %d", restarts, os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"),
                       comm.get_world_size())
    logger.info("Environment:\n%s", collect_env_info())
    logger.info("Command line: %s", " ".join(sys.argv))
    if comm.is_main_process() and output_dir:
        path = os.path.join(output_dir, "config.yaml")
        with open(path + ".tmp", "w") as f:
            f.write(cfg.dump())
        os.replace(path + ".tmp", path)
        logger.info("Full config saved to %s", path)
    # a distinct seed per rank keeps augmentation independent across processes
    seed = cfg.SEED if cfg.SEED < 0 else cfg.SEED + rank
    seed_all_rng(seed)
    if cfg.CUDNN_BENCHMARK and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def expected_world_size(args) -> int:
    """Processes the run will have, known before they start: torchrun's WORLD_SIZE, else
    --num-gpus x --num-machines."""
    if launched_by_torchrun():
        return int(os.environ["WORLD_SIZE"])
    return max(1, args.num_gpus) * max(1, args.num_machines)


def launch_from_args(main_func, args, prog: str):
    """Entry of the command-line tools: checks what can be checked before any process starts
    (the config and overrides, the launch flags, TEST.COCO_EVAL_BACKEND, SOLVER.IMS_PER_BATCH
    against the world size after SOLVER.REFERENCE_WORLD_SIZE scaling unless --eval-only), then
    runs ``main_func(args)`` through :func:`launch` with the collective timeout
    DIST.TIMEOUT_MINUTES. Bad input and failed processes end in ``SystemExit`` with one line
    "<prog>: error: ..."."""
    try:
        cfg = setup_cfg(args)
        launch_kwargs = dict(num_machines=args.num_machines, machine_rank=args.machine_rank,
                             dist_url=args.dist_url, timeout_minutes=cfg.DIST.TIMEOUT_MINUTES)
        check_launch_arguments(args.num_gpus, **launch_kwargs)
        if len(cfg.DATASETS.TEST) > 0:
            check_backend(cfg.TEST.COCO_EVAL_BACKEND)  # not only after hours of training
        if not getattr(args, "eval_only", False):
            world_size = expected_world_size(args)
            scaled = scale_for_world_size(cfg, world_size, log=False)
            per_process_batch_size(scaled.SOLVER.IMS_PER_BATCH, world_size)
    except ValueError as err:
        raise SystemExit(f"{prog}: error: {err}") from None
    try:
        return launch(main_func, args.num_gpus, args=(args,), report_errors=True,
                      **launch_kwargs)
    except LaunchError as err:
        raise SystemExit(f"{prog}: error: {err}") from None

