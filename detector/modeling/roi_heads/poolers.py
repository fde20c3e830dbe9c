"""Multi-level RoIAlign: each box is pooled from the pyramid level its size maps to (FPN paper,
eq. 1), with ``torchvision.ops.roi_align`` doing the pooling on each level.

torchvision's ``MultiScaleRoIAlign`` infers the level strides from the feature and image sizes on
its first call and fixes them; this pooler is given the strides, so it does not depend on the
first batch's padding and can be built from the feature shapes alone.
"""
import math
from typing import List, Sequence

import torch
from torch import nn
from torchvision.ops import roi_align

__all__ = ["ROIPooler", "assign_boxes_to_levels", "POOLER_TYPES"]

# name -> RoIAlign ``aligned`` flag: "ROIAlign" samples at integer pixel corners (torchvision),
# "ROIAlignV2" shifts by half a pixel so a box samples the pixels it covers (detectron2)
POOLER_TYPES = {"ROIAlign": False, "ROIAlignV2": True}


def assign_boxes_to_levels(boxes: List[torch.Tensor], min_level: int, max_level: int,
                           canonical_box_size: float = 224.0, canonical_level: int = 4,
                           eps: float = 1e-6) -> torch.Tensor:
    """Pyramid level index (0 = ``min_level``) of every box of the concatenated per-image
    (R_i, 4) XYXY ``boxes``: ``floor(canonical_level + log2(sqrt(area) / canonical_box_size)
    + eps)`` clamped to [min_level, max_level] (torchvision's rule, eps included)."""
    all_boxes = torch.cat(boxes, dim=0)
    widths = (all_boxes[:, 2] - all_boxes[:, 0]).clamp(min=0)
    heights = (all_boxes[:, 3] - all_boxes[:, 1]).clamp(min=0)
    sizes = torch.sqrt(widths * heights)
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size)
                         + torch.tensor(eps, dtype=sizes.dtype))
    levels = torch.clamp(levels, min=min_level, max=max_level)
    return levels.to(torch.int64) - min_level


def boxes_to_rois(boxes: List[torch.Tensor]) -> torch.Tensor:
    """(R, 5) RoIs ``(image index, x1, y1, x2, y2)`` of the per-image box lists, as roi_align
    takes them."""
    all_boxes = torch.cat(boxes, dim=0)
    image_idxs = torch.cat([torch.full((len(b), 1), i, dtype=all_boxes.dtype,
                                       device=all_boxes.device) for i, b in enumerate(boxes)])
    return torch.cat([image_idxs, all_boxes], dim=1)


class ROIPooler(nn.Module):
    """Pools a fixed-size (C, S, S) feature for every box from a feature pyramid.

    Args:
        output_size: S.
        strides: stride of each feature map passed to :meth:`forward`, in increasing order;
            consecutive powers of two (4, 8, 16, 32 for P2-P5).
        sampling_ratio: RoIAlign sampling points per bin side; <= 0 = adaptive
            (ceil(box size / S)).
        aligned: half-pixel corrected RoIAlign ("ROIAlignV2"); False as torchvision.
        canonical_box_size, canonical_level: a box of sqrt(area) = canonical_box_size is pooled
            from level canonical_level (224 px -> P4).
    """

    def __init__(self, *, output_size: int, strides: Sequence[int], sampling_ratio: int = 0,
                 aligned: bool = True, canonical_box_size: float = 224.0,
                 canonical_level: int = 4):
        super().__init__()
        levels = [math.log2(s) for s in strides]
        if not strides or any(lv != int(lv) for lv in levels) or any(
                b - a != 1 for a, b in zip(levels[:-1], levels[1:])):
            raise ValueError(f"ROIPooler needs strides that are consecutive powers of two in "
                             f"increasing order, got {list(strides)}")
        if output_size <= 0:
            raise ValueError(f"ROIPooler output_size={output_size} must be positive")
        self.output_size = (int(output_size), int(output_size))
        self.strides = [int(s) for s in strides]
        self.min_level, self.max_level = int(levels[0]), int(levels[-1])
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.canonical_box_size = float(canonical_box_size)
        self.canonical_level = int(canonical_level)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, strides={self.strides}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, "
                f"canonical_box_size={self.canonical_box_size:g}, "
                f"canonical_level={self.canonical_level}")

    def forward(self, features: List[torch.Tensor], boxes: List[torch.Tensor]) -> torch.Tensor:
        """Pooled features (R, C, S, S) of the per-image (R_i, 4) XYXY ``boxes`` (network-input
        pixels), in the order of the concatenated boxes.

        Args:
            features: (N, C, H_l, W_l) per level, same order as ``strides``.
        """
        if len(features) != len(self.strides):
            raise ValueError(f"ROIPooler was built for {len(self.strides)} levels (strides "
                             f"{self.strides}), got {len(features)} feature maps")
        if len(boxes) != features[0].shape[0]:
            raise ValueError(f"ROIPooler got boxes for {len(boxes)} images and features for "
                             f"{features[0].shape[0]}")
        num_channels = features[0].shape[1]
        rois = boxes_to_rois([b.to(features[0].dtype) for b in boxes])
        if len(self.strides) == 1:
            return self._pool(features[0], rois, self.strides[0])
        levels = assign_boxes_to_levels(boxes, self.min_level, self.max_level,
                                        self.canonical_box_size, self.canonical_level)
        output = features[0].new_zeros((rois.shape[0], num_channels) + self.output_size)
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            idxs = torch.nonzero(levels == level).squeeze(1)
            if idxs.numel():
                output[idxs] = self._pool(feature, rois[idxs], stride).to(output.dtype)
        return output

    def _pool(self, feature: torch.Tensor, rois: torch.Tensor, stride: int) -> torch.Tensor:
        return roi_align(feature, rois, self.output_size, spatial_scale=1.0 / stride,
                         sampling_ratio=self.sampling_ratio, aligned=self.aligned)
