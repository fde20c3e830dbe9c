"""Reading and checking COCO ground-truth / results json, evaluating a results file, and
results held as arrays: their checks, float32 decimals and json encoding.

Malformed input is reported as one line naming the file and the offending record, instead of
the assertion or KeyError deep inside pycocotools (or a silently wrong score).
"""
import decimal
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

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
    "CocoResultArrays", "check_result_arrays", "Float32Decimals", "float32_decimals",
    "coco_results_json",
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
                       backend: str = "faster_coco_eval") -> Tuple[List[float], Dict[str, float]]:
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


# ---------------------------------------------------------------------------------------------
# Results held as arrays: the evaluator's in-memory form, its checks and its json encoding
# ---------------------------------------------------------------------------------------------

@dataclass
class CocoResultArrays:
    """COCO detection results as arrays, one row per detection, in results-file order."""

    image_ids: np.ndarray  # (N,) int64
    boxes_xywh: np.ndarray  # (N, 4) float32, absolute XYWH
    scores: np.ndarray  # (N,) float32
    category_ids: np.ndarray  # (N,) int64 dataset category ids
    # RLE per row ({"size": [h, w], "counts": str}); None when the predictions have no masks
    segmentations: Optional[List[dict]] = None

    def __len__(self) -> int:
        return len(self.image_ids)

    @classmethod
    def empty(cls, with_masks: bool = False) -> "CocoResultArrays":
        return cls(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                   np.zeros(0, np.int64), [] if with_masks else None)

    @classmethod
    def concatenate(cls, parts: Sequence["CocoResultArrays"]) -> "CocoResultArrays":
        """All rows of ``parts`` in order; ``segmentations`` is None unless every non-empty part
        has them."""
        parts = list(parts)
        if not parts:
            return cls.empty()
        with_masks = all(p.segmentations is not None for p in parts if len(p))
        segmentations = None
        if with_masks:
            segmentations = [rle for p in parts for rle in (p.segmentations or ())]
        return cls(np.concatenate([p.image_ids for p in parts]),
                   np.concatenate([p.boxes_xywh for p in parts]).reshape(-1, 4),
                   np.concatenate([p.scores for p in parts]),
                   np.concatenate([p.category_ids for p in parts]), segmentations)


def check_result_arrays(results: CocoResultArrays, gt: dict, source: str) -> CocoResultArrays:
    """``check_coco_results`` on arrays, vectorised, with the same one-line messages: finite
    boxes and scores, image and category ids of the ground truth."""
    finite_score = np.isfinite(results.scores)
    finite_box = np.isfinite(results.boxes_xywh).all(axis=1)
    bad = np.flatnonzero(~(finite_score & finite_box))
    if bad.size:
        i = int(bad[0])
        image_id = int(results.image_ids[i])
        if not finite_score[i]:
            raise ValueError(f"{source}: record {i} (image_id {image_id}) has score "
                             f"{float(results.scores[i])!r}; scores must be finite numbers")
        box = [float(v) for v in results.boxes_xywh[i]]
        raise ValueError(f"{source}: record {i} (image_id {image_id}) has bbox {box!r}; "
                         f"expected [x, y, width, height] finite numbers")
    for ids, known, what, hint in (
            (results.image_ids, [img["id"] for img in gt["images"]], "image", ""),
            (results.category_ids, [cat["id"] for cat in gt["categories"]], "category",
             " (contiguous ids instead of dataset ids?)")):
        unknown = ~np.isin(ids, np.asarray(known, dtype=np.int64))
        if unknown.any():
            # distinct unknown ids in order of first appearance, as check_coco_results names them
            values, first = np.unique(ids[unknown], return_index=True)
            ordered = values[np.argsort(first)].tolist()
            raise ValueError(f"{source}: results reference {len(values)} {what} id(s) that are "
                             f"not in the ground truth, e.g. {ordered[:5]}{hint}")
    return results


@dataclass
class Float32Decimals:
    """The shortest decimal of each float32 value (what ``str(numpy.float32)`` prints), as
    ``significands * 10**exponents`` with its sign, and the float64 that decimal parses to."""

    values: np.ndarray  # float64: what json.load gives back for the written decimal
    significands: np.ndarray  # int64 >= 0 without trailing zeros (0 for zero)
    exponents: np.ndarray  # int64
    negative: np.ndarray  # bool, the sign bit (-0.0 keeps its sign)


# 10**k exactly, k = 0..22 (every one is a float64 integer)
_POW10 = 10.0 ** np.arange(23)
_POW10_INT = 10 ** np.arange(19, dtype=np.int64)
# Where the vectorised search below is exact: a * 10**k needs M * 5**k < 2**53 (M < 2**24 the
# float32 significand), so k <= 12 and |v| >= 1e-4; d * 10**k stays an exact integer below 1e15
_FAST_RANGE = (1e-4, 1e15)


