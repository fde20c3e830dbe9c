"""EfficientDet (Tan et al. 2020): EfficientNet (or any registered backbone) + BiFPN +
separable-conv heads, with effdet's anchors, matching, losses and inference.

With weights converted from effdet's ``tf_efficientdet_d<k>``
(detector/checkpoint/effdet_convert.py) and "same" padding it computes effdet's per-level outputs,
``DetBenchPredict`` detections and ``DetBenchTrain`` losses. Under data parallelism the loss
normaliser counts the foreground anchors of all processes (effdet counts each process's own), so
W processes compute the update of one process seeing the whole batch.
"""
from typing import List, Sequence

import torch
from torch import nn

from ..anchor_generator import AnchorGenerator, efficientdet_anchor_generator
from ..backbone import Backbone, build_backbone
from ..box_coder import BoxCoder
from ..dense_heads import build_dense_head, permute_to_N_HWA_K
from ..losses import EFFICIENTDET_BOX_LOSS_TYPES, efficientdet_losses
from ..matcher import Matcher
from ..neck import build_neck
from ..postprocessing import detections_to_outputs, efficientdet_inference
from .build import META_ARCH_REGISTRY
from .dense_detector import DenseDetector, channels_last_is_safe
from .efficientdet_sizes import resolve_efficientdet_sizes

__all__ = ["EfficientDet"]


