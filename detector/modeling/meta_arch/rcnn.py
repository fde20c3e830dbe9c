"""Two-stage detectors (Faster / Mask R-CNN, He et al. 2017): backbone + neck, a proposal
generator (the RPN) and RoI heads (box, and mask with MODEL.MASK_ON).

With weights converted from torchvision's ``maskrcnn_resnet50_fpn``
(tools/convert_torchvision_maskrcnn.py) and configs/mask_rcnn/mask_rcnn_R_50_FPN_torchvision.yaml it
computes torchvision's proposals, detections, masks and losses.
"""
from typing import List, Optional, Sequence

import torch
from torch import nn

from detector.utils import comm

from ..backbone import Backbone, build_backbone
from ..neck import build_neck
from ..postprocessing import detections_to_outputs
from ..proposal_generator import build_proposal_generator
from ..roi_heads import build_roi_heads
from ..sampling import SamplingRNG
from .base import DetectorBase
from .build import META_ARCH_REGISTRY

__all__ = ["GeneralizedRCNN"]


@META_ARCH_REGISTRY.register()
class GeneralizedRCNN(DetectorBase):
    """Args:
        backbone, neck: the feature pyramid (``p2``..``p6`` for Mask R-CNN-FPN).
        proposal_generator: ``(image_sizes, features, gt_instances, *, padded_size, generator)
            -> (proposals, losses)``.
        roi_heads: ``(image_sizes, features, proposals, gt_instances, *, generator) -> (results,
            losses)``.
        num_classes: foreground classes; ``gt_classes`` must lie in [0, num_classes).
        pixel_mean, pixel_std: per-channel normalisation of the 0-255 input.
        size_divisibility: pad batches to a multiple of this (torchvision: 32).
        mask_threshold: pasted mask probabilities above this are the object.
        sampling_seed: seed of ``sampling_rng``, the same in every process (None: torch's
            initial seed of this process; the streams then differ per run).

    Attributes:
        sampling_rng: the :class:`SamplingRNG` the RPN's and the RoI heads' training-time
            sampling draws from, a fresh generator per step and process; a trainer checkpoints
            it (``state_dict`` / ``load_state_dict``) so that a resumed run samples as an
            uninterrupted one.
    """

    num_classes_key = "MODEL.ROI_HEADS.NUM_CLASSES"

    def __init__(self, *, backbone: Backbone, neck: nn.Module, proposal_generator: nn.Module,
                 roi_heads: nn.Module, num_classes: int, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], size_divisibility: int = 32,
                 mask_threshold: float = 0.5, sampling_seed: Optional[int] = None):
        super().__init__()
        self.backbone, self.neck = backbone, neck
        self.proposal_generator, self.roi_heads = proposal_generator, roi_heads
        self.num_classes = num_classes
        self.mask_threshold = mask_threshold
        self.sampling_rng = SamplingRNG(torch.initial_seed() if sampling_seed is None
                                        else sampling_seed)
        max_stride = max(s.stride for s in neck.output_shape().values())
        self._set_input_format(pixel_mean, pixel_std, size_divisibility or max_stride)

    @classmethod
    def from_config(cls, cfg) -> dict:
        backbone = build_backbone(cfg)
        neck = build_neck(cfg, backbone.output_shape())
        feature_shapes = neck.output_shape()
        return {
            "backbone": backbone,
            "neck": neck,
            "proposal_generator": build_proposal_generator(cfg, feature_shapes),
            "roi_heads": build_roi_heads(cfg, feature_shapes),
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "size_divisibility": cfg.MODEL.SIZE_DIVISIBILITY,
            "mask_threshold": cfg.MODEL.ROI_MASK_HEAD.PASTE_THRESHOLD,
            # alike on every rank (SamplingRNG derives the per-rank streams)
            "sampling_seed": cfg.SEED if cfg.SEED >= 0 else None,
        }

    def forward(self, batched_inputs: List[dict]):
        """Training: the RPN's and the RoI heads' losses. Eval: one ``{"instances": Instances}``
        per image with ``pred_boxes``, ``scores``, ``pred_classes`` (and ``pred_masks`` (R, H, W)
        bool with MODEL.MASK_ON) at its original height x width."""
        images = self.preprocess_image(batched_inputs)
        features = self.neck(self.backbone(images.tensor))
        gt_instances, generator = None, None
        if self.training:
            gt_instances = self._gt_instances(batched_inputs)
            generator = self.sampling_rng.step_generator(self.device, comm.get_rank(),
                                                         comm.get_world_size())
        proposals, proposal_losses = self.proposal_generator(
            images.image_sizes, features, gt_instances, padded_size=tuple(images.tensor.shape[-2:]),
            generator=generator)
        results, detector_losses = self.roi_heads(images.image_sizes, features, proposals,
                                                  gt_instances, generator=generator)
        if self.training:
            return {**proposal_losses, **detector_losses}
        return detections_to_outputs(results, batched_inputs, mask_threshold=self.mask_threshold)