def _nearest_decimal(a, target, exp10, digits):
    """The ``digits``-significant-digit decimal nearest to ``a`` (10**exp10 <= a < 10**(exp10+1)):
    (significand, float64 value, whether it gives back ``target`` as float32, remainder of the
    rounding: +-0.5 is an exact tie between two candidates).

    Each step is one correctly rounded operation by an exact power of ten, so the value is the
    float64 that the decimal's text parses to.
    """
    shift = digits - 1 - exp10
    divide = shift < 0
    factor = _POW10.take(np.abs(shift))
    scaled = np.multiply(a, factor)
    np.divide(a, factor, out=scaled, where=divide)
    significand = np.rint(scaled)
    value = np.divide(significand, factor)
    np.multiply(significand, factor, out=value, where=divide)
    return significand, value, value.astype(np.float32) == target, scaled - significand


def _fast_shortest(a: np.ndarray, target: np.ndarray):
    """Shortest decimals of float32 magnitudes ``a`` (float64) inside _FAST_RANGE.

    The shortest decimal that gives back a float32 is the nearest one on the coarsest decimal
    grid that still round-trips (Steele & White / Ryu); round-tripping is monotone in the number
    of digits, so a binary search over 1..9 digits finds it. Returns (significand, exponent,
    value, resolved); unresolved rows (an exact tie between two candidates) need the slow path.
    """
    exp10 = np.floor(np.log10(a)).astype(np.int64)
    # log10 may be off by one next to a power of ten: correct it with exact comparisons
    ratio = np.where(exp10 < 0, a * _POW10.take(np.clip(-exp10, 0, 22)),
                     a / _POW10.take(np.clip(exp10, 0, 22)))
    exp10 += (ratio >= 10.0).astype(np.int64) - (ratio < 1.0).astype(np.int64)
    lo = np.ones(len(a), np.int64)
    hi = np.full(len(a), 9, np.int64)  # 9 significant digits always identify a float32
    for _ in range(4):  # ceil(log2(9)) halvings
        mid = (lo + hi) // 2
        ok = _nearest_decimal(a, target, exp10, mid)[2]
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, np.minimum(mid + 1, hi))
    significand, value, ok, remainder = _nearest_decimal(a, target, exp10, hi)
    return significand.astype(np.int64), exp10 - (hi - 1), value, ok & (np.abs(remainder) != 0.5)


def _slow_shortest(v32: np.float32):
    """One value through numpy's own shortest repr: (significand, exponent, float64)."""
    text = str(v32)
    digits = decimal.Decimal(text).as_tuple()
    significand = int("".join(map(str, digits.digits)))
    return significand, int(digits.exponent), float(text)


def float32_decimals(array) -> Float32Decimals:
    """Vectorised ``float(str(numpy.float32(v)))`` for every value of ``array`` (finite).

    Model outputs are float32: their shortest decimals keep all of their precision (AP does not
    change) while a json file stays compact, and what the file reloads to equals these values.
    """
    v32 = np.ascontiguousarray(array, dtype=np.float32).ravel()
    if not np.isfinite(v32).all():
        raise ValueError("float32_decimals needs finite values")
    magnitude32 = np.abs(v32)
    magnitude = magnitude32.astype(np.float64)
    significands = np.zeros(len(v32), np.int64)
    exponents = np.zeros(len(v32), np.int64)
    values = np.zeros(len(v32), np.float64)
    fast = np.flatnonzero((magnitude >= _FAST_RANGE[0]) & (magnitude < _FAST_RANGE[1]))
    resolved = np.zeros(len(v32), bool)
    if fast.size:
        sig, exp, val, ok = _fast_shortest(magnitude[fast], magnitude32[fast])
        significands[fast], exponents[fast], values[fast], resolved[fast] = sig, exp, val, ok
    resolved |= magnitude == 0
    for i in np.flatnonzero(~resolved).tolist():
        significands[i], exponents[i], values[i] = _slow_shortest(magnitude32[i])
    # a rounded-up significand can end in zeros (e.g. 100 for 9.996 at 2 digits): strip them
    while True:
        trailing = (significands % 10 == 0) & (significands > 0)
        if not trailing.any():
            break
        significands[trailing] //= 10
        exponents[trailing] += 1
    negative = np.signbit(v32)
    return Float32Decimals(np.where(negative, -values, values), significands, exponents, negative)


