"""One place that knows the two COCO evaluation libraries: pycocotools and faster-coco-eval.

Both are driven through the same steps (load ground truth, load results, evaluate, accumulate,
summarize) with the default COCOeval parameters of pycocotools, so the numbers agree. The only
known difference is at the last bit: pycocotools divides ``tp / (tp + fp + eps)``, which makes a
precision of 1.0 come out as ``1 - 2**-52``; the summary numbers then differ by ~1e-16.
"""
import contextlib
import copy
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "VALID_BACKENDS", "IOU_TYPES", "STAT_NAMES", "check_backend", "get_coco_api",
    "build_coco_api", "load_coco_results", "build_results_api", "run_coco_eval", "CocoEvalRun",
    "format_summary",
]

logger = logging.getLogger(__name__)

VALID_BACKENDS = ("pycocotools", "faster_coco_eval")
IOU_TYPES = ("bbox", "segm")
# The 12 numbers of COCOeval.stats, in order, with detectron2's names
STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
# (precision?, IoU, area, maxDets) of every summary line, as COCOeval.summarize() prints them
_SUMMARY_LAYOUT = (
    (True, None, "all", 100), (True, 0.5, "all", 100), (True, 0.75, "all", 100),
    (True, None, "small", 100), (True, None, "medium", 100), (True, None, "large", 100),
    (False, None, "all", 1), (False, None, "all", 10), (False, None, "all", 100),
    (False, None, "small", 100), (False, None, "medium", 100), (False, None, "large", 100),
)


def check_backend(backend: str) -> str:
    """The canonical name of ``backend`` ("pycocotools" or "faster_coco_eval"; the package name
    "faster-coco-eval" is accepted too), else a one-line ValueError."""
    canonical = backend.replace("-", "_") if isinstance(backend, str) else backend
    if canonical not in VALID_BACKENDS:
        raise ValueError(
            f"Unknown COCO evaluation backend '{backend}'; "
            f"valid backends: {', '.join(VALID_BACKENDS)} (or faster-coco-eval)"
        )
    return canonical


def check_iou_type(iou_type: str) -> str:
    if iou_type not in IOU_TYPES:
        raise ValueError(f"Unknown iou_type '{iou_type}'; valid types: {', '.join(IOU_TYPES)}")
    return iou_type


def get_coco_api(backend: str) -> Tuple[type, type]:
    """The (COCO, COCOeval) classes of ``backend``.

    faster-coco-eval's ``COCOeval_faster`` is its pycocotools-compatible evaluator (C++ matching
    and accumulation); its constructor defaults (no LVIS rules, pycocotools area ranges, area from
    the annotation) already equal pycocotools' parameters.
    """
    backend = check_backend(backend)
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    from faster_coco_eval import COCO, COCOeval_faster

    return COCO, COCOeval_faster


def build_coco_api(dataset: dict, backend: str):
    """A COCO API object of ``backend`` indexing an already loaded (and checked) dataset dict."""
    coco_cls, _ = get_coco_api(backend)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        api = coco_cls()
        api.dataset = dataset
        api.createIndex()
    return api


def load_coco_results(coco_gt, records: List[dict], backend: str):
    """``coco_gt.loadRes(records)``; ``records`` must be non-empty and already validated.

    loadRes adds ``id``/``area``/``iscrowd`` (and a box polygon) to every record in place, so pass
    records the caller does not need unchanged.
    """
    check_backend(backend)
    if len(records) == 0:
        raise ValueError("load_coco_results needs at least one result record")
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(records)


