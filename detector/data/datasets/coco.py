"""COCO-format instance annotations -> dataset dicts (docs/architecture.md), via pycocotools."""
import contextlib
import io
import json
import logging
import math
import os
from typing import Callable, Dict, List, Optional, Union

import numpy as np
from pycocotools.coco import COCO

from detector.structures import polygon_area

from ..catalog import DatasetCatalog, MetadataCatalog

__all__ = ["load_coco_json", "register_coco_instances", "DatasetFormatError", "DROP_REASONS",
           "SEGMENTATION_DROP_REASONS"]

logger = logging.getLogger("detector.data")

# Reasons an annotation box is dropped while loading, in the order they are checked
DROP_REASONS = ("non_finite", "negative_size", "zero_size", "outside_image")
# Reasons a polygon or an RLE is removed from an annotation while loading (its box is kept)
SEGMENTATION_DROP_REASONS = ("polygon_malformed", "polygon_few_points", "polygon_zero_area",
                             "rle_malformed", "rle_size_mismatch")
_POLYGON_REASONS = SEGMENTATION_DROP_REASONS[:3]


class DatasetFormatError(ValueError):
    """An annotation file whose content cannot be used; the message names the file and the entry."""


def _read_json(json_file: str) -> dict:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO annotation file not found: {json_file}")
    try:
        with open(json_file, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(
            f"{json_file}: malformed JSON at line {e.lineno} column {e.colno} "
            f"(char {e.pos}): {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise DatasetFormatError(
            f"{json_file}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise DatasetFormatError(
            f"{json_file}: expected a JSON object with 'images' and 'categories' lists "
            f"(COCO format)"
        )
    if not isinstance(data.get("annotations", []), list):
        raise DatasetFormatError(f"{json_file}: 'annotations' must be a list")
    return data


def _check_entries(json_file: str, data: dict) -> None:
    """Fail early, naming the entry, on what pycocotools would accept and mis-handle later."""
    kinds = (("images", "image"), ("categories", "category"), ("annotations", "annotation"))
    for key, what in kinds:
        seen = set()
        for i, entry in enumerate(data.get(key, [])):
            if not isinstance(entry, dict) or "id" not in entry:
                raise DatasetFormatError(f"{json_file}: {key}[{i}] has no 'id'")
            if entry["id"] in seen:
                raise DatasetFormatError(f"{json_file}: duplicate {what} id {entry['id']}")
            seen.add(entry["id"])
    for img in data["images"]:
        for k in ("file_name", "height", "width"):
            if k not in img:
                raise DatasetFormatError(f"{json_file}: image id {img['id']} has no '{k}'")
        size = (img["height"], img["width"])
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                   and float(v).is_integer() for v in size):
            raise DatasetFormatError(
                f"{json_file}: image id {img['id']} has invalid size "
                f"height={img['height']!r} width={img['width']!r}"
            )
    category_ids = {c["id"] for c in data["categories"]}
    for ann in data.get("annotations", []):
        for k in ("image_id", "category_id", "bbox"):
            if k not in ann:
                raise DatasetFormatError(f"{json_file}: annotation id {ann['id']} has no '{k}'")
        if ann["category_id"] not in category_ids:
            raise DatasetFormatError(
                f"{json_file}: annotation id {ann['id']} has category_id {ann['category_id']!r} "
                f"which is not among the file's categories {sorted(category_ids)}"
            )
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox
        ):
            raise DatasetFormatError(
                f"{json_file}: annotation id {ann['id']} has bbox {bbox!r}; expected [x, y, w, h]"
            )