def _ragged_rows(parts) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenate per-row byte fields of varying length. ``parts`` are constant bytes or
    (uint8 (N, w), lengths) fields whose text is right-aligned (the last ``length`` bytes).
    Returns the (N, W) byte matrix and the mask of the bytes to keep, row-major."""
    chars, keep = [], []
    rows = next(len(p[0]) for p in parts if not isinstance(p, bytes))
    for part in parts:
        if isinstance(part, bytes):
            const = np.frombuffer(part, np.uint8)
            chars.append(np.broadcast_to(const, (rows, len(const))))
            keep.append(np.ones((rows, len(const)), bool))
        else:
            field, lengths = part
            chars.append(field)
            keep.append(np.arange(field.shape[1] - 1, -1, -1) < np.asarray(lengths)[:, None])
    return np.concatenate(chars, axis=1), np.concatenate(keep, axis=1)


_ASCII_ZERO, _ASCII_MINUS = ord("0"), ord("-")


def _digits_right(values: np.ndarray, width: int) -> np.ndarray:
    """(N, width) ASCII digits of non-negative integers, right-aligned, zero-padded."""
    out = np.empty((len(values), max(width, 1)), np.uint8)
    for column in range(out.shape[1] - 1, -1, -1):
        values, digit = np.divmod(values, 10)
        out[:, column] = digit
    out += _ASCII_ZERO
    return out


def _number_fields(dec: Float32Decimals, rows: slice):
    """Byte fields of Python's float repr of ``dec[rows]`` in fixed notation, and the rows it
    writes in scientific notation instead (|v| < 1e-4 or >= 1e16), which these fields do not."""
    sig, exp = dec.significands[rows], dec.exponents[rows]
    point = np.maximum(np.searchsorted(_POW10_INT, sig, side="right"), 1) + exp
    scientific = (point <= -4) | (point > 16)
    exp = np.where(scientific, 0, exp)
    whole = exp >= 0
    power = _POW10_INT.take(np.clip(np.abs(exp), 0, 18))
    integer = np.where(whole, sig * power, sig // power)
    fraction = np.where(whole, 0, sig % power)
    integer_len = np.maximum(np.searchsorted(_POW10_INT, integer, side="right"), 1)
    fraction_len = np.where(whole, 1, -exp)
    sign = np.full((len(sig), 1), _ASCII_MINUS, np.uint8)
    fields = [(sign, dec.negative[rows]),
              (_digits_right(integer, int(integer_len.max(initial=1))), integer_len), b".",
              (_digits_right(fraction, int(fraction_len.max(initial=1))), fraction_len)]
    return fields, scientific


def _int_fields(values: np.ndarray):
    """Right-aligned byte field of integer ids (few distinct values: each formatted once)."""
    distinct, inverse = np.unique(values, return_inverse=True)
    texts = [str(v).encode("ascii") for v in distinct.tolist()]
    width = max(len(t) for t in texts)
    table = np.zeros((len(texts), width), np.uint8)
    for k, text in enumerate(texts):
        table[k, width - len(text):] = np.frombuffer(text, np.uint8)
    lengths = np.array([len(t) for t in texts], np.int64)
    return table[inverse], lengths[inverse]


def coco_results_json(results: CocoResultArrays, boxes: Float32Decimals,
                      scores: Float32Decimals, chunk: int = 1 << 16) -> bytes:
    """The bytes ``json.dumps`` gives for the results records ``{"image_id", "category_id",
    "bbox", "score"[, "segmentation"]}`` with the float values of ``boxes`` / ``scores``.

    Hand-written because ``json`` formats one Python float at a time (about a second per
    million numbers): fields are assembled as byte matrices by numpy, and only rows numpy
    cannot write in fixed notation (and segmentation RLEs) go through ``json`` itself.
    """
    pieces = []
    for start in range(0, len(results), chunk):
        rows = slice(start, min(start + chunk, len(results)))
        box_rows = slice(4 * rows.start, 4 * rows.stop)
        box_fields, box_odd = _number_fields(boxes, box_rows)
        score_fields, odd = _number_fields(scores, rows)
        odd = odd | box_odd.reshape(-1, 4).any(axis=1)
        # one field per box coordinate: every 4th row of the flat box fields
        coords = [[(f[0][k::4], f[1][k::4]) if isinstance(f, tuple) else f for f in box_fields]
                  for k in range(4)]
        # rows end in "}, " unless a segmentation follows the score
        closing = b"}, " if results.segmentations is None else b""
        parts = [b'{"image_id": ', _int_fields(results.image_ids[rows]), b', "category_id": ',
                 _int_fields(results.category_ids[rows]), b', "bbox": [', *coords[0], b", ",
                 *coords[1], b", ", *coords[2], b", ", *coords[3], b'], "score": ',
                 *score_fields, closing]
        chars, keep = _ragged_rows(parts)
        blob = chars[keep].tobytes()
        if results.segmentations is None and not odd.any():
            pieces.append(blob)
            continue
        ends = np.cumsum(keep.sum(axis=1)).tolist()
        for k, end in enumerate(ends):
            i = rows.start + k
            if odd[k]:
                record = {"image_id": int(results.image_ids[i]),
                          "category_id": int(results.category_ids[i]),
                          "bbox": boxes.values[4 * i: 4 * i + 4].tolist(),
                          "score": float(scores.values[i])}
                row = json.dumps(record)[:-1].encode("ascii")
            else:
                row = blob[(ends[k - 1] if k else 0):end - len(closing)]
            if results.segmentations is not None:
                row += b', "segmentation": ' + json.dumps(results.segmentations[i]).encode("ascii")
            pieces.append(row + b"}, ")
    if not pieces:
        return b"[]"
    return b"[" + b"".join(pieces)[:-2] + b"]"
