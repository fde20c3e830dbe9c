"""Reading and checking COCO ground-truth / results json, and evaluating a results file.

Malformed input is reported as one line naming the file and the offending record, instead of
the assertion or KeyError deep inside pycocotools (or a silently wrong score).
"""
import json
import logging
import math
import time
from typing import Dict, List, Sequence, Tuple

from .coco_backend import (
    STAT_NAMES,
    build_coco_api,
    check_backend,
    check_iou_type,
    format_summary,
    load_coco_results,
    run_coco_eval,
)

__all__ = [
    "load_json_file", "check_coco_gt", "check_coco_results", "category_names", "evaluate_coco_json",
]

logger = logging.getLogger(__name__)

_GT_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd")
_RESULT_KEYS = ("image_id", "category_id", "score")


def load_json_file(path: str, what: str):
    """``json.load`` of ``path``; missing/unreadable/malformed files raise one-line errors."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: malformed {what} JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {what} file is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise OSError(f"{path}: cannot read {what} file ({e.strerror or e})") from None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_coco_gt(data, source: str, iou_type: str = "bbox") -> dict:
    """Check that ``data`` is a COCO instances dict every evaluation step can use; returns it.

    Adds an empty ``annotations`` list when the key is absent (a GT with no objects).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: ground truth must be a JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{source}: ground truth needs a '{key}' list")
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise ValueError(f"{source}: 'annotations' must be a list")
    image_keys = ("id", "height", "width") if iou_type == "segm" else ("id",)
    for i, img in enumerate(data["images"]):
        missing = [k for k in image_keys if not isinstance(img, dict) or k not in img]
        if missing:
            raise ValueError(f"{source}: images[{i}] lacks key(s) {missing}")
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise ValueError(f"{source}: categories[{i}] needs 'id' and 'name'")
    image_ids = {img["id"] for img in data["images"]}
    cat_ids = {cat["id"] for cat in data["categories"]}
    ann_keys = _GT_ANNOTATION_KEYS + (("segmentation",) if iou_type == "segm" else ())
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise ValueError(f"{source}: annotations[{i}] is not an object")
        missing = [k for k in ann_keys if k not in ann]
        if missing:
            raise ValueError(f"{source}: annotation id {ann.get('id', '?')} (annotations[{i}]) "
                             f"lacks key(s) {missing}")
        if ann["image_id"] not in image_ids:
            raise ValueError(f"{source}: annotation id {ann['id']} references image_id "
                             f"{ann['image_id']} that is not in 'images'")
        if ann["category_id"] not in cat_ids:
            raise ValueError(f"{source}: annotation id {ann['id']} references category_id "
                             f"{ann['category_id']} that is not in 'categories'")
    return data


