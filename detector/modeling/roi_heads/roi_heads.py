"""Standard RoI heads of Faster / Mask R-CNN: label and sample proposals, pool their features
from the pyramid, run the box branch and, with masks on, the mask branch."""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from detector.layers import ShapeSpec
from detector.structures import Boxes, Instances, pairwise_iou
from detector.utils import comm

from ..losses.mask_rcnn import MASK_TARGET_TYPES, mask_rcnn_loss, mask_rcnn_targets
from ..matcher import Matcher
from ..sampling import subsample_labels
from .box_head import FastRCNNOutputLayers
from .build import ROI_HEADS_REGISTRY, build_box_head, build_mask_head
from .mask_head import mask_rcnn_inference
from .poolers import POOLER_TYPES, ROIPooler

__all__ = ["StandardROIHeads", "SampledProposals"]


class SampledProposals(NamedTuple):
    """The proposals of one image chosen for the losses, with their targets."""

    boxes: torch.Tensor  # (S, 4) XYXY
    gt_classes: torch.Tensor  # (S,) in [0, K], K = background
    gt_boxes: torch.Tensor  # (S, 4) matched ground truth (meaningless for background)
    gt_idxs: torch.Tensor  # (S,) index of the matched ground truth in the image's instances


def _gt_mask_tensor(gt_masks, image_size: Tuple[int, int]) -> torch.Tensor:
    """(G, H, W) full-image masks of BitMasks (``.tensor``), PolygonMasks (``.to_bitmasks``) or
    a plain tensor."""
    if isinstance(gt_masks, torch.Tensor):
        return gt_masks
    if not hasattr(gt_masks, "tensor") and hasattr(gt_masks, "to_bitmasks"):
        gt_masks = gt_masks.to_bitmasks(*image_size)
    return gt_masks.tensor


def _pooler_from_config(head_cfg, key: str, strides: Sequence[int]) -> ROIPooler:
    if head_cfg.POOLER_TYPE not in POOLER_TYPES:
        raise ValueError(f"{key}.POOLER_TYPE='{head_cfg.POOLER_TYPE}' is not one of "
                         f"{sorted(POOLER_TYPES)}")
    return ROIPooler(output_size=head_cfg.POOLER_RESOLUTION, strides=strides,
                     sampling_ratio=head_cfg.POOLER_SAMPLING_RATIO,
                     aligned=POOLER_TYPES[head_cfg.POOLER_TYPE])


