"""COCO-style evaluation of model outputs: boxes (and masks) to COCO results, then COCOeval."""
import contextlib
import gc
import itertools
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from detector.structures import Instances
from detector.utils import comm

from .coco_backend import (
    STAT_NAMES,
    build_coco_api,
    build_results_api,
    check_backend,
    check_iou_type,
    run_coco_eval,
)
from .coco_json import (
    CocoResultArrays,
    category_names,
    check_coco_gt,
    check_result_arrays,
    coco_results_json,
    float32_decimals,
    load_json_file,
    stats_to_percent,
    zero_stats,
)
from .evaluator import DatasetEvaluator

__all__ = [
    "COCOEvaluator", "instances_to_arrays", "instances_to_coco_json", "load_checked_gt",
    "RESULTS_FILE_NAME",
]

logger = logging.getLogger(__name__)

RESULTS_FILE_NAME = "coco_instances_results.json"


def _float32_values(array: np.ndarray) -> List[float]:
    """Python floats of the shortest decimals that give back the same float32 values."""
    return float32_decimals(array).values.tolist()


def _check_fields(instances: Instances, image_id: int):
    for name in ("pred_boxes", "scores", "pred_classes"):
        if not instances.has(name):
            raise ValueError(f"image_id {image_id}: predicted Instances lack '{name}' "
                             f"(fields: {sorted(instances.get_fields())})")


def _dataset_id_table(contiguous_id_to_dataset_id: Dict[int, int]) -> np.ndarray:
    """Dataset category id indexed by contiguous class; -1 for classes the map lacks."""
    ids = {int(k): int(v) for k, v in contiguous_id_to_dataset_id.items()}
    if any(k < 0 for k in ids):
        raise ValueError(f"contiguous_id_to_dataset_id has negative classes: {sorted(ids)}")
    table = np.full(max(ids, default=-1) + 1, -1, dtype=np.int64)
    for contiguous, dataset_id in ids.items():
        table[contiguous] = dataset_id
    return table


def instances_to_arrays(instances: Instances, image_id: int,
                        dataset_ids: np.ndarray) -> CocoResultArrays:
    """One image's predictions as COCO result arrays: XYWH float32 boxes, scores, dataset
    category ids (``dataset_ids[contiguous class]``, see :func:`_dataset_id_table`) and, with
    ``pred_masks``, one RLE each."""
    num = len(instances)
    if num == 0:
        return CocoResultArrays.empty(with_masks=instances.has("pred_masks"))
    _check_fields(instances, image_id)
    boxes = instances.pred_boxes.tensor.detach().cpu().float().numpy()
    boxes_xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    scores = instances.scores.detach().cpu().float().numpy().reshape(num)
    classes = instances.pred_classes.detach().cpu().numpy().astype(np.int64).reshape(num)
    unknown = (classes < 0) | (classes >= len(dataset_ids))
    unknown[~unknown] = dataset_ids[classes[~unknown]] < 0
    if unknown.any():
        raise ValueError(f"image_id {image_id}: predicted class {int(classes[unknown][0])} has no "
                         f"entry in contiguous_id_to_dataset_id (known: "
                         f"{np.flatnonzero(dataset_ids >= 0).tolist()})")
    masks_rle = None
    if instances.has("pred_masks"):
        masks_rle = _encode_masks(instances.pred_masks, image_id)
    return CocoResultArrays(np.full(num, image_id, dtype=np.int64), boxes_xywh, scores,
                            dataset_ids[classes], masks_rle)


def _result_records(results: CocoResultArrays, box_values: np.ndarray,
                    score_values: np.ndarray) -> List[dict]:
    """COCO results records of ``results`` with the given float64 values, as the results file
    holds them (with the segmentation RLE when the results have one)."""
    columns = [results.image_ids.tolist(), results.category_ids.tolist(),
               box_values.reshape(-1, 4).tolist(), score_values.tolist()]
    if results.segmentations is None:
        return [{"image_id": i, "category_id": c, "bbox": b, "score": s}
                for i, c, b, s in zip(*columns)]
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s, "segmentation": m}
            for i, c, b, s, m in zip(*columns, results.segmentations)]


