"""What one-stage, anchor-based detectors (RetinaNet, EfficientDet) share beyond
:class:`DetectorBase`: the raw network outputs (:meth:`DenseDetector.forward_features`), checking the ground
truth, labelling anchors with a Matcher and the multi-process loss normaliser."""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchvision.ops import box_iou

from detector.layers import ShapeSpec, conv_norm_fusion, winograd_convolution
from detector.structures import Boxes, Instances, pairwise_iou
from detector.utils import comm

from ..anchor_generator import AnchorGenerator
from ..box_coder import BoxCoder
from ..matcher import Matcher, ignore_background_in_crowd, split_crowd
from .base import DetectorBase

__all__ = ["DenseDetector", "channels_last_is_safe"]

# narrowest input of a strided 1x1 conv trusted with channels-last gradients (see below)
_MIN_SAFE_STRIDED_1X1_CHANNELS = 32


def channels_last_is_safe(*modules: nn.Module) -> bool:
    """False if any of ``modules`` has a strided 1x1 conv with fewer than 32 input channels
    (TinyNet's downsampling): training through such a conv on a channels-last input corrupts the
    heap in torch 2.14's CPU kernels (seen with 2-15 input channels and odd batch sizes; 16 to
    1024 channels, as in every ResNet, give the contiguous gradients)."""
    return not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                   and m.in_channels < _MIN_SAFE_STRIDED_1X1_CHANNELS
                   for module in modules for m in module.modules())


