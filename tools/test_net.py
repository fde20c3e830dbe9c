#!/usr/bin/env python
"""Evaluate a trained model, or an existing COCO results file.

Model evaluation (same flags as train_net.py):
    python tools/test_net.py --config-file cfg.yaml MODEL.WEIGHTS output/model_final.pth

Results-file evaluation (prints pycocotools' 12-line summary):
    python tools/test_net.py --results-json results.json --gt-json instances_val2014.json \
        --iou-type bbox --backend faster_coco_eval
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detector.engine import default_argument_parser  # noqa: E402
from detector.engine.defaults import launch_from_args  # noqa: E402


def build_parser():
    parser = default_argument_parser("detector evaluation")
    parser.add_argument("--results-json", default="", help="existing COCO results file to evaluate")
    parser.add_argument("--gt-json", default="", help="COCO ground-truth json for --results-json")
    parser.add_argument("--iou-type", default="bbox", choices=["bbox", "segm"])
    parser.add_argument("--backend", default="pycocotools",
                        choices=["pycocotools", "faster_coco_eval"])
    parser.add_argument("--stats-json", default="",
                        help="also write the 12 summary numbers to this json file")
    return parser


def evaluate_results_file(args):
    from detector.evaluation import evaluate_coco_json

    if not args.gt_json:
        raise SystemExit("--results-json needs --gt-json")
    stats, _ = evaluate_coco_json(args.gt_json, args.results_json, iou_type=args.iou_type,
                                  backend=args.backend)
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump({args.iou_type: list(stats)}, f)
    return stats


def main(args):
    from train_net import main as train_main

    args.eval_only = True
    return train_main(args)


def cli(argv=None):
    args = build_parser().parse_args(argv)
    if args.results_json:
        return evaluate_results_file(args)
    args.eval_only = True
    return launch_from_args(main, args, prog="test_net.py")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    cli()
