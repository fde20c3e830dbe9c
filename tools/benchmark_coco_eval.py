#!/usr/bin/env python
"""Time the two COCO evaluation backends on one large synthetic set and check they agree.

    python tools/benchmark_coco_eval.py                      # 5000 images x 100 detections
    python tools/benchmark_coco_eval.py --images 500 --iou-type segm

The ground truth and detections come from detector.evaluation.make_synthetic_coco (deterministic
for a given --seed) and are written to json files once; every backend then loads those files,
evaluates, accumulates and summarizes with default COCOeval parameters. Exit code 1 when the
backends' 12 summary numbers differ by more than --tolerance.
"""
import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time

from detector.evaluation import (
    STAT_NAMES,
    VALID_BACKENDS,
    build_coco_api,
    check_coco_gt,
    check_coco_results,
    load_coco_results,
    make_synthetic_coco,
    run_coco_eval,
)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="number of images")
    parser.add_argument("--dets-per-image", type=int, default=100, help="detections per image")
    parser.add_argument("--gt-per-image", type=float, default=7.0,
                        help="mean ground-truth objects per image (Poisson)")
    parser.add_argument("--categories", type=int, default=80, help="number of categories")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--iou-type", default="bbox", choices=["bbox", "segm"])
    parser.add_argument("--backends", nargs="+", default=list(VALID_BACKENDS),
                        choices=list(VALID_BACKENDS), help="backends to run, in this order")
    parser.add_argument("--tolerance", type=float, default=1e-12,
                        help="largest allowed difference between the backends' stats")
    parser.add_argument("--workdir", default="",
                        help="keep the generated json files here (default: a temporary folder)")
    return parser


def time_backend(backend, gt_path, results_path, iou_type):
    """Load both files, evaluate, accumulate, summarize; returns (CocoEvalRun, timings)."""
    tic = time.perf_counter()
    with open(gt_path) as f:
        coco_gt = build_coco_api(json.load(f), backend)
    with open(results_path) as f:
        coco_dt = load_coco_results(coco_gt, json.load(f), backend)
    load = time.perf_counter() - tic
    run = run_coco_eval(coco_gt, coco_dt, iou_type, backend)
    timings = {"load": load, **run.timings}
    timings["total"] = sum(timings.values())
    return run, timings


def main(argv=None):
    args = build_parser().parse_args(argv)
    tic = time.perf_counter()
    gt, results = make_synthetic_coco(args.images, args.dets_per_image, args.gt_per_image,
                                      args.categories, args.seed,
                                      with_masks=args.iou_type == "segm")
    print(f"Synthetic set (seed {args.seed}): {len(gt['images'])} images, "
          f"{len(gt['annotations'])} ground-truth objects, {len(gt['categories'])} categories, "
          f"{len(results)} detections; generated in {time.perf_counter() - tic:.1f}s")
    tic = time.perf_counter()
    check_coco_results(results, check_coco_gt(gt, "synthetic gt", args.iou_type), args.iou_type,
                       "synthetic results")
    print(f"Input checks: {time.perf_counter() - tic:.1f}s")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        gt_path = os.path.join(workdir, "synthetic_gt.json")
        results_path = os.path.join(workdir, "synthetic_results.json")
        with open(gt_path, "w") as f:
            json.dump(gt, f)
        with open(results_path, "w") as f:
            json.dump(results, f)
        del gt, results
        gc.collect()

        runs, timings = {}, {}
        for backend in args.backends:
            print(f"Running {backend} ({args.iou_type}) ...", flush=True)
            runs[backend], timings[backend] = time_backend(backend, gt_path, results_path,
                                                           args.iou_type)
            gc.collect()

    steps = ("load", "evaluate", "accumulate", "summarize", "total")
    print()
    print(f"{'backend':<18}" + "".join(f"{s + ' [s]':>15}" for s in steps))
    for backend in args.backends:
        print(f"{backend:<18}" + "".join(f"{timings[backend][s]:>15.2f}" for s in steps))
    if "faster_coco_eval" in timings:
        print("(faster_coco_eval matches and accumulates in one C++ pass inside evaluate())")
    first = args.backends[0]
    print()
    print(f"COCOeval summary ({first}):")
    print("\n".join(runs[first].summary_lines))
    if len(args.backends) < 2:
        return 0

    base, other = args.backends[0], args.backends[1]
    print()
    def matching_time(backend):
        return timings[backend]["evaluate"] + timings[backend]["accumulate"]

    print(f"Speed-up of {other} over {base}: total "
          f"{timings[base]['total'] / timings[other]['total']:.1f}x, evaluate+accumulate "
          f"{matching_time(base) / matching_time(other):.1f}x")
    print(f"{'stat':<7}{base:>22}{other:>22}{'|difference|':>15}")
    worst = 0.0
    for name, a, b in zip(STAT_NAMES, runs[base].stats, runs[other].stats):
        diff = abs(a - b)
        worst = max(worst, diff)
        print(f"{name:<7}{a:>22.17f}{b:>22.17f}{diff:>15.3g}")
    per_cat = 0.0
    for cat_id, a in runs[base].per_category_ap.items():
        b = runs[other].per_category_ap[cat_id]
        if math.isnan(a) != math.isnan(b):
            per_cat = math.inf  # one backend has AP for a category the other calls undefined
        elif not math.isnan(a):
            per_cat = max(per_cat, abs(a - b))
    bitwise = runs[base].stats == runs[other].stats
    print(f"Largest difference: {worst:.3g} in the 12 stats, {per_cat:.3g} in per-category AP "
          f"({'bitwise identical' if bitwise else 'floating-point rounding only'}; "
          f"tolerance {args.tolerance:g})")
    if worst > args.tolerance or per_cat > args.tolerance:
        print("FAIL: the backends disagree")
        return 1
    print("OK: both backends give the same 12 stats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
