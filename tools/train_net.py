#!/usr/bin/env python
"""Train (or, with --eval-only, evaluate) a detector from a config file.

    python tools/train_net.py --config-file configs/demo/retinanet_tiny_shapes.yaml
    python tools/train_net.py --config-file cfg.yaml --resume
    python tools/train_net.py --config-file cfg.yaml --eval-only MODEL.WEIGHTS model_final.pth
    python tools/train_net.py --config-file cfg.yaml --num-gpus 2
    torchrun --nproc_per_node=2 tools/train_net.py --config-file cfg.yaml
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detector.checkpoint import DetectionCheckpointer  # noqa: E402
from detector.engine import DefaultTrainer, default_argument_parser, default_setup, launch  # noqa: E402
from detector.engine.defaults import setup_cfg  # noqa: E402
from detector.utils import comm  # noqa: E402


def main(args):
    cfg = setup_cfg(args)
    default_setup(cfg, args)
    if args.eval_only:
        model = DefaultTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return DefaultTrainer.test(cfg, model)
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    if comm.is_main_process():
        logging.getLogger("detector").info("Training finished; output in %s", cfg.OUTPUT_DIR)
    return results


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
