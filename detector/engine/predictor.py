"""Run a trained model on image arrays from Python: config + weights -> ``Instances``."""
import logging

import numpy as np
import torch

from detector.data import DatasetMapper
from detector.data.transforms import apply_augmentations
# the evaluation's autocast rule, so AMP predictions equal tools/test_net.py's
from detector.evaluation.evaluator import inference_autocast

from .defaults import DefaultTrainer

__all__ = ["DefaultPredictor"]


class DefaultPredictor:
    """The model of ``cfg`` with the weights of ``cfg.MODEL.WEIGHTS`` (the EMA weights with
    SOLVER.EMA.ENABLED, as ``tools/test_net.py`` evaluates), in eval mode, called on one image::

        predictor = DefaultPredictor(cfg)
        instances = predictor(image)   # (H, W, 3) uint8 in cfg.INPUT.FORMAT

    The image is resized as the test loader's ``DatasetMapper`` does (the config's test
    augmentations), and the predictions come back in the image's own pixel coordinates, on the
    CPU: ``pred_boxes`` (absolute XYXY), ``scores``, ``pred_classes`` (contiguous ids) and
    ``pred_masks`` with MODEL.MASK_ON. A wrong array shape or dtype is a one-line ValueError.
    """

    def __init__(self, cfg):
        if not cfg.MODEL.WEIGHTS:
            raise ValueError("DefaultPredictor: MODEL.WEIGHTS is empty; set it to a trained "
                             "checkpoint (e.g. OUTPUT_DIR/model_final.pth)")
        self.cfg = cfg.clone()
        self.cfg.freeze()
        self.model = DefaultTrainer.build_model(self.cfg)
        DefaultTrainer.load_for_evaluation(self.cfg, self.model, resume=False)
        self.model.eval()
        mapper_kwargs = DatasetMapper.from_config(self.cfg, is_train=False)
        self.augmentations = mapper_kwargs["augmentations"]
        self.input_format = mapper_kwargs["image_format"]
        self.amp = bool(self.cfg.TEST.AMP.ENABLED)
        logging.getLogger("detector").info(
            "DefaultPredictor: %s with weights %s, input format %s",
            self.cfg.MODEL.META_ARCHITECTURE, self.cfg.MODEL.WEIGHTS, self.input_format)

    def _check_image(self, image) -> None:
        if not isinstance(image, np.ndarray):
            raise ValueError(f"DefaultPredictor expects a numpy array (H, W, 3) uint8 in "
                             f"{self.input_format}, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"DefaultPredictor expects an image of shape (H, W, 3) in "
                             f"{self.input_format}, got shape {tuple(image.shape)}")
        if image.dtype != np.uint8:
            raise ValueError(f"DefaultPredictor expects a uint8 image (0-255) in "
                             f"{self.input_format}, got dtype {image.dtype}")

    def __call__(self, original_image: np.ndarray):
        """Predictions for one (H, W, 3) uint8 image in cfg.INPUT.FORMAT ("RGB" or "BGR"):
        ``Instances`` of image size (H, W), on the CPU."""
        self._check_image(original_image)
        height, width = original_image.shape[:2]
        # the test augmentations are deterministic; the generator is only their interface
        image, _ = apply_augmentations(self.augmentations, original_image,
                                       np.random.default_rng(0))
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        inputs = {"image": tensor, "height": int(height), "width": int(width)}
        with torch.no_grad(), inference_autocast(self.model.device, self.amp):
            instances = self.model([inputs])[0]["instances"]
        return instances.to(torch.device("cpu"))