@META_ARCH_REGISTRY.register()
class EfficientDet(DenseDetector):
    """Args:
        backbone, neck, head, anchor_generator: the networks and the anchor source.
        box_coder, anchor_matcher: delta encoding and anchor-to-gt assignment.
        num_classes: foreground classes; ``gt_classes`` must lie in [0, num_classes).
        pixel_mean, pixel_std: per-channel normalisation of the 0-255 input.
        size_divisibility: pad batches to a multiple of this (0 = the largest pyramid stride,
            which every BiFPN fusion needs, so any image size works).
        channels_last: run the networks in channels-last memory format (the backbone only when
            :func:`channels_last_is_safe`; its features are converted).
        focal_loss_alpha, focal_loss_gamma, box_loss_type, huber_delta, box_loss_weight,
            giou_loss_weight: see :func:`detector.modeling.losses.efficientdet_losses`.
        score_thresh_test, topk_candidates_test, nms_thresh_test, max_detections_per_image: see
            :func:`detector.modeling.postprocessing.efficientdet_inference`.
        fuse_conv_norm: fold eval-mode norms into the BiFPN and head convs (see
            :mod:`detector.layers.fused_conv`).
        winograd_conv: run eligible 3x3 convs as Winograd F(2x2, 3x3) on the CPU (see
            :mod:`detector.layers.winograd_conv`; EfficientDet's own convs are separable).
        crowd_ignore_fraction: see :meth:`DenseDetector.label_anchors`.
    """

    num_classes_key = "MODEL.EFFICIENTDET.NUM_CLASSES"

    def __init__(self, *, backbone: Backbone, neck: nn.Module, head: nn.Module,
                 anchor_generator: AnchorGenerator, box_coder: BoxCoder, anchor_matcher: Matcher,
                 num_classes: int, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 size_divisibility: int = 0, channels_last: bool = True,
                 focal_loss_alpha: float = 0.25, focal_loss_gamma: float = 1.5,
                 box_loss_type: str = "huber", huber_delta: float = 0.1,
                 box_loss_weight: float = 50.0, giou_loss_weight: float = 1.0,
                 score_thresh_test: float = 0.0, topk_candidates_test: int = 5000,
                 nms_thresh_test: float = 0.5, max_detections_per_image: int = 100,
                 fuse_conv_norm: bool = True, winograd_conv: bool = True,
                 crowd_ignore_fraction: float = 0.7):
        super().__init__()
        self.fuse_conv_norm = fuse_conv_norm
        self.winograd_conv = winograd_conv
        if box_loss_type not in EFFICIENTDET_BOX_LOSS_TYPES:
            raise ValueError(f"MODEL.EFFICIENTDET.BOX_LOSS_TYPE='{box_loss_type}' is not one of "
                             f"{EFFICIENTDET_BOX_LOSS_TYPES}")
        if topk_candidates_test <= 0:
            raise ValueError(f"MODEL.EFFICIENTDET.TOPK_CANDIDATES_TEST={topk_candidates_test} "
                             "must be positive")
        feature_shapes = self._set_parts(backbone, neck, head, anchor_generator, box_coder,
                                         anchor_matcher)
        max_stride = max(s.stride for s in feature_shapes.values())
        if size_divisibility and size_divisibility % max_stride:
            raise ValueError(f"MODEL.SIZE_DIVISIBILITY={size_divisibility} must be a multiple of "
                             f"the largest pyramid stride {max_stride} (BiFPN fusion needs it)")
        self._set_input_format(pixel_mean, pixel_std, size_divisibility or max_stride)
        self.num_classes = num_classes
        self.channels_last = channels_last
        self.focal_loss_alpha, self.focal_loss_gamma = focal_loss_alpha, focal_loss_gamma
        self.box_loss_type, self.huber_delta = box_loss_type, huber_delta
        self.box_loss_weight, self.giou_loss_weight = box_loss_weight, giou_loss_weight
        self.score_thresh_test = score_thresh_test
        self.topk_candidates_test = topk_candidates_test
        self.nms_thresh_test = nms_thresh_test
        self.max_detections_per_image = max_detections_per_image
        self._set_crowd_ignore_fraction(crowd_ignore_fraction)
        self.backbone_channels_last = channels_last and channels_last_is_safe(backbone)
        if channels_last:
            for module in (neck, head) + ((backbone,) if self.backbone_channels_last else ()):
                module.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg) -> dict:
        # the one place the compound coefficient is read: the parts see explicit sizes
        cfg = resolve_efficientdet_sizes(cfg)
        e = cfg.MODEL.EFFICIENTDET
        backbone = build_backbone(cfg)
        neck = build_neck(cfg, backbone.output_shape())
        feature_shapes = neck.output_shape()
        names = sorted(feature_shapes, key=lambda n: int(n[1:]))
        levels = [int(n[1:]) for n in names]
        anchor_generator = efficientdet_anchor_generator(
            min_level=levels[0], max_level=levels[-1], anchor_scale=e.ANCHOR_SCALE,
            num_scales=e.NUM_SCALES, aspect_ratios=e.ASPECT_RATIOS)
        head = build_dense_head(cfg, e.HEAD_NAME, [feature_shapes[n] for n in names],
                                anchor_generator.num_anchors_per_location,
                                key="MODEL.EFFICIENTDET.HEAD_NAME")
        if not 0.0 < e.IOU_THRESHOLD <= 1.0:
            raise ValueError(f"MODEL.EFFICIENTDET.IOU_THRESHOLD={e.IOU_THRESHOLD} must be in "
                             "(0, 1]")
        return {
            "backbone": backbone,
            "neck": neck,
            "head": head,
            "anchor_generator": anchor_generator,
            "box_coder": BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)),
            # IoU >= threshold foreground, else background, plus every gt's best anchor(s)
            "anchor_matcher": Matcher([e.IOU_THRESHOLD], [0, 1], allow_low_quality_matches=True),
            "num_classes": e.NUM_CLASSES,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "size_divisibility": cfg.MODEL.SIZE_DIVISIBILITY,
            "channels_last": e.CHANNELS_LAST,
            "fuse_conv_norm": cfg.MODEL.FUSE_CONV_NORM,
            "winograd_conv": cfg.MODEL.WINOGRAD_CONV,
            "focal_loss_alpha": e.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": e.FOCAL_LOSS_GAMMA,
            "box_loss_type": e.BOX_LOSS_TYPE,
            "huber_delta": e.HUBER_DELTA,
            "box_loss_weight": e.BOX_LOSS_WEIGHT,
            "giou_loss_weight": e.GIOU_LOSS_WEIGHT,
            "score_thresh_test": e.SCORE_THRESH_TEST,
            "topk_candidates_test": e.TOPK_CANDIDATES_TEST,
            "nms_thresh_test": e.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "crowd_ignore_fraction": cfg.MODEL.CROWD_IGNORE_FRACTION,
        }

    def _channels_last_input(self) -> bool:
        return self.backbone_channels_last

    def _channels_last_features(self) -> bool:
        return self.channels_last and not self.backbone_channels_last

    def forward(self, batched_inputs: List[dict]):
        """Training: ``{"loss_cls", "loss_box_reg"}``. Eval: one ``{"instances": Instances}`` per
        image with ``pred_boxes``, ``scores``, ``pred_classes`` at its original height x width."""
        with self.stage("preprocess"):
            images = self.preprocess_image(batched_inputs)
        with self.stage("network"):
            pred_logits, pred_anchor_deltas, features = self.forward_features(images.tensor)
        with self.stage("anchors"):
            anchors = torch.cat(self.anchor_generator(features, images.tensor.shape[-2:]))
        # per level (N, H*W*A, K), in the order of the anchors; views of channels-last outputs
        pred_logits = [permute_to_N_HWA_K(x, self.num_classes).float() for x in pred_logits]
        pred_anchor_deltas = torch.cat([permute_to_N_HWA_K(x, 4) for x in pred_anchor_deltas],
                                       dim=1).float()
        if self.training:
            with self.stage("matching"):
                gt_labels, matched_gt_boxes = self.label_anchors(
                    anchors, self._gt_instances(batched_inputs))
            with self.stage("loss"):
                return self._losses(pred_logits, pred_anchor_deltas, anchors, gt_labels,
                                    matched_gt_boxes)
        with self.stage("postprocess"), self.postprocessing_precision():
            detections = efficientdet_inference(
                pred_logits, pred_anchor_deltas, anchors, images.image_sizes,
                box_coder=self.box_coder, score_thresh=self.score_thresh_test,
                topk_candidates=self.topk_candidates_test, nms_thresh=self.nms_thresh_test,
                max_detections=self.max_detections_per_image)
            return detections_to_outputs(detections, batched_inputs)

    def _losses(self, pred_logits, pred_anchor_deltas, anchors, gt_labels, matched_gt_boxes):
        return efficientdet_losses(
            pred_logits, pred_anchor_deltas, anchors, gt_labels, matched_gt_boxes,
            num_classes=self.num_classes, box_coder=self.box_coder,
            focal_alpha=self.focal_loss_alpha, focal_gamma=self.focal_loss_gamma,
            box_loss_type=self.box_loss_type, huber_delta=self.huber_delta,
            box_loss_weight=self.box_loss_weight, giou_loss_weight=self.giou_loss_weight,
            normalizer=self.loss_normalizer(gt_labels, plus_one=True))