def _result_annotations(results: CocoResultArrays, box_values: np.ndarray,
                        score_values: np.ndarray, iou_type: str) -> List[dict]:
    """The annotations ``loadRes`` would make of the records of ``results`` for ``iou_type``
    (see ``build_results_api``): bbox records get area w * h; segm records (no box, so that the
    mask decides the size range) get the mask's area and bounding box."""
    from pycocotools import mask as mask_util

    ids, categories = results.image_ids.tolist(), results.category_ids.tolist()
    scores = score_values.tolist()
    numbers = range(1, len(ids) + 1)
    if iou_type == "bbox":
        boxes = box_values.reshape(-1, 4)
        areas = (boxes[:, 2] * boxes[:, 3]).tolist()
        return [{"image_id": i, "category_id": c, "bbox": b, "score": s, "area": a, "id": n,
                 "iscrowd": 0}
                for i, c, b, s, a, n in zip(ids, categories, boxes.tolist(), scores, areas,
                                            numbers)]
    masks = results.segmentations
    # pycocotools' area() fails on lists longer than 255 under numpy 2 (a uint8 length)
    areas = [area for k in range(0, len(masks), 255)
             for area in mask_util.area(masks[k:k + 255]).tolist()]
    boxes = list(mask_util.toBbox(masks))
    return [{"image_id": i, "category_id": c, "segmentation": m, "score": s, "area": a,
             "bbox": b, "id": n, "iscrowd": 0}
            for i, c, m, s, a, b, n in zip(ids, categories, masks, scores, areas, boxes, numbers)]


def instances_to_coco_json(instances: Instances, image_id: int,
                           contiguous_id_to_dataset_id: Dict[int, int]) -> List[dict]:
    """COCO results records (``bbox`` XYWH, ``score``, dataset ``category_id``) of one image's
    predictions; a ``segmentation`` RLE is added when the instances have ``pred_masks``.

    Float values are the shortest decimals of the float32 outputs, as in the results file."""
    if len(instances) == 0:
        return []
    results = instances_to_arrays(instances, image_id,
                                  _dataset_id_table(contiguous_id_to_dataset_id))
    return _result_records(results, float32_decimals(results.boxes_xywh).values,
                           float32_decimals(results.scores).values)


def _encode_masks(masks: torch.Tensor, image_id: int) -> List[dict]:
    """RLEs of one image's masks, in one batched ``mask_util.encode`` call."""
    from pycocotools import mask as mask_util

    masks = masks.detach().cpu()
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"image_id {image_id}: pred_masks must be (N, H, W), "
                         f"got {tuple(masks.shape)}")
    binary = (masks >= 0.5) if masks.is_floating_point() else masks.bool()
    # (N, W, H) C-contiguous uint8 is the (H, W, N) Fortran-order array encode() wants
    stacked = binary.transpose(1, 2).contiguous().numpy().view(np.uint8).transpose(2, 1, 0)
    encoded = mask_util.encode(stacked)
    for rle in encoded:
        rle["counts"] = rle["counts"].decode("ascii")  # json needs str
    return list(encoded)


def _format_category_table(aps: Dict[str, float], columns: int = 3) -> str:
    """A plain-text table of per-category AP, ``columns`` (name, AP) pairs per row."""
    cells = [(name, "nan" if np.isnan(ap) else f"{ap:.3f}") for name, ap in aps.items()]
    if not cells:
        return "(no categories)"
    name_w = max(8, max(len(n) for n, _ in cells))
    ap_w = max(5, max(len(a) for _, a in cells))
    per_row = min(columns, len(cells))
    header = " | ".join(f"{'category':<{name_w}} | {'AP':<{ap_w}}" for _ in range(per_row))
    rule = "-|-".join(f"{'-' * name_w}-|-{'-' * ap_w}" for _ in range(per_row))
    rows = [f"| {header} |", f"|-{rule}-|"]
    for start in range(0, len(cells), per_row):
        chunk = cells[start: start + per_row]
        chunk += [("", "")] * (per_row - len(chunk))
        rows.append("| " + " | ".join(f"{n:<{name_w}} | {a:<{ap_w}}" for n, a in chunk) + " |")
    return "\n".join(rows)


