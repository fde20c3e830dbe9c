"""RetinaNet (Lin et al. 2017): backbone + neck + shared head over a feature pyramid, focal loss.

Under data-parallel training the "batch" loss normaliser (foreground anchors) is summed over all
processes, so W processes with N/W images each compute the same update as one process with N
images (see :mod:`detector.modeling.losses.retinanet`).
"""
from typing import List, Sequence

import torch
from torch import nn

from ..anchor_generator import AnchorGenerator
from ..backbone import Backbone, build_backbone
from ..box_coder import BoxCoder
from ..dense_heads import build_dense_head, permute_to_N_HWA_K
from ..losses import check_retinanet_loss_options, retinanet_losses
from ..matcher import Matcher
from ..neck import build_neck
from ..postprocessing import detections_to_outputs, retinanet_inference
from .build import META_ARCH_REGISTRY
from .dense_detector import DenseDetector, channels_last_is_safe

__all__ = ["RetinaNet"]


@META_ARCH_REGISTRY.register()
class RetinaNet(DenseDetector):
    """Args:
        backbone, neck, head, anchor_generator: the networks and the anchor source; the neck's
            ``output_shape()`` levels are fed to the head in increasing order.
        box_coder, anchor_matcher: delta encoding and anchor-to-gt assignment.
        num_classes: foreground classes; ``gt_classes`` must lie in [0, num_classes).
        pixel_mean, pixel_std: per-channel normalisation of the 0-255 input.
        size_divisibility: pad batches to a multiple of this (0 = the largest pyramid stride).
        focal_loss_alpha, focal_loss_gamma, bbox_reg_loss_type, smooth_l1_beta, loss_normalization:
            see :func:`detector.modeling.losses.retinanet_losses`.
        score_thresh_test, topk_candidates_test, nms_thresh_test, max_detections_per_image: see
            :func:`detector.modeling.postprocessing.retinanet_inference`.
        channels_last_inference: run inference in channels-last memory format.
        channels_last_training: train in channels-last memory format where
            :func:`channels_last_is_safe` allows it; otherwise training stays contiguous. With
            both on, the weights are stored channels-last too.
        fuse_conv_norm: fold fixed norms (FrozenBN, eval-mode BN) into their convs and run
            blocks as fused oneDNN convolutions where nothing is differentiated (see
            :mod:`detector.layers.fused_conv`).
        winograd_conv: run eligible 3x3 convs as Winograd F(2x2, 3x3) on the CPU (see
            :mod:`detector.layers.winograd_conv`).
        crowd_ignore_fraction: see :meth:`DenseDetector.label_anchors`.
    """

    num_classes_key = "MODEL.RETINANET.NUM_CLASSES"

    def __init__(self, *, backbone: Backbone, neck: nn.Module, head: nn.Module,
                 anchor_generator: AnchorGenerator, box_coder: BoxCoder, anchor_matcher: Matcher,
                 num_classes: int, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 size_divisibility: int = 0, focal_loss_alpha: float = 0.25,
                 focal_loss_gamma: float = 2.0, bbox_reg_loss_type: str = "smooth_l1",
                 smooth_l1_beta: float = 0.1, loss_normalization: str = "batch",
                 score_thresh_test: float = 0.05, topk_candidates_test: int = 1000,
                 nms_thresh_test: float = 0.5, max_detections_per_image: int = 100,
                 channels_last_inference: bool = True, channels_last_training: bool = True,
                 fuse_conv_norm: bool = True, winograd_conv: bool = True,
                 crowd_ignore_fraction: float = 0.7):
        super().__init__()
        check_retinanet_loss_options(bbox_reg_loss_type, loss_normalization)
        feature_shapes = self._set_parts(backbone, neck, head, anchor_generator, box_coder,
                                         anchor_matcher)
        self.num_classes = num_classes
        self._set_input_format(pixel_mean, pixel_std, size_divisibility
                               or max(s.stride for s in feature_shapes.values()))
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.bbox_reg_loss_type = bbox_reg_loss_type
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_normalization = loss_normalization
        self.score_thresh_test = score_thresh_test
        self.topk_candidates_test = topk_candidates_test
        self.nms_thresh_test = nms_thresh_test
        self.max_detections_per_image = max_detections_per_image
        self.channels_last_inference = channels_last_inference
        self.channels_last_training = channels_last_training and channels_last_is_safe(
            backbone, neck, head)
        if self.channels_last_training and channels_last_inference:
            # weights in the format of the activations, or every conv call copies them
            for module in (backbone, neck, head):
                module.to(memory_format=torch.channels_last)
        self.fuse_conv_norm = fuse_conv_norm
        self.winograd_conv = winograd_conv
        self._set_crowd_ignore_fraction(crowd_ignore_fraction)

    @classmethod
    def from_config(cls, cfg) -> dict:
        backbone = build_backbone(cfg)
        neck = build_neck(cfg, backbone.output_shape())
        feature_shapes = neck.output_shape()
        anchor_generator = AnchorGenerator(**AnchorGenerator.from_config(cfg, feature_shapes))
        r = cfg.MODEL.RETINANET
        if len(r.IOU_THRESHOLDS) != 2:
            raise ValueError(f"MODEL.RETINANET.IOU_THRESHOLDS={list(r.IOU_THRESHOLDS)} must be "
                             "[background_below, foreground_from]")
        level_shapes = [feature_shapes[n] for n in sorted(feature_shapes, key=lambda n: int(n[1:]))]
        head = build_dense_head(cfg, r.HEAD_NAME, level_shapes,
                                anchor_generator.num_anchors_per_location,
                                key="MODEL.RETINANET.HEAD_NAME")
        return {
            "backbone": backbone,
            "neck": neck,
            "head": head,
            "anchor_generator": anchor_generator,
            "box_coder": BoxCoder(weights=r.BBOX_REG_WEIGHTS),
            "anchor_matcher": Matcher(r.IOU_THRESHOLDS, [0, -1, 1],
                                      allow_low_quality_matches=r.ALLOW_LOW_QUALITY_MATCHES),
            "num_classes": r.NUM_CLASSES,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "size_divisibility": cfg.MODEL.SIZE_DIVISIBILITY,
            "focal_loss_alpha": r.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": r.FOCAL_LOSS_GAMMA,
            "bbox_reg_loss_type": r.BBOX_REG_LOSS_TYPE,
            "smooth_l1_beta": r.SMOOTH_L1_BETA,
            "loss_normalization": r.LOSS_NORMALIZATION,
            "score_thresh_test": r.SCORE_THRESH_TEST,
            "topk_candidates_test": r.TOPK_CANDIDATES_TEST,
            "nms_thresh_test": r.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "channels_last_inference": r.CHANNELS_LAST_INFERENCE,
            "channels_last_training": r.CHANNELS_LAST_TRAINING,
            "fuse_conv_norm": cfg.MODEL.FUSE_CONV_NORM,
            "winograd_conv": cfg.MODEL.WINOGRAD_CONV,
            "crowd_ignore_fraction": cfg.MODEL.CROWD_IGNORE_FRACTION,
        }

    def forward(self, batched_inputs: List[dict]):
        """Training: ``{"loss_cls", "loss_box_reg"}``. Eval: one ``{"instances": Instances}`` per
        image with ``pred_boxes``, ``scores``, ``pred_classes`` at its original height x width."""
        with self.stage("preprocess"):
            images = self.preprocess_image(batched_inputs)
        with self.stage("network"):
            pred_logits, pred_anchor_deltas, features = self.forward_features(images.tensor)
        with self.stage("anchors"):
            anchors = self.anchor_generator(features, images.tensor.shape[-2:])
        # (N, H*W*A, K) and (N, H*W*A, 4) per level, the order of the anchors
        pred_logits = [permute_to_N_HWA_K(x, self.num_classes).float() for x in pred_logits]
        pred_anchor_deltas = [permute_to_N_HWA_K(x, 4).float() for x in pred_anchor_deltas]

        if self.training:
            with self.stage("matching"):
                gt_instances = self._gt_instances(batched_inputs)
                all_anchors = torch.cat(anchors)
                gt_labels, matched_gt_boxes = self.label_anchors(all_anchors, gt_instances)
            with self.stage("loss"):
                return self._losses(pred_logits, pred_anchor_deltas, all_anchors, gt_labels,
                                    matched_gt_boxes)

        with self.stage("postprocess"), self.postprocessing_precision():
            detections = retinanet_inference(
                pred_logits, pred_anchor_deltas, anchors, images.image_sizes,
                box_coder=self.box_coder, score_thresh=self.score_thresh_test,
                topk_candidates=self.topk_candidates_test, nms_thresh=self.nms_thresh_test,
                max_detections=self.max_detections_per_image)
            return detections_to_outputs(detections, batched_inputs)

    def _losses(self, pred_logits, pred_anchor_deltas, all_anchors, gt_labels, matched_gt_boxes):
        return retinanet_losses(
            torch.cat(pred_logits, dim=1), torch.cat(pred_anchor_deltas, dim=1), all_anchors,
            gt_labels, matched_gt_boxes, num_classes=self.num_classes, box_coder=self.box_coder,
            focal_alpha=self.focal_loss_alpha, focal_gamma=self.focal_loss_gamma,
            bbox_reg_loss_type=self.bbox_reg_loss_type, smooth_l1_beta=self.smooth_l1_beta,
            normalization=self.loss_normalization,
            normalizer=(self.loss_normalizer(gt_labels, plus_one=False)
                        if self.loss_normalization == "batch" else None))

    def _channels_last_input(self) -> bool:
        # faster oneDNN convolutions, forward and backward
        return self.channels_last_training if self.training else self.channels_last_inference
