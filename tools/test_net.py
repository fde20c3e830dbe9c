#!/usr/bin/env python
"""Evaluate a trained model, or an existing COCO results file.

Model evaluation (same flags as train_net.py; flags may also follow the KEY VALUE overrides):
    python tools/test_net.py --config-file cfg.yaml MODEL.WEIGHTS output/model_final.pth

Results-file evaluation (prints pycocotools' 12-line summary):
    python tools/test_net.py --results-json results.json --gt-json instances_val2014.json \
        --iou-type bbox --backend faster-coco-eval

Bad input (a model whose number of classes differs from the dataset's, a malformed or mismatched
results file) ends with one line "test_net.py: error: ..." and exit status 1.
"""
import json

from detector.engine import (
    DefaultTrainer,
    default_argument_parser,
    default_setup,
    launch_from_args,
    setup_cfg,
)

PROG = "test_net.py"


def build_parser():
    parser = default_argument_parser("detector evaluation")
    parser.add_argument("--results-json", default="", help="existing COCO results file to evaluate")
    parser.add_argument("--gt-json", default="", help="COCO ground-truth json for --results-json")
    parser.add_argument("--iou-type", default="bbox", choices=["bbox", "segm"])
    parser.add_argument("--backend", default="faster_coco_eval",
                        choices=["pycocotools", "faster_coco_eval", "faster-coco-eval"])
    parser.add_argument("--stats-json", default="",
                        help="also write the 12 summary numbers to this json file")
    return parser


def evaluate_results_file(args):
    """Evaluate ``--results-json`` against ``--gt-json``; bad files end in one error line."""
    from detector.evaluation import evaluate_coco_json

    if not args.gt_json:
        raise SystemExit(f"{PROG}: error: --results-json needs --gt-json")
    try:
        stats, _ = evaluate_coco_json(args.gt_json, args.results_json, iou_type=args.iou_type,
                                      backend=args.backend)
        if args.stats_json:
            with open(args.stats_json, "w") as f:
                json.dump({args.iou_type: list(stats)}, f)
    except (ValueError, OSError) as err:
        message = " ".join(str(err).split())
        raise SystemExit(f"{PROG}: error: {message}") from None
    return stats


def main(args):
    cfg = setup_cfg(args)
    default_setup(cfg, args)
    model = DefaultTrainer.build_model(cfg)
    DefaultTrainer.load_for_evaluation(cfg, model, resume=args.resume)
    return DefaultTrainer.test(cfg, model)


def cli(argv=None):
    args = build_parser().parse_args(argv)
    if args.results_json:
        return evaluate_results_file(args)
    args.eval_only = True
    return launch_from_args(main, args, prog=PROG)


if __name__ == "__main__":
    cli()
