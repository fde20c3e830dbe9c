"""Region Proposal Network (Ren et al. 2015) over a feature pyramid, as in Faster / Mask R-CNN-FPN.

A shared head scores every anchor of every level for "object" and regresses its box. Proposals:
per image and level the ``pre_nms_topk`` highest-scoring anchors are decoded, clipped to the
image, boxes narrower or lower than ``min_box_size`` dropped, NMS run per level
(``batched_nms`` with the level as category) and the ``post_nms_topk`` best kept per image.
Training: anchors are matched to the ground truth (IoU 0.3 / 0.7 by default, plus each object's
best anchors), ``batch_size_per_image`` of them sampled per image at most ``positive_fraction``
positive, and the losses of :mod:`detector.modeling.losses.rpn` computed on the sample.
Proposals carry no gradient.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detector.layers import ShapeSpec, batched_nms
from detector.structures import Boxes, Instances, pairwise_iou
from detector.utils import comm

from ..anchor_generator import AnchorGenerator
from ..box_coder import BoxCoder
from ..dense_heads import build_dense_head, permute_to_N_HWA_K
from ..losses import check_rpn_loss_options, rpn_loss_count, rpn_losses
from ..matcher import Matcher, ignore_background_in_crowd, split_crowd
from ..sampling import subsample_labels
from .build import PROPOSAL_GENERATOR_REGISTRY

__all__ = ["RPN"]

logger = logging.getLogger(__name__)


def _check_pair(name: str, values: Sequence[int]) -> Tuple[int, int]:
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"{name}={list(values)} must be two positive counts (train, test)")
    return int(values[0]), int(values[1])


@PROPOSAL_GENERATOR_REGISTRY.register()
class RPN(nn.Module):
    """Args:
        in_features: pyramid levels the RPN reads, e.g. ``["p2", ..., "p6"]``, in increasing
            level order (one anchor-generator level each).
        head: a dense head (``DENSE_HEAD_REGISTRY``) with one objectness logit per anchor.
        anchor_generator: anchors of ``in_features``.
        anchor_matcher: labels anchors 0 / -1 / 1 from their IoU with the ground truth.
        box_coder: anchor <-> box delta coding.
        batch_size_per_image: anchors sampled per image for the losses.
        positive_fraction: at most this fraction of the sample is positive.
        pre_nms_topk: (train, test) candidates kept per image and level before NMS.
        post_nms_topk: (train, test) proposals kept per image after NMS.
        nms_thresh: IoU threshold of the per-level NMS.
        min_box_size: proposals narrower or lower than this (pixels) are dropped, as are empty
            ones (torchvision: 1e-3).
        score_thresh: proposals with objectness probability below this are dropped (0: none).
        bbox_reg_loss_type, smooth_l1_beta, loss_weight, bbox_reg_loss_weight,
            loss_normalization: see :func:`detector.modeling.losses.rpn_losses`.
        loss_normalizer_all_ranks: under data parallelism, sum the loss normaliser over the
            processes (divided by their number), so the step equals one process's.
        crowd_ignore_fraction: ground truth with ``gt_is_crowd`` takes no part in the matching;
            a background anchor covered this much by crowd regions is not sampled (> 1: never).
    """

    def __init__(self, *, in_features: Sequence[str], head: nn.Module,
                 anchor_generator: AnchorGenerator, anchor_matcher: Matcher, box_coder: BoxCoder,
                 batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_topk: Sequence[int] = (2000, 1000),
                 post_nms_topk: Sequence[int] = (1000, 1000), nms_thresh: float = 0.7,
                 min_box_size: float = 0.0, score_thresh: float = 0.0,
                 bbox_reg_loss_type: str = "smooth_l1", smooth_l1_beta: float = 0.0,
                 loss_weight: float = 1.0, bbox_reg_loss_weight: float = 1.0,
                 loss_normalization: str = "batch_size", loss_normalizer_all_ranks: bool = True,
                 crowd_ignore_fraction: float = 0.7):
        super().__init__()
        check_rpn_loss_options(bbox_reg_loss_type=bbox_reg_loss_type,
                               normalization=loss_normalization)
        if len(in_features) != anchor_generator.num_levels:
            raise ValueError(f"MODEL.RPN.IN_FEATURES={list(in_features)} has {len(in_features)} "
                             f"levels but the anchor generator has {anchor_generator.num_levels}")
        if head.num_anchors != anchor_generator.num_anchors_per_location:
            raise ValueError(f"The RPN head predicts {head.num_anchors} anchors per location, the "
                             f"anchor generator {anchor_generator.num_anchors_per_location}")
        if batch_size_per_image <= 0:
            raise ValueError(f"MODEL.RPN.BATCH_SIZE_PER_IMAGE={batch_size_per_image} must be "
                             "positive")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"MODEL.RPN.POSITIVE_FRACTION={positive_fraction} must be in [0, 1]")
        if not 0.0 < nms_thresh <= 1.0:
            raise ValueError(f"MODEL.RPN.NMS_THRESH={nms_thresh} must be in (0, 1]")
        if min_box_size < 0:
            raise ValueError(f"MODEL.PROPOSAL_GENERATOR.MIN_SIZE={min_box_size} must be >= 0")
        if not 0.0 <= score_thresh < 1.0:
            raise ValueError(f"MODEL.RPN.SCORE_THRESH={score_thresh} must be in [0, 1)")
        if not crowd_ignore_fraction > 0:
            raise ValueError(f"MODEL.CROWD_IGNORE_FRACTION={crowd_ignore_fraction} must be > 0 "
                             "(above 1: never ignore anchors in crowd regions)")
        self.in_features = list(in_features)
        self.head = head
        self.anchor_generator = anchor_generator
        self.anchor_matcher = anchor_matcher
        self.box_coder = box_coder
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.pre_nms_topk = _check_pair("MODEL.RPN.PRE_NMS_TOPK_TRAIN/TEST", pre_nms_topk)
        self.post_nms_topk = _check_pair("MODEL.RPN.POST_NMS_TOPK_TRAIN/TEST", post_nms_topk)
        self.nms_thresh = float(nms_thresh)
        self.min_box_size = float(min_box_size)
        self.score_thresh = float(score_thresh)
        self.bbox_reg_loss_type = bbox_reg_loss_type
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.loss_weight = float(loss_weight)
        self.bbox_reg_loss_weight = float(bbox_reg_loss_weight)
        self.loss_normalization = loss_normalization
        self.loss_normalizer_all_ranks = bool(loss_normalizer_all_ranks)
        self.crowd_ignore_fraction = float(crowd_ignore_fraction)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> dict:
        """``input_shape``: the neck's ``output_shape()``; reads ``MODEL.RPN``,
        ``MODEL.PROPOSAL_GENERATOR``, ``MODEL.ANCHOR_GENERATOR`` and
        ``MODEL.CROWD_IGNORE_FRACTION``."""
        rpn = cfg.MODEL.RPN
        missing = [f for f in rpn.IN_FEATURES if f not in input_shape]
        if missing or not rpn.IN_FEATURES:
            raise ValueError(f"MODEL.RPN.IN_FEATURES={list(rpn.IN_FEATURES)} must name levels of "
                             f"the neck's outputs {sorted(input_shape)}")
        in_features = sorted(rpn.IN_FEATURES, key=lambda f: input_shape[f].stride)
        shapes = {f: input_shape[f] for f in in_features}
        anchor_generator = AnchorGenerator(**AnchorGenerator.from_config(cfg, shapes))
        head = build_dense_head(cfg, rpn.HEAD_NAME, [shapes[f] for f in in_features],
                                anchor_generator.num_anchors_per_location,
                                key="MODEL.RPN.HEAD_NAME")
        thresholds, labels = list(rpn.IOU_THRESHOLDS), list(rpn.IOU_LABELS)
        if len(labels) != len(thresholds) + 1 or thresholds != sorted(thresholds):
            raise ValueError(f"MODEL.RPN.IOU_THRESHOLDS={thresholds} must be increasing with one "
                             f"more MODEL.RPN.IOU_LABELS, got {labels}")
        weights = list(rpn.BBOX_REG_WEIGHTS)
        if len(weights) != 4 or min(weights) <= 0:
            raise ValueError(f"MODEL.RPN.BBOX_REG_WEIGHTS={weights} must be 4 positive numbers")
        return {
            "in_features": in_features,
            "head": head,
            "anchor_generator": anchor_generator,
            "anchor_matcher": Matcher(thresholds, labels, allow_low_quality_matches=True),
            "box_coder": BoxCoder(weights),
            "batch_size_per_image": rpn.BATCH_SIZE_PER_IMAGE,
            "positive_fraction": rpn.POSITIVE_FRACTION,
            "pre_nms_topk": (rpn.PRE_NMS_TOPK_TRAIN, rpn.PRE_NMS_TOPK_TEST),
            "post_nms_topk": (rpn.POST_NMS_TOPK_TRAIN, rpn.POST_NMS_TOPK_TEST),
            "nms_thresh": rpn.NMS_THRESH,
            "min_box_size": cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE,
            "score_thresh": rpn.SCORE_THRESH,
            "bbox_reg_loss_type": rpn.BBOX_REG_LOSS_TYPE,
            "smooth_l1_beta": rpn.SMOOTH_L1_BETA,
            "loss_weight": rpn.LOSS_WEIGHT,
            "bbox_reg_loss_weight": rpn.BBOX_REG_LOSS_WEIGHT,
            "loss_normalization": rpn.LOSS_NORMALIZATION,
            "loss_normalizer_all_ranks": rpn.LOSS_NORMALIZER_ALL_RANKS,
            "crowd_ignore_fraction": cfg.MODEL.CROWD_IGNORE_FRACTION,
        }

    def forward(self, image_sizes: List[Tuple[int, int]], features: Dict[str, torch.Tensor],
                gt_instances: Optional[List[Instances]] = None, *,
                padded_size: Optional[Sequence[int]] = None,
                generator: Optional[torch.Generator] = None
                ) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        """Proposals per image and, in training, the losses (see ``build.py`` for the
        arguments). ``padded_size`` is needed by the "torchvision" anchor stride rule."""
        missing = [f for f in self.in_features if f not in features]
        if missing:
            raise KeyError(f"RPN reads pyramid levels {self.in_features} (MODEL.RPN.IN_FEATURES) "
                           f"but the features have {sorted(features)}")
        level_features = [features[f] for f in self.in_features]
        if level_features[0].shape[0] != len(image_sizes):
            raise ValueError(f"RPN got {len(image_sizes)} image sizes for a batch of "
                             f"{level_features[0].shape[0]} feature maps")
        if padded_size is None:
            anchors_per_level = self.anchor_generator(level_features)
        else:
            anchors_per_level = self.anchor_generator(level_features,
                                                      image_size=tuple(padded_size))
        raw_logits, raw_deltas = self.head(level_features)
        # (N, H*W*A) and (N, H*W*A, 4): the order the anchors are generated in
        logits_per_level = [permute_to_N_HWA_K(x, 1).squeeze(2) for x in raw_logits]
        deltas_per_level = [permute_to_N_HWA_K(x, 4) for x in raw_deltas]
        for level, (anchors, logits) in enumerate(zip(anchors_per_level, logits_per_level)):
            if anchors.shape[0] != logits.shape[1]:
                raise ValueError(f"RPN level {self.in_features[level]}: {anchors.shape[0]} anchors "
                                 f"but the head scores {logits.shape[1]}")

        proposals = self.find_top_proposals(anchors_per_level, logits_per_level,
                                            deltas_per_level, image_sizes)
        if not self.training:
            return proposals, {}
        if gt_instances is None or len(gt_instances) != len(image_sizes):
            raise ValueError("RPN in training needs gt_instances, one Instances per image")
        anchors = torch.cat(anchors_per_level)
        gt_labels, matched_gt_boxes = self.label_and_sample_anchors(anchors, gt_instances,
                                                                    generator)
        losses = rpn_losses(
            torch.cat(logits_per_level, dim=1), torch.cat(deltas_per_level, dim=1), anchors,
            gt_labels, matched_gt_boxes, box_coder=self.box_coder,
            normalizer=self.loss_normalizer(gt_labels),
            bbox_reg_loss_type=self.bbox_reg_loss_type, smooth_l1_beta=self.smooth_l1_beta,
            loss_weight=self.loss_weight, bbox_reg_loss_weight=self.bbox_reg_loss_weight)
        return proposals, losses

    @torch.no_grad()
    def loss_normalizer(self, gt_labels: torch.Tensor) -> torch.Tensor:
        """``max(count, 1)`` of :func:`rpn_loss_count`; with ``loss_normalizer_all_ranks`` under
        W processes ``max(count summed over processes, 1) / W``. A collective then: every rank
        must call it, as every rank's training forward does."""
        count = rpn_loss_count(gt_labels, normalization=self.loss_normalization,
                               batch_size_per_image=self.batch_size_per_image)
        return comm.loss_divisor(count, sum_over_ranks=self.loss_normalizer_all_ranks)

    @torch.no_grad()
    def label_and_sample_anchors(self, anchors: torch.Tensor, gt_instances: List[Instances],
                                 generator: Optional[torch.Generator] = None
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per image, match the (R, 4) ``anchors`` to the non-crowd ground truth and sample
        ``batch_size_per_image`` of them. Returns (N, R) int64 labels (1 positive, 0 negative,
        -1 not sampled) and the (N, R, 4) matched gt boxes (zeros without ground truth)."""
        anchor_boxes = Boxes(anchors)
        gt_labels, matched_gt_boxes = [], []
        for inst in gt_instances:
            inst, crowd_boxes = split_crowd(inst)
            gt_boxes = inst.gt_boxes.to(anchors.device)
            matched_idxs, match_labels = self.anchor_matcher(pairwise_iou(gt_boxes, anchor_boxes))
            labels = match_labels.to(torch.int64)
            ignore_background_in_crowd(labels, anchor_boxes, crowd_boxes, 0,
                                       self.crowd_ignore_fraction)
            positive, negative = subsample_labels(labels, self.batch_size_per_image,
                                                  self.positive_fraction, 0, generator)
            sampled = torch.full_like(labels, -1)
            sampled[positive] = 1
            sampled[negative] = 0
            gt_labels.append(sampled)
            if len(gt_boxes):
                matched_gt_boxes.append(gt_boxes.tensor[matched_idxs])
            else:
                matched_gt_boxes.append(torch.zeros_like(anchors))
        return torch.stack(gt_labels), torch.stack(matched_gt_boxes)

    @torch.no_grad()
    def find_top_proposals(self, anchors_per_level: List[torch.Tensor],
                           logits_per_level: List[torch.Tensor],
                           deltas_per_level: List[torch.Tensor],
                           image_sizes: List[Tuple[int, int]]) -> List[Instances]:
        """Proposals per image from per-level (R_l, 4) anchors, (N, R_l) objectness logits and
        (N, R_l, 4) deltas: top-k per level, decode, clip, size filter, per-level NMS, top-k."""
        training = 0 if self.training else 1
        pre_nms_topk, post_nms_topk = self.pre_nms_topk[training], self.post_nms_topk[training]
        num_images = len(image_sizes)
        device = logits_per_level[0].device
        batch_idx = torch.arange(num_images, device=device)[:, None]
        scores, boxes, levels = [], [], []
        for level, (anchors, logits, deltas) in enumerate(
                zip(anchors_per_level, logits_per_level, deltas_per_level)):
            k = min(pre_nms_topk, logits.shape[1])
            level_scores, idx = logits.detach().float().topk(k, dim=1)
            level_deltas = deltas.detach()[batch_idx, idx].float()
            level_boxes = self.box_coder.decode(level_deltas.reshape(-1, 4),
                                                anchors[idx].reshape(-1, 4))
            scores.append(level_scores)
            boxes.append(level_boxes.view(num_images, k, 4))
            levels.append(torch.full((k,), level, dtype=torch.int64, device=device))
        scores, boxes, levels = torch.cat(scores, dim=1), torch.cat(boxes, dim=1), torch.cat(levels)

        proposals = []
        for i, image_size in enumerate(image_sizes):
            image_boxes, image_scores, image_levels = boxes[i], scores[i], levels
            finite = torch.isfinite(image_boxes).all(dim=1) & torch.isfinite(image_scores)
            if not bool(finite.all()):
                # a diverging model: such candidates cannot be ranked or clipped
                logger.warning("RPN: dropped %d non-finite proposal candidates of image %d of "
                               "the batch", int((~finite).sum()), i)
                image_boxes = image_boxes[finite]
                image_scores, image_levels = image_scores[finite], image_levels[finite]
            image_boxes = Boxes(image_boxes)
            image_boxes.clip(image_size)
            widths = image_boxes.tensor[:, 2] - image_boxes.tensor[:, 0]
            heights = image_boxes.tensor[:, 3] - image_boxes.tensor[:, 1]
            # ">=" as torchvision's remove_small_boxes; empty boxes always go (detectron2)
            keep = ((widths >= self.min_box_size) & (heights >= self.min_box_size)
                    & (widths > 0) & (heights > 0))
            if self.score_thresh > 0:
                keep &= torch.sigmoid(image_scores) >= self.score_thresh
            image_boxes = image_boxes[keep]
            image_scores, image_levels = image_scores[keep], image_levels[keep]
            keep = batched_nms(image_boxes.tensor, image_scores, image_levels,
                               self.nms_thresh)[:post_nms_topk]
            proposals.append(Instances(image_size, proposal_boxes=image_boxes[keep],
                                       objectness_logits=image_scores[keep]))
        return proposals