@ROI_HEADS_REGISTRY.register()
class StandardROIHeads(nn.Module):
    """Box head (and mask head) on RoIAlign-pooled proposal features.

    Training: ground-truth boxes are appended to the proposals, proposals are matched to the
    non-crowd ground truth by IoU (no low-quality matches), ``batch_size_per_image`` are sampled
    with at most ``positive_fraction`` foreground, and the losses are computed on them; the mask
    loss uses the foreground samples only. Inference: detections from the box branch, then the
    mask of the predicted class for each detection (``pred_masks``, (R, 1, M, M)
    probabilities, to be pasted with :func:`detector.modeling.postprocessing.paste_masks_in_image`).

    Args:
        in_features: pyramid levels the RoIs are pooled from, in the order of the poolers'
            strides.
        mask_pooler, mask_head: both None for a box-only (Faster R-CNN) head.
        mask_target_type: "binary" or "soft" (see :mod:`detector.modeling.losses.mask_rcnn`).
        loss_normalizer_all_ranks: under data parallelism divide the box losses by the sampled
            proposals and the mask loss by the positive ones of all W processes (over W), so the
            step does not depend on how the batch is split; with one process the same losses.
    """

    def __init__(self, *, num_classes: int, in_features: Sequence[str], box_pooler: ROIPooler,
                 box_head: nn.Module, box_predictor: FastRCNNOutputLayers,
                 proposal_matcher: Matcher, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, proposal_append_gt: bool = True,
                 mask_pooler: Optional[ROIPooler] = None, mask_head: Optional[nn.Module] = None,
                 mask_target_type: str = "binary", loss_normalizer_all_ranks: bool = True):
        super().__init__()
        if (mask_pooler is None) != (mask_head is None):
            raise ValueError("StandardROIHeads needs both mask_pooler and mask_head, or neither")
        if mask_target_type not in MASK_TARGET_TYPES:
            raise ValueError(f"MODEL.ROI_MASK_HEAD.TARGET_TYPE='{mask_target_type}' is not one "
                             f"of {sorted(MASK_TARGET_TYPES)}")
        if batch_size_per_image <= 0 or not 0.0 < positive_fraction <= 1.0:
            raise ValueError(f"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE={batch_size_per_image} must "
                             f"be > 0 and POSITIVE_FRACTION={positive_fraction} in (0, 1]")
        self.num_classes = num_classes
        self.in_features = list(in_features)
        self.box_pooler, self.box_head, self.box_predictor = box_pooler, box_head, box_predictor
        self.proposal_matcher = proposal_matcher
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.proposal_append_gt = proposal_append_gt
        self.mask_on = mask_head is not None
        self.mask_pooler, self.mask_head = mask_pooler, mask_head
        self.mask_target_type = mask_target_type
        self.loss_normalizer_all_ranks = bool(loss_normalizer_all_ranks)

    @classmethod
    def from_config(cls, cfg, input_shapes: Dict[str, ShapeSpec]) -> dict:
        r = cfg.MODEL.ROI_HEADS
        missing = [f for f in r.IN_FEATURES if f not in input_shapes]
        if not r.IN_FEATURES or missing:
            raise ValueError(f"MODEL.ROI_HEADS.IN_FEATURES={list(r.IN_FEATURES)}: "
                             f"{missing or 'empty'} not among the features "
                             f"{sorted(input_shapes)}")
        shapes = [input_shapes[f] for f in r.IN_FEATURES]
        channels = {s.channels for s in shapes}
        if len(channels) != 1:
            raise ValueError(f"MODEL.ROI_HEADS.IN_FEATURES={list(r.IN_FEATURES)} must have equal "
                             f"channels, got {shapes}")
        channels = channels.pop()
        strides = [s.stride for s in shapes]
        thresholds, labels = list(r.IOU_THRESHOLDS), list(r.IOU_LABELS)
        if (len(labels) != len(thresholds) + 1 or not set(labels) <= {-1, 0, 1}
                or thresholds != sorted(thresholds)):
            raise ValueError(f"MODEL.ROI_HEADS.IOU_THRESHOLDS={thresholds} must be increasing and "
                             f"IOU_LABELS={labels} one label (-1, 0 or 1) per interval")
        box_head = build_box_head(cfg, channels, cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION)
        kwargs = {
            "num_classes": r.NUM_CLASSES,
            "in_features": list(r.IN_FEATURES),
            "box_pooler": _pooler_from_config(cfg.MODEL.ROI_BOX_HEAD, "MODEL.ROI_BOX_HEAD",
                                              strides),
            "box_head": box_head,
            "box_predictor": FastRCNNOutputLayers(
                **FastRCNNOutputLayers.from_config(cfg, box_head.output_size)),
            "proposal_matcher": Matcher(r.IOU_THRESHOLDS, r.IOU_LABELS,
                                        allow_low_quality_matches=False),
            "batch_size_per_image": r.BATCH_SIZE_PER_IMAGE,
            "positive_fraction": r.POSITIVE_FRACTION,
            "proposal_append_gt": r.PROPOSAL_APPEND_GT,
            "loss_normalizer_all_ranks": r.LOSS_NORMALIZER_ALL_RANKS,
        }
        if cfg.MODEL.MASK_ON:
            kwargs["mask_pooler"] = _pooler_from_config(cfg.MODEL.ROI_MASK_HEAD,
                                                        "MODEL.ROI_MASK_HEAD", strides)
            kwargs["mask_head"] = build_mask_head(cfg, channels, r.NUM_CLASSES)
            kwargs["mask_target_type"] = cfg.MODEL.ROI_MASK_HEAD.TARGET_TYPE
        return kwargs

    def forward(self, image_sizes: List[Tuple[int, int]], features: Dict[str, torch.Tensor],
                proposals: List[Instances], gt_instances: Optional[List[Instances]] = None, *,
                generator: Optional[torch.Generator] = None
                ) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        """Training: ``([], {"loss_cls", "loss_box_reg"[, "loss_mask"]})``; eval: per-image
        detections (``pred_boxes`` in network-input pixels, ``scores``, ``pred_classes``
        [, ``pred_masks``]) and ``{}``.

        Args:
            image_sizes: (h, w) of each unpadded network input.
            proposals: per image, ``proposal_boxes`` (treated as constants).
            gt_instances: per image ``gt_boxes``, ``gt_classes`` (and ``gt_masks`` with masks
                on); entries with ``gt_is_crowd`` set are left out.
            generator: the random source of the proposal sampling (None: torch's global one).
        """
        feature_list = [features[f] for f in self.in_features]
        proposal_boxes = [p.proposal_boxes.tensor.detach() for p in proposals]
        if not self.training:
            detections = self._forward_box(feature_list, proposal_boxes, image_sizes)
            if self.mask_on:
                self._forward_mask(feature_list, detections)
            return detections, {}

        if gt_instances is None:
            raise ValueError("StandardROIHeads needs gt_instances in training")
        gt_instances = [g[~g.gt_is_crowd] if g.has("gt_is_crowd") else g for g in gt_instances]
        samples = [self.label_and_sample_proposals(boxes, gt, generator)
                   for boxes, gt in zip(proposal_boxes, gt_instances)]
        # before any branch that depends on the samples: a collective every rank must reach
        num_sampled, num_foreground = self.loss_normalizers(samples)
        box_features = self.box_head(self.box_pooler(feature_list, [s.boxes for s in samples]))
        class_logits, proposal_deltas = self.box_predictor(box_features)
        losses = self.box_predictor.losses(
            class_logits, proposal_deltas, torch.cat([s.boxes for s in samples]),
            torch.cat([s.gt_classes for s in samples]), torch.cat([s.gt_boxes for s in samples]),
            normalizer=num_sampled)
        if self.mask_on:
            losses["loss_mask"] = self._mask_loss(feature_list, samples, gt_instances,
                                                  num_foreground)
        return [], losses

    @torch.no_grad()
    def loss_normalizers(self, samples: List[SampledProposals]
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Divisors of the box losses (sampled proposals) and of the mask loss (positive
        proposals) as float tensors, each at least 1. With ``loss_normalizer_all_ranks`` under
        W processes: the counts summed over the processes (one all-reduce) divided by W, so
        that DDP's averaged gradients are those of the whole batch on one process."""
        classes = torch.cat([s.gt_classes for s in samples])
        foreground = (classes >= 0) & (classes < self.num_classes)
        counts = torch.stack([(classes >= 0).sum(), foreground.sum()])
        # one all-reduce for both
        divisors = comm.loss_divisor(counts, sum_over_ranks=self.loss_normalizer_all_ranks)
        return divisors[0], divisors[1]

    @torch.no_grad()
    def label_and_sample_proposals(self, proposal_boxes: torch.Tensor, gt: Instances,
                                   generator: Optional[torch.Generator] = None
                                   ) -> SampledProposals:
        """Matches one image's (R, 4) proposals (plus its ground-truth boxes when
        ``proposal_append_gt``) to its ground truth and samples the loss's proposals: foreground
        first, then background."""
        gt_boxes = gt.gt_boxes.tensor.to(proposal_boxes.dtype)
        if self.proposal_append_gt:
            proposal_boxes = torch.cat([proposal_boxes, gt_boxes])
        matches, match_labels = self.proposal_matcher(
            pairwise_iou(Boxes(gt_boxes), Boxes(proposal_boxes)))
        if len(gt_boxes):
            classes = gt.gt_classes.to(torch.int64)[matches]
            classes[match_labels == 0] = self.num_classes
            classes[match_labels == -1] = -1
        else:
            # no objects: every proposal is background, matched to a placeholder box
            classes = torch.full_like(matches, self.num_classes)
            gt_boxes = proposal_boxes.new_zeros((1, 4))
        positive, negative = subsample_labels(classes, self.batch_size_per_image,
                                              self.positive_fraction, self.num_classes,
                                              generator)
        sampled = torch.cat([positive, negative])
        return SampledProposals(boxes=proposal_boxes[sampled], gt_classes=classes[sampled],
                                gt_boxes=gt_boxes[matches[sampled]], gt_idxs=matches[sampled])

    def _forward_box(self, feature_list: List[torch.Tensor], proposal_boxes: List[torch.Tensor],
                     image_sizes: List[Tuple[int, int]]) -> List[Instances]:
        box_features = self.box_head(self.box_pooler(feature_list, proposal_boxes))
        class_logits, proposal_deltas = self.box_predictor(box_features)
        return self.box_predictor.inference(class_logits, proposal_deltas, proposal_boxes,
                                            image_sizes)

    def _forward_mask(self, feature_list: List[torch.Tensor], detections: List[Instances]
                      ) -> None:
        boxes = [d.pred_boxes.tensor for d in detections]
        mask_logits = self.mask_head(self.mask_pooler(feature_list, boxes))
        mask_rcnn_inference(mask_logits, detections)

    def _mask_loss(self, feature_list: List[torch.Tensor], samples: List[SampledProposals],
                   gt_instances: List[Instances], normalizer: torch.Tensor) -> torch.Tensor:
        foreground = [(s.gt_classes >= 0) & (s.gt_classes < self.num_classes) for s in samples]
        fg_boxes = [s.boxes[fg] for s, fg in zip(samples, foreground)]
        mask_logits = self.mask_head(self.mask_pooler(feature_list, fg_boxes))
        mask_size = mask_logits.shape[-1]
        targets = []
        for s, fg, boxes, gt in zip(samples, foreground, fg_boxes, gt_instances):
            if len(boxes) == 0:
                continue
            # rasterise / convert only the instances some foreground proposal matched
            used, local_idxs = torch.unique(s.gt_idxs[fg], return_inverse=True)
            gt_masks = _gt_mask_tensor(gt.gt_masks[used], gt.image_size)
            targets.append(mask_rcnn_targets(gt_masks, local_idxs, boxes, mask_size,
                                             self.mask_target_type))
        gt_classes = torch.cat([s.gt_classes[fg] for s, fg in zip(samples, foreground)])
        if not targets:
            return mask_rcnn_loss(mask_logits, gt_classes, mask_logits.new_zeros((0,)))
        return mask_rcnn_loss(mask_logits, gt_classes, torch.cat(targets),
                              normalizer=normalizer)