@contextlib.contextmanager
def _gc_paused():
    """Cyclic garbage collection paused. Evaluation builds and indexes ~10 small dicts and lists
    per detection; each allocation burst would trigger full collections that traverse every
    live object (seconds per 500k detections). These objects hold no reference cycles, so
    reference counting frees them all the same."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# (path, mtime, size) -> checked ground truth of the last file loaded; periodic evaluations
# during training then parse the (possibly large) json once, not once per evaluation
_GT_CACHE: Dict[Tuple[str, int, int], dict] = {}


def load_checked_gt(gt_json: str, iou_type: str = "bbox") -> dict:
    """The checked ground-truth dict of ``gt_json`` (see ``check_coco_gt``). The last file read
    is kept in memory and reused while its modification time and size are unchanged."""
    try:
        stat = os.stat(gt_json)
    except FileNotFoundError:
        raise FileNotFoundError(f"ground-truth file not found: {gt_json}") from None
    key = (os.path.abspath(gt_json), stat.st_mtime_ns, stat.st_size)
    gt = _GT_CACHE.get(key)
    if gt is None:
        gt = load_json_file(gt_json, "ground-truth")
        _GT_CACHE.clear()
    # checks are cheap next to parsing; segm needs more than bbox, so always run them
    gt = check_coco_gt(gt, gt_json, iou_type)
    _GT_CACHE[key] = gt
    return gt


class COCOEvaluator(DatasetEvaluator):
    """Collects predictions as COCO result arrays and evaluates them with COCOeval.

    Predictions stay numpy arrays per image (also through the distributed gather); the
    ``coco_instances_results.json`` written for the user is encoded from them, and the
    evaluation gets the same values in memory instead of reading that file back.

    ``evaluate()`` returns ``{iou_type: {"AP", "AP50", ..., "ARl", "AP-<class>"}}`` in percent
    (NaN where COCOeval reports a metric as undefined, e.g. no small objects in the ground
    truth). Only the images that were processed are evaluated, so a partial pass over a dataset
    gives the AP of that subset.
    """

    def __init__(self, *, gt_json: str, contiguous_id_to_dataset_id: Dict[int, int],
                 class_names: Optional[List[str]] = None, output_dir: Optional[str] = None,
                 backend: str = "faster_coco_eval", iou_types: Sequence[str] = ("bbox",),
                 distributed: bool = True):
        """
        Args:
            gt_json: COCO instances json of the evaluated images.
            contiguous_id_to_dataset_id: model class index -> COCO ``category_id``.
            class_names: name per contiguous class for the per-category results; default: the
                category names of ``gt_json``.
            output_dir: where ``coco_instances_results.json`` is written (nothing when None).
            backend: "faster_coco_eval" (default) or "pycocotools"; both give the same numbers.
            iou_types: any of "bbox", "segm" (segm needs ``pred_masks`` in the outputs).
            distributed: gather predictions from every process to rank 0 before evaluating.
        """
        self._backend = check_backend(backend)
        self._iou_types = tuple(check_iou_type(t) for t in iou_types)
        if not self._iou_types:
            raise ValueError("COCOEvaluator needs at least one iou_type")
        if not os.path.isfile(gt_json):
            raise FileNotFoundError(f"COCOEvaluator: ground-truth json not found: {gt_json}")
        self._gt_json = gt_json
        self._id_map = {int(k): int(v) for k, v in contiguous_id_to_dataset_id.items()}
        if sorted(self._id_map) != list(range(len(self._id_map))):
            raise ValueError(f"COCOEvaluator: contiguous_id_to_dataset_id keys must be "
                             f"0..{len(self._id_map) - 1}, got {sorted(self._id_map)}")
        self._dataset_ids = _dataset_id_table(self._id_map)
        if class_names is not None and len(class_names) != len(self._id_map):
            raise ValueError(f"COCOEvaluator: {len(class_names)} class_names for "
                             f"{len(self._id_map)} entries of contiguous_id_to_dataset_id")
        self._class_names = list(class_names) if class_names is not None else None
        self._output_dir = output_dir
        self._distributed = distributed
        self._gt = None  # checked dict, loaded on first evaluate()
        self._coco_gt = None
        self.reset()

    def reset(self):
        # (image_id, that image's result arrays), in processing order
        self._predictions: List[Tuple[int, CocoResultArrays]] = []

    def process(self, inputs, outputs):
        if len(inputs) != len(outputs):
            raise ValueError(f"COCOEvaluator.process: {len(inputs)} inputs but "
                             f"{len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            if "image_id" not in inp:
                raise ValueError(f"COCOEvaluator.process: input without 'image_id' "
                                 f"(keys: {sorted(inp)}, file_name {inp.get('file_name', '?')})")
            image_id = int(inp["image_id"])
            arrays = CocoResultArrays.empty()
            if "instances" in out:
                arrays = instances_to_arrays(out["instances"], image_id, self._dataset_ids)
            self._predictions.append((image_id, arrays))

    def _gathered_predictions(self) -> Optional[List[Tuple[int, CocoResultArrays]]]:
        if not self._distributed or comm.get_world_size() == 1:
            return self._predictions
        per_rank = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return None
        return list(itertools.chain(*per_rank))

    def evaluate(self):
        predictions = self._gathered_predictions()
        if predictions is None:
            return {}
        predictions = self._drop_duplicate_images(predictions)
        results = CocoResultArrays.concatenate([arrays for _, arrays in predictions])
        image_ids = sorted({image_id for image_id, _ in predictions})
        gt = self._load_gt()
        unknown = sorted(set(image_ids) - {img["id"] for img in gt["images"]})
        if unknown:
            raise ValueError(f"COCOEvaluator: {len(unknown)} evaluated image id(s) are not in "
                             f"{self._gt_json}, e.g. {unknown[:5]}")
        check_result_arrays(results, gt, "predictions")
        # the decimals of the float32 outputs: the file's text and the evaluated values
        boxes = float32_decimals(results.boxes_xywh)
        scores = float32_decimals(results.scores)
        if self._output_dir:
            self._write_results(coco_results_json(results, boxes, scores), len(results))
        if not len(results):
            logger.warning("COCOEvaluator: no detections on %d image(s); every metric is reported "
                           "as 0", len(image_ids))
            return {t: self._zero_results() for t in self._iou_types}
        if len(image_ids) < len(gt["images"]):
            logger.info("Evaluating %d of the %d images in %s", len(image_ids), len(gt["images"]),
                        self._gt_json)
        with _gc_paused():
            return {t: self._evaluate_task(t, results, boxes.values, scores.values, image_ids)
                    for t in self._iou_types}

    def _drop_duplicate_images(self, predictions):
        # padded distributed samplers can run an image twice; duplicates would count as false
        # positives
        seen, kept = set(), []
        for image_id, arrays in predictions:
            if image_id not in seen:
                seen.add(image_id)
                kept.append((image_id, arrays))
        if len(kept) < len(predictions):
            logger.warning("COCOEvaluator: dropped %d duplicate prediction(s) of already evaluated "
                           "images", len(predictions) - len(kept))
        return kept

    def _write_results(self, text: bytes, num_results: int):
        os.makedirs(self._output_dir, exist_ok=True)
        path = os.path.join(self._output_dir, RESULTS_FILE_NAME)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(text)
        os.replace(tmp, path)
        logger.info("Saved %d COCO results to %s", num_results, path)

    def _load_gt(self) -> dict:
        if self._gt is None:
            gt = load_checked_gt(self._gt_json, "segm" if "segm" in self._iou_types else "bbox")
            gt_cat_ids = {c["id"] for c in gt["categories"]}
            for contiguous, dataset_id in sorted(self._id_map.items()):
                if dataset_id not in gt_cat_ids:
                    raise ValueError(f"COCOEvaluator: category id {dataset_id} (contiguous "
                                     f"{contiguous}) is not a category of {self._gt_json}")
            self._gt = gt
            self._coco_gt = build_coco_api(gt, self._backend)
        return self._gt

    def _category_names(self) -> Dict[int, str]:
        names = category_names(self._gt)
        if self._class_names is not None:
            for contiguous, dataset_id in self._id_map.items():
                names[dataset_id] = self._class_names[contiguous]
        return names

    def _zero_results(self) -> Dict[str, float]:
        results = dict(zip(STAT_NAMES, zero_stats()))
        results.update({f"AP-{name}": 0.0 for name in self._category_names().values()})
        return results

    def _evaluate_task(self, iou_type: str, arrays: CocoResultArrays, box_values: np.ndarray,
                       score_values: np.ndarray, image_ids: List[int]):
        if iou_type == "segm" and arrays.segmentations is None:
            raise ValueError("COCOEvaluator: 'segm' evaluation needs pred_masks in the outputs")
        annotations = _result_annotations(arrays, box_values, score_values, iou_type)
        coco_dt = build_results_api(self._coco_gt, annotations, self._backend)
        run = run_coco_eval(self._coco_gt, coco_dt, iou_type, self._backend, img_ids=image_ids)
        logger.info("COCO %s evaluation (%s): evaluate %.2fs, accumulate %.2fs\n%s", iou_type,
                    self._backend, run.timings["evaluate"], run.timings["accumulate"],
                    "\n".join(run.summary_lines))
        results = stats_to_percent(run.stats)
        names = self._category_names()
        per_category = {names[cat_id]: ap * 100.0 for cat_id, ap in run.per_category_ap.items()}
        logger.info("Per-category %s AP:\n%s", iou_type, _format_category_table(per_category))
        results.update({f"AP-{name}": ap for name, ap in per_category.items()})
        return results