def build_results_api(coco_gt, annotations: List[dict], backend: str):
    """The results object ``coco_gt.loadRes`` gives, built over ready ``annotations``.

    loadRes makes a pass in Python over every record to number it and add ``area`` and
    ``iscrowd`` (and a box polygon that bbox evaluation never reads): about 2 s per 500k
    detections. Callers that hold results as arrays compute those fields vectorised instead,
    exactly as loadRes does: ``id`` 1..N in order, ``iscrowd`` 0, ``area`` = w * h of the box
    (bbox) or the mask's pixel count with ``bbox`` from the mask (segm).
    """
    coco_cls, _ = get_coco_api(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        api = coco_cls()
        api.dataset = {"info": copy.deepcopy(coco_gt.dataset.get("info", {})),
                       "images": list(coco_gt.dataset["images"]),
                       "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                       "annotations": annotations}
        api.createIndex()
    return api


@dataclass
class CocoEvalRun:
    """What one COCOeval run produced."""

    # The 12 COCOeval.stats values (fractions; -1 where pycocotools reports "undefined")
    stats: List[float]
    # category id -> AP@[.5:.95] (area all, 100 dets) as a fraction; NaN if it has no ground truth
    per_category_ap: Dict[int, float]
    # The 12 lines COCOeval.summarize() printed
    summary_lines: List[str]
    # Seconds spent in evaluate / accumulate / summarize
    timings: Dict[str, float] = field(default_factory=dict)


def run_coco_eval(coco_gt, coco_dt, iou_type: str, backend: str,
                  img_ids: Optional[Sequence[int]] = None) -> CocoEvalRun:
    """Run COCOeval of ``backend`` with default parameters, optionally only on ``img_ids``."""
    check_iou_type(iou_type)
    backend = check_backend(backend)
    _, cocoeval_cls = get_coco_api(backend)
    summary_lines: List[str] = []
    timings = {}
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        if backend == "faster_coco_eval":
            evaluator = cocoeval_cls(coco_gt, coco_dt, iouType=iou_type,
                                     print_function=lambda *args, **kwargs: None)
        else:
            evaluator = cocoeval_cls(coco_gt, coco_dt, iouType=iou_type)
        if img_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in img_ids)
        tic = time.perf_counter()
        evaluator.evaluate()
        timings["evaluate"] = time.perf_counter() - tic
        tic = time.perf_counter()
        evaluator.accumulate()
        timings["accumulate"] = time.perf_counter() - tic
    tic = time.perf_counter()
    if backend == "faster_coco_eval":
        evaluator.print_function = lambda line, *args, **kwargs: summary_lines.append(str(line))
        evaluator.summarize()
    else:
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            evaluator.summarize()
        summary_lines = [ln for ln in captured.getvalue().splitlines() if ln.strip()]
    timings["summarize"] = time.perf_counter() - tic
    # faster-coco-eval appends AR@0.5 and AR@0.75; keep pycocotools' standard 12
    summary_lines = summary_lines[: len(STAT_NAMES)]
    stats = [float(s) for s in np.asarray(evaluator.stats)[: len(STAT_NAMES)]]
    return CocoEvalRun(stats=stats, per_category_ap=_per_category_ap(evaluator),
                       summary_lines=summary_lines, timings=timings)


def _per_category_ap(evaluator) -> Dict[int, float]:
    # precision has shape (iou thresholds, recall thresholds, categories, areas, maxDets)
    precision = np.asarray(evaluator.eval["precision"])
    cat_ids = list(evaluator.params.catIds)
    ret = {}
    for k, cat_id in enumerate(cat_ids):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        ret[int(cat_id)] = float(np.mean(values)) if values.size else float("nan")
    return ret


def format_summary(stats: Sequence[float]) -> List[str]:
    """The 12 summary lines in COCOeval.summarize()'s exact format, for given stats."""
    lines = []
    for value, (is_ap, iou, area, max_dets) in zip(stats, _SUMMARY_LAYOUT):
        title, kind = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
        iou_str = "0.50:0.95" if iou is None else f"{iou:0.2f}"
        lines.append(
            f" {title:<18} {kind} @[ IoU={iou_str:<9} | area={area:>6s} | maxDets={max_dets:>3d} ]"
            f" = {value:0.3f}"
        )
    return lines
