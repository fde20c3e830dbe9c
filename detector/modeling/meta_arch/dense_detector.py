"""What one-stage, anchor-based detectors (RetinaNet, EfficientDet) share: input normalisation
and padding, checking the ground truth, and labelling anchors with a Matcher."""
from typing import Dict, List, Sequence

import torch
from torch import nn

from detector.layers import ShapeSpec
from detector.structures import Boxes, ImageList, Instances, pairwise_iou
from detector.utils import comm

from ..anchor_generator import AnchorGenerator
from ..box_coder import BoxCoder
from ..matcher import Matcher

__all__ = ["DenseDetector"]


class DenseDetector(nn.Module):
    """Base of RetinaNet and EfficientDet. Subclasses call :meth:`_set_parts` and
    :meth:`_set_input_format`, and set ``num_classes`` and ``num_classes_key`` (the config key
    named in errors)."""

    num_classes: int
    anchor_matcher: Matcher
    num_classes_key = "NUM_CLASSES"

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

    def _set_input_format(self, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                          size_divisibility: int) -> None:
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(f"MODEL.PIXEL_MEAN {list(pixel_mean)} and MODEL.PIXEL_STD "
                             f"{list(pixel_std)} need the same length")
        self.size_divisibility = size_divisibility
        # buffers so they follow .to(device); not persistent, like torchvision's transform
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1).float(),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1).float(),
                             persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        """Move to the device, normalise, pad into one batch whose sides are multiples of
        ``size_divisibility``."""
        images = []
        for i, x in enumerate(batched_inputs):
            image = x["image"]
            if image.dim() != 3 or image.shape[0] != self.pixel_mean.shape[0]:
                channels = self.pixel_mean.shape[0]
                raise ValueError(f"Image {x.get('image_id', i)}: expected a ({channels}, H, W) "
                                 f"tensor, got shape {tuple(image.shape)}")
            image = image.to(self.device, non_blocking=True).float()
            images.append((image - self.pixel_mean) / self.pixel_std)
        return ImageList.from_tensors(images, self.size_divisibility)

    def _gt_instances(self, batched_inputs: List[dict]) -> List[Instances]:
        """The ``instances`` of every input on the model's device; one-line errors for missing
        ground truth, classes out of range and degenerate or non-finite boxes."""
        gt_instances = []
        for i, x in enumerate(batched_inputs):
            image_id = x.get("image_id", i)
            if "instances" not in x:
                raise ValueError(f"Image {image_id}: training needs an 'instances' field with "
                                 "gt_boxes and gt_classes")
            inst = x["instances"].to(self.device)
            boxes, classes = inst.gt_boxes.tensor, inst.gt_classes
            if len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
                raise ValueError(f"Image {image_id}: gt_classes {sorted(set(classes.tolist()))} "
                                 f"outside [0, {self.num_classes}) ({self.num_classes_key})")
            bad = ~(torch.isfinite(boxes).all(dim=1) & (boxes[:, 2] > boxes[:, 0])
                    & (boxes[:, 3] > boxes[:, 1]))
            if bad.any():
                raise ValueError(f"Image {image_id}: degenerate or non-finite gt box "
                                 f"{boxes[bad][0].tolist()} (need x2 > x1 and y2 > y1)")
            gt_instances.append(inst)
        return gt_instances

    @torch.no_grad()
    def _num_foreground_all_ranks(self, gt_labels: torch.Tensor) -> torch.Tensor:
        """Foreground anchors of the step summed over all processes. A collective: under
        torch.distributed every rank must call it, as every rank's training forward does."""
        num_foreground = ((gt_labels >= 0) & (gt_labels < self.num_classes)).sum()
        return comm.all_reduce_sum(num_foreground.float())

    @torch.no_grad()
    def label_anchors(self, anchors: torch.Tensor, gt_instances: List[Instances]):
        """Per image, the label of every anchor (class, ``num_classes`` = background, -1 = ignored)
        and its matched gt box. Anchors matched to a box with ``gt_is_crowd`` set are ignored.

        Returns (N, R) int64 labels and (N, R, 4) boxes."""
        gt_labels, matched_gt_boxes = [], []
        anchor_boxes = Boxes(anchors)
        for inst in gt_instances:
            iou = pairwise_iou(inst.gt_boxes, anchor_boxes)
            matched_idxs, match_labels = self.anchor_matcher(iou)
            if len(inst) > 0:
                labels = inst.gt_classes[matched_idxs].to(torch.int64)
                boxes = inst.gt_boxes.tensor[matched_idxs]
                if inst.has("gt_is_crowd"):
                    crowd = inst.gt_is_crowd.to(torch.bool)[matched_idxs]
                    match_labels = torch.where(crowd & (match_labels != 0),
                                               torch.full_like(match_labels, -1), match_labels)
            else:
                labels = torch.zeros_like(matched_idxs)
                boxes = torch.zeros_like(anchors)
            labels[match_labels == 0] = self.num_classes
            labels[match_labels == -1] = -1
            gt_labels.append(labels)
            matched_gt_boxes.append(boxes)
        return torch.stack(gt_labels), torch.stack(matched_gt_boxes)
