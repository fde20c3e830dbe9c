"""Pasting M x M mask predictions into the image, bounded in memory.

Geometry and arithmetic are torchvision's (``paste_masks_in_image``): the mask is padded by one
pixel on each side and its box scaled by (M + 2) / M around the centre, the box corners are
truncated to integers, and the mask is resized with ``F.interpolate`` (bilinear, half-pixel
centres) onto the integer box, both corners inclusive, then cropped to the image. torchvision
allocates a whole-image tensor per mask and copies it into the output; here each mask is resized
onto its box only and written straight into the preallocated (R, H, W) output, so the work and the
temporaries scale with the boxes, not with the image. The values are bitwise torchvision's: a
batched matrix form of the same resize differs by a few ulps, which flips thresholded pixels that
lie exactly between a certain mask pixel and the zero padding (probability 0.5).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["paste_masks_in_image", "expand_boxes"]


def expand_boxes(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """(R, 4) XYXY boxes scaled by ``scale`` around their centres."""
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    center_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    center_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack([center_x - half_w, center_y - half_h,
                        center_x + half_w, center_y + half_h], dim=1)


def paste_masks_in_image(masks: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int],
                         *, threshold: Optional[float] = 0.5, padding: int = 1) -> torch.Tensor:
    """Masks of whole images from per-box mask probabilities.

    Args:
        masks: (R, M, M) or (R, 1, M, M) probabilities, one per box.
        boxes: (R, 4) XYXY boxes in the coordinates of the output image.
        image_size: (height, width) of the output image.
        threshold: output ``probability > threshold`` as bool (strictly above, as torchvision's
            users and the COCO reference threshold: pixels halfway between a certain mask and
            the zero padding are exactly 0.5); None returns the float
            probabilities.
        padding: pixels of zero padding added around each mask before resizing (torchvision: 1).
    Returns:
        (R, H, W) bool (or float with ``threshold=None``).
    """
    if masks.dim() == 4:
        masks = masks[:, 0]
    if masks.dim() != 3 or masks.shape[0] != boxes.shape[0]:
        raise ValueError(f"paste_masks_in_image needs (R, M, M) masks and (R, 4) boxes, got "
                         f"{tuple(masks.shape)} and {tuple(boxes.shape)}")
    height, width = int(image_size[0]), int(image_size[1])
    dtype = masks.dtype if masks.is_floating_point() else torch.float32
    out_dtype = torch.bool if threshold is not None else dtype
    output = torch.zeros((masks.shape[0], height, width), dtype=out_dtype, device=masks.device)
    if masks.shape[0] == 0:
        return output
    mask_extent = masks.shape[-1] + 2 * padding
    scale = mask_extent / masks.shape[-1]
    padded = F.pad(masks.to(dtype), (padding,) * 4)
    corners = expand_boxes(boxes.to(dtype), scale).to(torch.int64)  # truncation, as torchvision

    for i, (x0, y0, x1, y1) in enumerate(corners.tolist()):
        box_w, box_h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        # the image part of the box, end-exclusive
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1 + 1, width), min(y1 + 1, height)
        if ix0 >= ix1 or iy0 >= iy1:
            continue
        resized = F.interpolate(padded[i][None, None], size=(box_h, box_w), mode="bilinear",
                                align_corners=False)[0, 0]
        region = resized[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
        output[i, iy0:iy1, ix0:ix1] = region > threshold if threshold is not None else region
    return output
