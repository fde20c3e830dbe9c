"""Pictures of what the model sees and predicts: ``Instances`` and dataset annotations turned into
the arrays of :func:`detector.utils.visualizer.draw_instances`, side-by-side ground truth |
prediction images, and the ``EvalImages`` hook that puts such images of a few fixed validation
images into TensorBoard after every evaluation."""
import logging
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_util

from detector.data import DatasetCatalog, DatasetMapper, MetadataCatalog, read_image
from detector.structures import BitMasks, PolygonMasks
from detector.utils import comm
from detector.utils.visualizer import draw_instances, hstack_images, scale_for_display

from .hooks import EvalHook
from .train_loop import HookBase

__all__ = ["instances_to_arrays", "annotations_to_arrays", "draw_ground_truth_and_predictions",
           "EvalImages"]

logger = logging.getLogger(__name__)


def _masks_to_numpy(masks, height: int, width: int) -> np.ndarray:
    """(N, H, W) bool from BitMasks, PolygonMasks (rasterised at H x W) or a mask tensor
    ((N, H, W) bool or (N, 1, H, W) probabilities, thresholded at 0.5)."""
    if isinstance(masks, PolygonMasks):
        masks = masks.to_bitmasks(height, width)
    if isinstance(masks, BitMasks):
        masks = masks.tensor
    array = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if array.ndim == 4:
        array = array[:, 0]
    return array > 0.5 if array.dtype != bool else array


def instances_to_arrays(instances) -> Dict[str, Optional[np.ndarray]]:
    """``boxes``, ``classes``, ``scores`` and ``masks`` numpy arrays (keyword arguments of
    ``draw_instances``) of predictions (``pred_boxes``, ``pred_classes``, ``scores``,
    ``pred_masks``) or ground truth (``gt_boxes``, ``gt_classes``, ``gt_masks``). Fields that
    are absent are None; polygon masks are rasterised at the instances' image size."""
    height, width = instances.image_size
    prefix = "pred" if instances.has("pred_boxes") else "gt"
    if not instances.has(f"{prefix}_boxes"):
        raise ValueError(f"instances_to_arrays: Instances has neither pred_boxes nor gt_boxes "
                         f"(fields: {sorted(instances.get_fields())})")
    boxes = instances.get(f"{prefix}_boxes").tensor.detach().cpu().float().numpy()
    classes = instances.get(f"{prefix}_classes").detach().cpu().numpy().astype(np.int64)
    scores = (instances.scores.detach().cpu().float().numpy()
              if prefix == "pred" and instances.has("scores") else None)
    masks = (_masks_to_numpy(instances.get(f"{prefix}_masks"), height, width)
             if instances.has(f"{prefix}_masks") else None)
    return {"boxes": boxes, "classes": classes, "scores": scores, "masks": masks}


