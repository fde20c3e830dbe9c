#!/usr/bin/env python
"""Time COCO evaluation on one large synthetic set and check that every path agrees.

    python tools/benchmark_coco_eval.py                      # 5000 images x 100 detections
    python tools/benchmark_coco_eval.py --images 500 --iou-type segm
    python tools/benchmark_coco_eval.py --mode backends      # the two backends on json files

The ground truth and detections come from detector.evaluation.make_synthetic_coco (deterministic
for a given --seed).

--mode evaluator (default) times, end to end, (a) pycocotools the way a cocoapi user runs it:
COCO(gt file), loadRes(results file), evaluate, accumulate, summarize; and (b) COCOEvaluator from
model outputs (Instances per image -> process -> evaluate, which also parses the ground truth and
writes the results json) with each backend. The results file of (a) holds the same detections.

--mode backends loads the two json files with each backend, then evaluates, accumulates and
summarizes.

Exit code 1 when the 12 summary numbers or a per-category AP differ by more than --tolerance.
"""
import argparse
import contextlib
import gc
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time

from detector.evaluation import (
    STAT_NAMES,
    VALID_BACKENDS,
    COCOEvaluator,
    build_coco_api,
    check_coco_gt,
    check_coco_results,
    get_coco_api,
    instances_to_coco_json,
    load_coco_results,
    make_synthetic_coco,
    run_coco_eval,
    synthetic_model_outputs,
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
    parser.add_argument("--mode", default="evaluator", choices=["evaluator", "backends"],
                        help="evaluator: end to end from model outputs vs pycocotools on a "
                             "results file; backends: the backends alone on json files")
    parser.add_argument("--iou-type", default="bbox", choices=["bbox", "segm"])
    parser.add_argument("--backends", nargs="+", default=list(VALID_BACKENDS),
                        choices=list(VALID_BACKENDS), help="backends to run, in this order")
    parser.add_argument("--tolerance", type=float, default=1e-12,
                        help="largest allowed difference of a stat or per-category AP")
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


def largest_differences(stats_a, per_category_a, stats_b, per_category_b):
    """(largest |difference| of the 12 stats, of the per-category APs); inf when one side has a
    number the other calls undefined."""
    def diff(a, b):
        if math.isnan(a) or math.isnan(b) or a < 0 or b < 0:
            return 0.0 if (math.isnan(a) or a < 0) == (math.isnan(b) or b < 0) else math.inf
        return abs(a - b)

    worst = max(diff(a, b) for a, b in zip(stats_a, stats_b))
    if per_category_a.keys() != per_category_b.keys():
        return worst, math.inf
    per_category = max((diff(a, per_category_b[k]) for k, a in per_category_a.items()),
                       default=0.0)
    return worst, per_category


class Stopwatch:
    """Wall-clock and CPU seconds of this process, summed over the ``with`` blocks. CPU time
    hardly depends on what else the machine runs, so its ratios are the steadier ones."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]


def time_cocoapi(gt_path, results_path, iou_type):
    """pycocotools as its users run it: COCO(file), loadRes(file), evaluate/accumulate/summarize.
    Returns (Stopwatch, stats, {category id: AP})."""
    coco_cls, _ = get_coco_api("pycocotools")
    with Stopwatch() as watch:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = coco_cls(gt_path)
            coco_dt = coco_gt.loadRes(results_path)
        run = run_coco_eval(coco_gt, coco_dt, iou_type, "pycocotools")
    return watch, run.stats, run.per_category_ap


def time_evaluator(backend, gt_path, pairs, iou_type, output_dir):
    """COCOEvaluator end to end over the (input, output) pairs: construction, process() of every
    image, evaluate(). Model-output creation is not timed. Returns (Stopwatch, stats,
    {category id: AP})."""
    with open(gt_path) as f:
        categories = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    watch = Stopwatch()
    with watch:
        evaluator = COCOEvaluator(gt_json=gt_path, backend=backend, iou_types=(iou_type,),
                                  output_dir=output_dir, distributed=False,
                                  contiguous_id_to_dataset_id={k: c["id"]
                                                               for k, c in enumerate(categories)})
        evaluator.reset()
    for inp, out in pairs():
        with watch:
            evaluator.process([inp], [out])
    with watch:
        results = evaluator.evaluate()[iou_type]
    stats = [results[name] / 100.0 for name in STAT_NAMES]
    per_category = {c["id"]: results[f"AP-{c['name']}"] / 100.0 for c in categories}
    return watch, stats, per_category


def run_evaluator_mode(args, gt, results):
    """Mode "evaluator": (a) cocoapi on a results file vs (b) COCOEvaluator per backend."""
    with_masks = args.iou_type == "segm"

    def pairs():
        return synthetic_model_outputs(gt, results, with_masks=with_masks)

    category_ids = sorted(c["id"] for c in gt["categories"])
    id_map = dict(enumerate(category_ids))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        gt_path = os.path.join(workdir, "synthetic_gt.json")
        with open(gt_path, "w") as f:
            json.dump(gt, f)
        results_path = os.path.join(workdir, "synthetic_results.json")
        records = [r for inp, out in pairs()
                   for r in instances_to_coco_json(out["instances"], inp["image_id"], id_map)]
        if with_masks:  # mask area, not box area, decides a mask detection's size range
            for r in records:
                del r["bbox"]
        with open(results_path, "w") as f:
            json.dump(records, f)
        del records
        gc.collect()

        print(f"Running (a) pycocotools on the results file ({args.iou_type}) ...", flush=True)
        base, base_stats, base_per_category = time_cocoapi(gt_path, results_path, args.iou_type)
        gc.collect()
        rows = [("(a) pycocotools, results file", base)]
        worst = (0.0, 0.0)
        for backend in args.backends:
            print(f"Running (b) COCOEvaluator with {backend} ...", flush=True)
            # a fresh copy of the ground truth: its parsing is part of the evaluator's time
            backend_gt = os.path.join(workdir, f"synthetic_gt_{backend}.json")
            shutil.copyfile(gt_path, backend_gt)
            watch, stats, per_category = time_evaluator(
                backend, backend_gt, pairs, args.iou_type, os.path.join(workdir, backend))
            gc.collect()
            rows.append((f"(b) COCOEvaluator, {backend}", watch))
            differences = largest_differences(base_stats, base_per_category, stats, per_category)
            worst = tuple(max(w, d) for w, d in zip(worst, differences))
            print(f"    largest difference to (a): {differences[0]:.3g} in the 12 stats, "
                  f"{differences[1]:.3g} in per-category AP")

    print()
    print(f"{'end to end (' + args.iou_type + ')':<36}{'wall [s]':>10}{'vs (a)':>8}"
          f"{'CPU [s]':>10}{'vs (a)':>8}")
    for name, watch in rows:
        print(f"{name:<36}{watch.wall:>10.2f}{base.wall / watch.wall:>7.1f}x"
              f"{watch.cpu:>10.2f}{base.cpu / watch.cpu:>7.1f}x")
    print()
    print("COCOeval stats (a): " + ", ".join(f"{n} {v:.4f}" for n, v in zip(STAT_NAMES,
                                                                             base_stats)))
    print(f"Largest difference: {worst[0]:.3g} in the 12 stats, {worst[1]:.3g} in per-category "
          f"AP (tolerance {args.tolerance:g})")
    if worst[0] > args.tolerance or worst[1] > args.tolerance:
        print("FAIL: the evaluation paths disagree")
        return 1
    print("OK: every path gives the same 12 stats and per-category APs")
    return 0


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
    if args.mode == "evaluator":
        return run_evaluator_mode(args, gt, results)

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