def check_coco_results(records, gt: dict, iou_type: str, source: str) -> list:
    """Check COCO results records against the ground truth ``gt``; returns them.

    Every record needs image_id / category_id / a finite score, plus ``segmentation`` for segm or
    a 4-number ``bbox`` for bbox (a file of mask results without boxes may be box-evaluated: the
    boxes then come from the masks). Image or category ids absent from the ground truth are
    errors: pycocotools would assert or silently drop them.
    """
    if not isinstance(records, list):
        raise ValueError(f"{source}: results must be a JSON list of records, "
                         f"got {type(records).__name__}")
    if not records:
        return records
    box_from_mask = iou_type == "bbox" and isinstance(records[0], dict) and "bbox" not in records[0]
    geometry_key = "segmentation" if iou_type == "segm" or box_from_mask else "bbox"
    gt_image_ids = {img["id"] for img in gt["images"]}
    gt_cat_ids = {cat["id"] for cat in gt["categories"]}
    unknown_images, unknown_cats = {}, {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{source}: record {i} is not an object")
        missing = [k for k in _RESULT_KEYS + (geometry_key,) if k not in rec]
        if missing:
            raise ValueError(f"{source}: record {i} (image_id {rec.get('image_id', '?')}) "
                             f"lacks key(s) {missing}")
        if not _is_number(rec["score"]):
            raise ValueError(f"{source}: record {i} (image_id {rec['image_id']}) has score "
                             f"{rec['score']!r}; scores must be finite numbers")
        if geometry_key == "bbox":
            box = rec["bbox"]
            if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
                raise ValueError(f"{source}: record {i} (image_id {rec['image_id']}) has bbox "
                                 f"{box!r}; expected [x, y, width, height] finite numbers")
        if rec["image_id"] not in gt_image_ids:
            unknown_images.setdefault(rec["image_id"], i)
        if rec["category_id"] not in gt_cat_ids:
            unknown_cats.setdefault(rec["category_id"], i)
    if unknown_images:
        ids = sorted(unknown_images, key=unknown_images.get)[:5]
        raise ValueError(f"{source}: results reference {len(unknown_images)} image id(s) that are "
                         f"not in the ground truth, e.g. {ids}")
    if unknown_cats:
        ids = sorted(unknown_cats, key=unknown_cats.get)[:5]
        raise ValueError(f"{source}: results reference {len(unknown_cats)} category id(s) that "
                         f"are not in the ground truth, e.g. {ids} (contiguous ids instead of "
                         f"dataset ids?)")
    return records


def category_names(gt: dict) -> Dict[int, str]:
    """category id -> name; a name shared by several categories gets its id appended."""
    counts: Dict[str, int] = {}
    for cat in gt["categories"]:
        counts[cat["name"]] = counts.get(cat["name"], 0) + 1
    return {cat["id"]: cat["name"] if counts[cat["name"]] == 1 else f"{cat['name']} ({cat['id']})"
            for cat in gt["categories"]}


def evaluate_coco_json(gt_json: str, results_json: str, iou_type: str = "bbox",
                       backend: str = "pycocotools") -> Tuple[List[float], Dict[str, float]]:
    """Evaluate an existing COCO results file against a ground-truth file with default COCOeval
    parameters, printing COCOeval's 12-line summary.

    Returns ``(stats, per_category_ap)``: the 12 ``COCOeval.stats`` numbers as fractions (-1 where
    COCOeval reports the metric as undefined) and ``{category name: AP@[.5:.95]}`` (fractions, NaN
    for a category without ground truth). An empty results list logs a warning and gives zeros.
    """
    backend = check_backend(backend)
    check_iou_type(iou_type)
    tic = time.perf_counter()
    gt = check_coco_gt(load_json_file(gt_json, "ground-truth"), gt_json, iou_type)
    records = check_coco_results(load_json_file(results_json, "results"), gt, iou_type,
                                 results_json)
    names = category_names(gt)
    if not records:
        logger.warning("%s contains no detections; every %s metric is reported as 0",
                       results_json, iou_type)
        stats = [0.0] * len(STAT_NAMES)
        print("\n".join(format_summary(stats)))
        return stats, {name: 0.0 for name in names.values()}
    coco_gt = build_coco_api(gt, backend)
    coco_dt = load_coco_results(coco_gt, records, backend)
    load_time = time.perf_counter() - tic
    run = run_coco_eval(coco_gt, coco_dt, iou_type, backend)
    logger.info("COCO %s evaluation of %s with %s: load %.2fs, evaluate %.2fs, accumulate %.2fs",
                iou_type, results_json, backend, load_time, run.timings["evaluate"],
                run.timings["accumulate"])
    print("\n".join(run.summary_lines))
    per_category = {names[cat_id]: ap for cat_id, ap in run.per_category_ap.items()}
    return run.stats, per_category


def zero_stats() -> List[float]:
    return [0.0] * len(STAT_NAMES)


def stats_to_percent(stats: Sequence[float]) -> Dict[str, float]:
    """detectron2's convention: metrics in percent, NaN where COCOeval reports -1 (undefined)."""
    return {name: (float(v) * 100.0 if v >= 0 else float("nan"))
            for name, v in zip(STAT_NAMES, stats)}