def _box_xyxy_or_reason(bbox_xywh, height: int, width: int):
    """(xyxy clipped to the image, was_clipped) or (None, drop reason)."""
    x, y, w, h = (float(v) for v in bbox_xywh)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None, "non_finite"
    if w < 0 or h < 0:
        return None, "negative_size"
    if w == 0 or h == 0:
        return None, "zero_size"
    box = [x, y, x + w, y + h]
    clipped = [min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
               min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, "outside_image"
    return clipped, clipped != box


# Polygons enclosing less (in pixels squared) are degenerate: collinear or repeated points
_MIN_POLYGON_AREA = 1e-6


def _polygon_problem(polygon) -> Optional[str]:
    """None for a usable flat polygon [x0, y0, x1, y1, ...], else the drop reason."""
    if not isinstance(polygon, list) or len(polygon) % 2:
        return "polygon_malformed"
    try:
        # one pass over the values: a non-number fails, a NaN or inf makes the sum non-finite
        if not math.isfinite(sum(polygon)):
            return "polygon_malformed"
    except TypeError:
        return "polygon_malformed"
    if len(polygon) < 6:
        return "polygon_few_points"
    if polygon_area(np.asarray(polygon, dtype=np.float64)) < _MIN_POLYGON_AREA:
        return "polygon_zero_area"
    return None


def _clean_segmentation(segm, height: int, width: int, counts: Dict[str, int]):
    """The usable part of a segmentation, or None: polygons with >= 3 points and some area, or
    an RLE dict of the image's size. Each removed polygon / RLE is counted in ``counts`` under its
    SEGMENTATION_DROP_REASONS reason."""
    if isinstance(segm, dict):
        if "counts" not in segm or not isinstance(segm.get("size"), (list, tuple)):
            counts["rle_malformed"] += 1
            return None
        if list(segm["size"]) != [height, width]:
            counts["rle_size_mismatch"] += 1
            return None
        return segm
    if not isinstance(segm, list):
        counts["polygon_malformed"] += 1
        return None
    polygons = []
    for polygon in segm:
        problem = _polygon_problem(polygon)
        if problem is None:
            polygons.append(polygon)
        else:
            counts[problem] += 1
    return polygons or None


def load_coco_json(
    json_file: str,
    image_root: str,
    dataset_name: Optional[str] = None,
    *,
    stats: Optional[Dict[str, int]] = None,
) -> List[dict]:
    """Load a COCO instances json into dataset dicts (docs/architecture.md).

    Boxes become absolute XYXY; boxes partly outside the image are clipped; boxes with NaN/inf
    values, negative or zero size, or fully outside the image are dropped. Segmentations keep only
    their usable polygons (>= 3 points, some area) or an RLE of the image's size; an annotation
    left without one keeps its box but has no "segmentation" (the mapper drops it with
    MODEL.MASK_ON). One warning summarises the counts per reason; if ``stats`` (a dict) is given
    it receives ``images``, ``annotations`` (kept), ``empty_images``, ``clipped``,
    ``invalid_polygons`` (all polygon reasons), ``segmentation_removed`` (annotations left
    without a segmentation) and one count per DROP_REASONS and SEGMENTATION_DROP_REASONS.
    Category ids are mapped to contiguous 0..K-1 in id order; with ``dataset_name`` the class names
    and both id maps are stored in ``MetadataCatalog.get(dataset_name)``. Images without
    annotations are kept (the training loader filters them)."""
    json_file = os.fspath(json_file)
    data = _read_json(json_file)
    _check_entries(json_file, data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()

    cat_ids = sorted(coco.getCatIds())
    thing_classes = [c["name"] for c in coco.loadCats(cat_ids)]
    id_map = {cid: i for i, cid in enumerate(cat_ids)}
    if dataset_name is not None:
        MetadataCatalog.get(dataset_name).set(
            thing_classes=thing_classes,
            thing_dataset_id_to_contiguous_id=id_map,
            thing_contiguous_id_to_dataset_id={i: cid for cid, i in id_map.items()},
        )

    counts = {k: 0 for k in ("images", "annotations", "empty_images", "clipped",
                             "segmentation_removed", *DROP_REASONS, *SEGMENTATION_DROP_REASONS)}
    dataset_dicts = []
    image_root = os.path.abspath(image_root)
    for img_id in sorted(coco.imgs):
        img = coco.imgs[img_id]
        height, width = int(img["height"]), int(img["width"])
        record = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "image_id": img_id,
            "height": height,
            "width": width,
            "annotations": [],
        }
        for ann in coco.imgToAnns.get(img_id, []):
            box, info = _box_xyxy_or_reason(ann["bbox"], height, width)
            if box is None:
                counts[info] += 1
                continue
            counts["clipped"] += int(info)
            obj = {
                "bbox": box,
                "category_id": id_map[ann["category_id"]],
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
            if "segmentation" in ann:
                segm = _clean_segmentation(ann["segmentation"], height, width, counts)
                if segm is not None:
                    obj["segmentation"] = segm
                else:
                    counts["segmentation_removed"] += 1
            record["annotations"].append(obj)
        counts["annotations"] += len(record["annotations"])
        counts["empty_images"] += int(not record["annotations"])
        dataset_dicts.append(record)
    counts["images"] = len(dataset_dicts)
    counts["invalid_polygons"] = sum(counts[k] for k in _POLYGON_REASONS)

    problems = {k: counts[k] for k in (*DROP_REASONS, "clipped", *SEGMENTATION_DROP_REASONS,
                                       "segmentation_removed") if counts[k]}
    if problems:
        dropped = sum(counts[k] for k in DROP_REASONS)
        removed = sum(counts[k] for k in SEGMENTATION_DROP_REASONS)
        logger.warning(
            "%s: dropped %d annotation box(es), clipped %d to the image, removed %d invalid "
            "polygon(s)/RLE(s) (%d annotation(s) left without a segmentation); counts: %s",
            json_file, dropped, counts["clipped"], removed, counts["segmentation_removed"],
            ", ".join(f"{k}={v}" for k, v in problems.items()),
        )
    logger.info("Loaded %d images (%d without annotations) and %d annotations from %s",
                counts["images"], counts["empty_images"], counts["annotations"], json_file)
    if stats is not None:
        stats.update(counts)
    return dataset_dicts


PathLike = Union[str, Callable[[], str]]


def register_coco_instances(name: str, metadata: dict, json_file: PathLike, image_root: PathLike):
    """Register a COCO-format dataset under ``name``: ``DatasetCatalog.get(name)`` loads it with
    ``load_coco_json`` and its metadata gets ``json_file``, ``image_root``,
    ``evaluator_type="coco"`` plus ``metadata``. ``json_file``/``image_root`` may be callables
    returning the path, resolved at each use (for roots read from environment variables)."""

    def resolve(p: PathLike) -> str:
        return p() if callable(p) else os.fspath(p)

    DatasetCatalog.register(
        name, lambda: load_coco_json(resolve(json_file), resolve(image_root), name)
    )
    meta = MetadataCatalog.get(name)
    for key, value in (("json_file", json_file), ("image_root", image_root)):
        if callable(value):
            meta.set_lazy(key, value)
        else:
            setattr(meta, key, os.fspath(value))
    meta.set(evaluator_type="coco", **metadata)
