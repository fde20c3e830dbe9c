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

from detector.utils import comm

from ..anchor_generator import AnchorGenerator
from ..backbone import Backbone, build_backbone
from ..box_coder import BoxCoder
from ..common import norm_options_from_config, permute_to_N_HWA_K
from ..efficientdet_head import EfficientDetHead
from ..efficientdet_losses import EFFICIENTDET_BOX_LOSS_TYPES, efficientdet_losses
from ..efficientdet_postprocessing import efficientdet_inference
from ..efficientdet_scaling import efficientdet_size, scaled_value
from ..matcher import Matcher
from ..neck import build_neck
from ..postprocessing import rescale_detections
from .build import META_ARCH_REGISTRY
from .dense_detector import DenseDetector

__all__ = ["EfficientDet", "efficientdet_anchor_generator"]


def channels_last_is_safe(module: nn.Module) -> bool:
    """False if ``module`` has a strided 1x1 conv (ResNet / TinyNet downsampling): the weight
    gradient of such a conv on channels-last input corrupts memory in torch 2.14's CPU kernels."""
    return not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                   for m in module.modules())


def efficientdet_anchor_generator(*, min_level: int, max_level: int, anchor_scale: float,
                                  num_scales: int, aspect_ratios: Sequence[Sequence[float]]
                                  ) -> AnchorGenerator:
    """effdet's anchors: per level side ``anchor_scale * 2**level * 2**(i / num_scales)`` times
    (width, height) multipliers, centred at ``(j + 0.5) * stride``, ordered scale-major."""
    if anchor_scale <= 0 or num_scales <= 0:
        raise ValueError(f"MODEL.EFFICIENTDET.ANCHOR_SCALE={anchor_scale} and NUM_SCALES="
                         f"{num_scales} must be positive")
    levels = range(min_level, max_level + 1)
    return AnchorGenerator(
        sizes=[[anchor_scale * 2 ** k] for k in levels],
        scales=[2.0 ** (i / num_scales) for i in range(num_scales)],
        ratios=[], strides=[2 ** k for k in levels], offset=0.5,
        aspect_multipliers=aspect_ratios, scale_major=True)


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
            giou_loss_weight: see :func:`detector.modeling.efficientdet_losses.efficientdet_losses`.
        score_thresh_test, topk_candidates_test, nms_thresh_test, max_detections_per_image: see
            :func:`detector.modeling.efficientdet_postprocessing.efficientdet_inference`.
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
                 nms_thresh_test: float = 0.5, max_detections_per_image: int = 100):
        super().__init__()
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
        self.backbone_channels_last = channels_last and channels_last_is_safe(backbone)
        if channels_last:
            for module in (neck, head) + ((backbone,) if self.backbone_channels_last else ()):
                module.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg) -> dict:
        e, coef = cfg.MODEL.EFFICIENTDET, cfg.MODEL.EFFICIENTDET.COMPOUND_COEF
        if coef != -1:
            efficientdet_size(coef)  # one-line error for an unknown coefficient
        backbone = build_backbone(cfg)
        neck = build_neck(cfg, backbone.output_shape())
        feature_shapes = neck.output_shape()
        names = sorted(feature_shapes, key=lambda n: int(n[1:]))
        levels = [int(n[1:]) for n in names]
        anchor_generator = efficientdet_anchor_generator(
            min_level=levels[0], max_level=levels[-1],
            anchor_scale=scaled_value(e.ANCHOR_SCALE, coef, "anchor_scale",
                                      "MODEL.EFFICIENTDET.ANCHOR_SCALE"),
            num_scales=e.NUM_SCALES, aspect_ratios=e.ASPECT_RATIOS)
        channels = {s.channels for s in feature_shapes.values()}
        if len(channels) != 1:
            raise ValueError(f"EfficientDet's shared head needs equal channels on every level, "
                             f"the neck gives {feature_shapes}")
        head = EfficientDetHead(
            in_channels=channels.pop(), num_levels=len(levels),
            num_anchors=anchor_generator.num_anchors_per_location, num_classes=e.NUM_CLASSES,
            num_convs=scaled_value(e.NUM_HEAD_CONVS, coef, "head_convs",
                                   "MODEL.EFFICIENTDET.NUM_HEAD_CONVS"),
            norm=e.HEAD_NORM, act=e.HEAD_ACT, padding_mode=e.PADDING,
            redundant_bias=e.REDUNDANT_BIAS, prior_prob=e.PRIOR_PROB,
            drop_path_rate=e.HEAD_DROP_PATH_RATE, **norm_options_from_config(cfg))
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
        }

    def forward_features(self, images: torch.Tensor):
        """Raw per-level head outputs ``(pred_logits, pred_anchor_deltas)`` of a normalised,
        padded (N, 3, H, W) batch, and the feature maps."""
        if self.backbone_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images)
        if self.channels_last and not self.backbone_channels_last:
            features = {k: v.contiguous(memory_format=torch.channels_last)
                        for k, v in features.items()}
        features = self.neck(features)
        features = [features[name] for name in self.in_features]
        pred_logits, pred_anchor_deltas = self.head(features)
        return pred_logits, pred_anchor_deltas, features

    def forward(self, batched_inputs: List[dict]):
        """Training: ``{"loss_cls", "loss_box_reg"}``. Eval: one ``{"instances": Instances}`` per
        image with ``pred_boxes``, ``scores``, ``pred_classes`` at its original height x width."""
        images = self.preprocess_image(batched_inputs)
        pred_logits, pred_anchor_deltas, features = self.forward_features(images.tensor)
        anchors = torch.cat(self.anchor_generator(features))
        # per level (N, H*W*A, K), in the order of the anchors; views of channels-last outputs
        pred_logits = [permute_to_N_HWA_K(x, self.num_classes).float() for x in pred_logits]
        pred_anchor_deltas = torch.cat([permute_to_N_HWA_K(x, 4) for x in pred_anchor_deltas],
                                       dim=1).float()
        if self.training:
            gt_labels, matched_gt_boxes = self.label_anchors(
                anchors, self._gt_instances(batched_inputs))
            return efficientdet_losses(
                pred_logits, pred_anchor_deltas, anchors, gt_labels, matched_gt_boxes,
                num_classes=self.num_classes, box_coder=self.box_coder,
                focal_alpha=self.focal_loss_alpha, focal_gamma=self.focal_loss_gamma,
                box_loss_type=self.box_loss_type, huber_delta=self.huber_delta,
                box_loss_weight=self.box_loss_weight, giou_loss_weight=self.giou_loss_weight,
                normalizer=self._loss_normalizer_all_ranks(gt_labels))

        detections = efficientdet_inference(
            pred_logits, pred_anchor_deltas, anchors, images.image_sizes,
            box_coder=self.box_coder, score_thresh=self.score_thresh_test,
            topk_candidates=self.topk_candidates_test, nms_thresh=self.nms_thresh_test,
            max_detections=self.max_detections_per_image)
        results = []
        for x, det in zip(batched_inputs, detections):
            height, width = x.get("height", det.image_size[0]), x.get("width", det.image_size[1])
            results.append({"instances": rescale_detections(det, height, width)})
        return results

    @torch.no_grad()
    def _loss_normalizer_all_ranks(self, gt_labels: torch.Tensor):
        """``(F_all + 1) / W`` under data parallelism (F_all: foreground anchors of the step on
        all W processes), so averaged gradients equal one process's over the whole batch; None
        (the loss's own ``F + 1``) in a single process. A collective: every rank must call it."""
        world_size = comm.get_world_size()
        if world_size == 1:
            return None
        return (self._num_foreground_all_ranks(gt_labels) + 1.0) / world_size
