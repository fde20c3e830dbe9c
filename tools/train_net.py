#!/usr/bin/env python
"""Train (or, with --eval-only, evaluate) a detector from a config file.

    python tools/train_net.py --config-file configs/demo/retinanet_tiny_shapes.yaml
    python tools/train_net.py --config-file cfg.yaml --resume
    python tools/train_net.py --config-file cfg.yaml --eval-only MODEL.WEIGHTS model_final.pth
    python tools/train_net.py --config-file cfg.yaml OUTPUT_DIR out --resume   # flags anywhere
    python tools/train_net.py --config-file cfg.yaml --num-gpus 2
    torchrun --nproc_per_node=2 tools/train_net.py --config-file cfg.yaml
    # two machines (run on each; c10d assigns the node ranks):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \
        --rdzv-id=job1 tools/train_net.py --config-file cfg.yaml

A failed process stops the whole run: its traceback is printed once and the command exits with
status 1 and a one-line "error: rank R of W failed ..." message. DIST.TIMEOUT_MINUTES bounds how
long the others wait for a peer that died on another machine.
"""
import logging

from detector.engine import (
    DefaultTrainer,
    default_argument_parser,
    default_setup,
    launch_from_args,
    scale_for_world_size,
    setup_cfg,
)
from detector.utils import comm


def main(args):
    cfg = setup_cfg(args)
    default_setup(cfg, args)
    if args.eval_only:
        model = DefaultTrainer.build_model(cfg)
        DefaultTrainer.load_for_evaluation(cfg, model, resume=args.resume)
        return DefaultTrainer.test(cfg, model)
    # the same in every process: the data loader and solver are built from the scaled values
    cfg = scale_for_world_size(cfg, comm.get_world_size())
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    if comm.is_main_process():
        logging.getLogger("detector").info("Training finished; output in %s", cfg.OUTPUT_DIR)
    return results


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
    # reads and checks the config before any process starts (DIST.TIMEOUT_MINUTES, batch split
    # after SOLVER.REFERENCE_WORLD_SIZE scaling)
    return launch_from_args(main, args, prog="train_net.py")


if __name__ == "__main__":
    cli()