def _segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """One (H, W) bool mask from COCO polygons or an RLE (compressed or not)."""
    if isinstance(segmentation, dict):
        rle = segmentation
        if isinstance(rle.get("counts"), list):  # uncompressed RLE
            rle = mask_util.frPyObjects(rle, height, width)
    else:
        polygons = [np.asarray(p, dtype=np.float64).ravel().tolist() for p in segmentation]
        polygons = [p for p in polygons if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    return mask_util.decode(rle).astype(bool)


def annotations_to_arrays(annotations: Sequence[dict], height: int,
                          width: int) -> Dict[str, Optional[np.ndarray]]:
    """The ``draw_instances`` arrays of a dataset dict's ``annotations`` (XYXY ``bbox``,
    contiguous ``category_id``, optional ``segmentation``) on an ``height`` x ``width`` image.
    ``masks`` is None when no annotation has a segmentation (an empty mask for those without)."""
    boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
    classes = np.array([a["category_id"] for a in annotations], dtype=np.int64)
    masks = None
    if any(a.get("segmentation") for a in annotations):
        masks = np.zeros((len(annotations), height, width), dtype=bool)
        for i, ann in enumerate(annotations):
            if ann.get("segmentation"):
                masks[i] = _segmentation_to_mask(ann["segmentation"], height, width)
    return {"boxes": boxes, "classes": classes, "scores": None, "masks": masks}


def draw_ground_truth_and_predictions(image: np.ndarray, ground_truth: Dict, predictions: Dict,
                                      class_names: Optional[Sequence[str]] = None,
                                      score_threshold: float = 0.0,
                                      scale: float = 1.0) -> np.ndarray:
    """``image`` (H, W, 3) uint8 RGB drawn twice, side by side: the ground truth arrays on the
    left, the predictions above ``score_threshold`` on the right; (H, 2W + 4, 3), or of the
    image enlarged by ``scale`` (for readable labels on small images)."""
    gt_image, ground_truth = scale_for_display(image, scale, **ground_truth)
    pred_image, predictions = scale_for_display(image, scale, **predictions)
    left = draw_instances(gt_image, class_names=class_names, **ground_truth)
    right = draw_instances(pred_image, class_names=class_names, score_threshold=score_threshold,
                           **predictions)
    return hstack_images([left, right])


class EvalImages(HookBase):
    """After each evaluation of ``eval_hook``, runs the evaluated model on the first
    ``num_images`` images of a dataset and queues ground truth | prediction pictures in the
    event storage (``put_image``), which the TensorBoard writer writes as
    ``<tag>/<image_id>`` at that iteration. Register it after ``eval_hook``, on the main
    process only (the other ranks do not wait for it: no collectives are run).

    Args:
        eval_hook: the EvalHook whose evaluations trigger the pictures.
        model_fn: returns the model to run (the one that was evaluated: the EMA copy if any).
        dataset_name: a registered dataset; its first ``num_images`` dicts are drawn.
        mapper: maps a dataset dict to the model's input (the test ``DatasetMapper``).
        num_images: how many images; 0 disables the hook.
        score_threshold: predictions below it are not drawn.
        tag: the TensorBoard tag prefix.
    """

    def __init__(self, eval_hook: EvalHook, *, model_fn: Callable[[], torch.nn.Module],
                 dataset_name: str, mapper: Callable[[dict], dict], num_images: int,
                 score_threshold: float = 0.5, tag: str = "eval_images"):
        if num_images < 0:
            raise ValueError(f"EvalImages: num_images (TEST.VIS_NUM_IMAGES) must be >= 0, "
                             f"got {num_images}")
        self.eval_hook = eval_hook
        self.model_fn = model_fn
        self.dataset_name = dataset_name
        self.mapper = mapper
        self.num_images = int(num_images)
        self.score_threshold = float(score_threshold)
        self.tag = tag
        self.num_failed = 0
        self._dicts: Optional[List[dict]] = None
        self._seen_iteration: Optional[int] = None

    @classmethod
    def from_config(cls, cfg, eval_hook: EvalHook, model_fn: Callable[[], torch.nn.Module]):
        """On DATASETS.TEST[0] with TEST.VIS_NUM_IMAGES images and the test mapper."""
        return cls(eval_hook, model_fn=model_fn, dataset_name=cfg.DATASETS.TEST[0],
                   mapper=DatasetMapper(**DatasetMapper.from_config(cfg, is_train=False)),
                   num_images=cfg.TEST.VIS_NUM_IMAGES)

    def before_train(self):
        self._seen_iteration = None

    def after_step(self):
        self._check_new_evaluation()

    def after_train(self):
        self._check_new_evaluation()

    def _check_new_evaluation(self) -> None:
        iteration = self.eval_hook.last_iteration
        if self.num_images == 0 or iteration is None or iteration == self._seen_iteration:
            return
        self._seen_iteration = iteration
        self.put_images()

    def _dataset_dicts(self) -> List[dict]:
        if self._dicts is None:
            self._dicts = list(DatasetCatalog.get(self.dataset_name)[:self.num_images])
        return self._dicts

    def draw(self, model: torch.nn.Module, dataset_dict: dict) -> np.ndarray:
        """Ground truth | prediction picture of one dataset dict, (H, 2W + 4, 3) uint8 RGB."""
        inputs = self.mapper(dataset_dict)
        outputs = model([inputs])[0]["instances"].to(torch.device("cpu"))
        image = read_image(dataset_dict["file_name"], "RGB")
        height, width = image.shape[:2]
        ground_truth = annotations_to_arrays(dataset_dict.get("annotations", []), height, width)
        class_names = MetadataCatalog.get(self.dataset_name).get("thing_classes")
        return draw_ground_truth_and_predictions(
            image, ground_truth, instances_to_arrays(outputs), class_names,
            score_threshold=self.score_threshold)

    def put_images(self) -> None:
        """Run the model on the images and queue their pictures in the trainer's storage."""
        model = comm.unwrap_model(self.model_fn())
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for dataset_dict in self._dataset_dicts():
                    try:
                        picture = self.draw(model, dataset_dict)
                    except (OSError, ValueError, RuntimeError) as err:
                        # a picture is not worth stopping the training for; say which failed
                        self.num_failed += 1
                        logger.warning("EvalImages: no picture of image %s of '%s' (%d failed "
                                       "so far): %s", dataset_dict.get("image_id"),
                                       self.dataset_name, self.num_failed, err)
                        continue
                    tensor = torch.from_numpy(np.ascontiguousarray(picture.transpose(2, 0, 1)))
                    self.trainer.storage.put_image(
                        f"{self.tag}/{dataset_dict.get('image_id')}", tensor)
        finally:
            model.train(was_training)