class DenseDetector(DetectorBase):
    """Base of RetinaNet and EfficientDet. Subclasses call :meth:`_set_parts` and
    :meth:`_set_input_format`, and set ``num_classes`` and ``num_classes_key`` (the config key
    named in errors). They may override :meth:`_channels_last_input` and
    :meth:`_channels_last_features` to pick memory formats."""

    anchor_matcher: Matcher
    # background anchors covered this much by crowd regions are ignored (> 1: never)
    crowd_ignore_fraction: float = 0.7
    # conv + fixed norm (+ activation) blocks folded into one conv (detector.layers.fused_conv)
    fuse_conv_norm: bool = False
    # 3x3 convs as Winograd F(2x2, 3x3) on the CPU where it pays (detector.layers.winograd_conv)
    winograd_conv: bool = False

    def _set_parts(self, backbone: nn.Module, neck: nn.Module, head: nn.Module,
                   anchor_generator: AnchorGenerator, box_coder: BoxCoder,
                   anchor_matcher: Matcher) -> Dict[str, ShapeSpec]:
        """Keep the networks and anchor machinery; the head sees the neck's levels in increasing
        order (``in_features``), one per anchor-generator level. Returns the neck's shapes."""
        self.backbone, self.neck, self.head = backbone, neck, head
        self.anchor_generator = anchor_generator
        self.box_coder = box_coder
        self.anchor_matcher = anchor_matcher
        feature_shapes = neck.output_shape()
        self.in_features = sorted(feature_shapes, key=lambda n: int(n[1:]))
        if len(self.in_features) != anchor_generator.num_levels:
            raise ValueError(f"The neck gives {len(self.in_features)} levels {self.in_features} "
                             f"but the anchor generator has {anchor_generator.num_levels}")
        return feature_shapes

    def _set_crowd_ignore_fraction(self, fraction: float) -> None:
        if not fraction > 0:
            raise ValueError(f"MODEL.CROWD_IGNORE_FRACTION={fraction} must be > 0 (above 1: never "
                             "ignore anchors in crowd regions)")
        self.crowd_ignore_fraction = float(fraction)

    def _channels_last_input(self) -> bool:
        """Whether the backbone gets its input in channels-last memory format."""
        return False

    def _channels_last_features(self) -> bool:
        """Whether the backbone's features are made channels-last before the neck."""
        return False

    def forward_features(self, images: torch.Tensor
                         ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        """The raw network outputs of a normalised, padded (N, C, H, W) batch: per-level
        ``pred_logits`` (N, A*K, H_l, W_l), ``pred_anchor_deltas`` (N, A*4, H_l, W_l) and the
        pyramid feature maps the head saw, in increasing level order."""
        if self._channels_last_input():
            images = images.contiguous(memory_format=torch.channels_last)
        with conv_norm_fusion(self.fuse_conv_norm), winograd_convolution(self.winograd_conv):
            features = self.backbone(images)
            if self._channels_last_features():
                features = {k: v.contiguous(memory_format=torch.channels_last)
                            for k, v in features.items()}
            features = self.neck(features)
            features = [features[name] for name in self.in_features]
            pred_logits, pred_anchor_deltas = self.head(features)
        return pred_logits, pred_anchor_deltas, features

    @torch.no_grad()
    def _num_foreground_all_ranks(self, gt_labels: torch.Tensor) -> torch.Tensor:
        """Foreground anchors of the step summed over all processes. A collective: under
        torch.distributed every rank must call it, as every rank's training forward does."""
        num_foreground = ((gt_labels >= 0) & (gt_labels < self.num_classes)).sum()
        return comm.all_reduce_sum(num_foreground.float())

    @torch.no_grad()
    def loss_normalizer(self, gt_labels: torch.Tensor, *, plus_one: bool
                        ) -> Optional[torch.Tensor]:
        """The divisor the loss functions take as ``normalizer``: None in a single process (each
        loss counts its own batch); under data parallelism with W processes ``(F_all + 1) / W``
        (``plus_one``, EfficientDet) or ``max(F_all, 1) / W`` (RetinaNet), with F_all the
        foreground anchors of the step on all processes, so that DDP's averaged gradients equal
        one process's over the whole batch. A collective: every rank must call it."""
        world_size = comm.get_world_size()
        if world_size == 1:
            return None
        num_foreground = self._num_foreground_all_ranks(gt_labels)
        total = num_foreground + 1.0 if plus_one else num_foreground.clamp(min=1.0)
        return total / world_size

    @torch.no_grad()
    def label_anchors(self, anchors: torch.Tensor, gt_instances: List[Instances]):
        """Per image, the label of every anchor (class, ``num_classes`` = background, -1 = ignored)
        and its matched gt box.

        Crowd regions (``gt_is_crowd`` set, kept by the mapper with ``INPUT.KEEP_CROWD``) take no
        part in the matching, so they never take anchors from real boxes; an anchor that would be
        background but lies inside crowd regions by at least ``crowd_ignore_fraction`` of its area
        is ignored instead of being taught "no object" on a crowd of objects.

        Returns (N, R) int64 labels and (N, R, 4) boxes."""
        if not any(inst.has("gt_is_crowd") and bool(inst.gt_is_crowd.any())
                   for inst in gt_instances):
            return self._label_anchors_batched(anchors, gt_instances)
        gt_labels, matched_gt_boxes = [], []
        anchor_boxes = Boxes(anchors)
        for inst in gt_instances:
            inst, crowd_boxes = split_crowd(inst)
            iou = pairwise_iou(inst.gt_boxes, anchor_boxes)
            matched_idxs, match_labels = self.anchor_matcher(iou)
            if len(inst) > 0:
                labels = inst.gt_classes[matched_idxs].to(torch.int64)
                boxes = inst.gt_boxes.tensor[matched_idxs]
            else:
                labels = torch.zeros_like(matched_idxs)
                boxes = torch.zeros_like(anchors)
            labels[match_labels == 0] = self.num_classes
            labels[match_labels == -1] = -1
            ignore_background_in_crowd(labels, anchor_boxes, crowd_boxes, self.num_classes,
                                       self.crowd_ignore_fraction)
            gt_labels.append(labels)
            matched_gt_boxes.append(boxes)
        return torch.stack(gt_labels), torch.stack(matched_gt_boxes)

    def _label_anchors_batched(self, anchors: torch.Tensor, gt_instances: List[Instances]):
        """:meth:`label_anchors` of a batch without crowd regions, with one IoU computation and
        one matching for all images (ground truth padded to the largest count)."""
        num_images, num_gt = len(gt_instances), max(len(inst) for inst in gt_instances)
        gt_boxes = anchors.new_zeros((num_images, num_gt, 4))
        gt_classes = torch.full((num_images, max(num_gt, 1)), self.num_classes,
                                dtype=torch.int64, device=anchors.device)
        gt_valid = torch.zeros((num_images, num_gt), dtype=torch.bool, device=anchors.device)
        for i, inst in enumerate(gt_instances):
            gt_boxes[i, :len(inst)] = inst.gt_boxes.tensor
            gt_classes[i, :len(inst)] = inst.gt_classes
            gt_valid[i, :len(inst)] = True
        # box_iou is batched; nan (boxes without area) counts as no overlap, as pairwise_iou
        iou = torch.nan_to_num(box_iou(gt_boxes, anchors), nan=0.0)
        matches, match_labels = self.anchor_matcher.match_batch(iou, gt_valid)
        labels = torch.gather(gt_classes, 1, matches)
        labels[match_labels == 0] = self.num_classes
        labels[match_labels == -1] = -1
        if num_gt == 0:
            return labels, anchors.new_zeros((num_images,) + tuple(anchors.shape))
        boxes = torch.gather(gt_boxes, 1, matches[:, :, None].expand(-1, -1, 4))
        # an image without ground truth matches nothing: zero boxes, as the per-image path
        boxes = boxes * gt_valid.any(dim=1)[:, None, None]
        return labels, boxes
