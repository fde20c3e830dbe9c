"""Pasting M x M mask predictions into the image, batched over masks and bounded in memory.

Geometry is torchvision's (``paste_masks_in_image``): the mask is padded by one pixel on each
side and its box scaled by (M + 2) / M around the centre, the box corners are truncated to
integers, and the mask is resized bilinearly (half-pixel centres, edge values repeated) onto the
integer box, both corners inclusive. torchvision resizes and copies one mask at a time;
bilinear resizing is separable, so here the resized mask is ``Wy @ mask @ Wx^T`` with per-mask
interpolation matrices that are zero outside the box, computed with two batched matmuls for a
chunk of masks over the image region their boxes cover. Chunks are sized so that their float
intermediates stay under ``max_chunk_bytes``; the (R, H, W) output is bool when thresholded.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["paste_masks_in_image", "expand_boxes"]

_DEFAULT_CHUNK_BYTES = 1 << 26  # 64 MiB of float intermediates per chunk


def expand_boxes(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """(R, 4) XYXY boxes scaled by ``scale`` around their centres."""
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    center_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    center_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack([center_x - half_w, center_y - half_h,
                        center_x + half_w, center_y + half_h], dim=1)


def _interpolation_matrix(start: torch.Tensor, end: torch.Tensor, window: Tuple[int, int],
                          mask_extent: int, dtype: torch.dtype) -> torch.Tensor:
    """(R, P, mask_extent) weights of the bilinear resize of a ``mask_extent`` row of samples
    onto pixels ``start..end`` (inclusive integer corners) along one image axis, for the P pixels
    ``window[0] <= p < window[1]``; rows of pixels outside the box are zero. Same arithmetic as
    ``F.interpolate(mode="bilinear", align_corners=False)``: source = (dst + 0.5) * in / out - 0.5, clamped at 0, and the upper
    neighbour clamped to the last sample."""
    out_extent = (end - start + 1).clamp(min=1)
    pixels = torch.arange(window[0], window[1], device=start.device)
    dst = pixels[None, :] - start[:, None]
    scale = (mask_extent / out_extent.to(dtype))[:, None]
    src = ((dst.to(dtype) + 0.5) * scale - 0.5).clamp(min=0)
    low = src.floor()
    lam = src - low
    low = low.to(torch.int64).clamp(max=mask_extent - 1)
    high = (low + 1).clamp(max=mask_extent - 1)
    inside = (pixels[None, :] >= start[:, None]) & (pixels[None, :] <= end[:, None])
    lam = lam * inside
    weights = F.one_hot(low, mask_extent).to(dtype) * ((1 - lam) * inside)[..., None]
    weights += F.one_hot(high, mask_extent).to(dtype) * lam[..., None]
    return weights


def _chunk_window(corners: torch.Tensor, height: int, width: int) -> Tuple[int, int, int, int]:
    """The image region (x0, y0, x1, y1), end-exclusive, that the chunk's boxes with inclusive
    integer ``corners`` (R, 4) cover; only it is computed, as small objects are the common case."""
    low = corners[:, :2].min(dim=0).values.clamp(min=0).tolist()
    high = (corners[:, 2:].max(dim=0).values + 1).tolist()
    return low[0], low[1], min(high[0], width), min(high[1], height)


def paste_masks_in_image(masks: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int],
                         *, threshold: Optional[float] = 0.5, padding: int = 1,
                         max_chunk_bytes: int = _DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Masks of whole images from per-box mask probabilities.

    Args:
        masks: (R, M, M) or (R, 1, M, M) probabilities, one per box.
        boxes: (R, 4) XYXY boxes in the coordinates of the output image.
        image_size: (height, width) of the output image.
        threshold: output ``probability >= threshold`` as bool; None returns the float
            probabilities.
        padding: pixels of zero padding added around each mask before resizing (torchvision: 1).
        max_chunk_bytes: bound of the float intermediates of one chunk of masks (at least one
            mask per chunk).
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

    # per mask: the (H, W) float result and its bool threshold, the (H, M') partial product,
    # and per axis the weight matrix with its temporaries (two int64 one-hots, two float terms)
    item = padded.element_size()
    bytes_per_mask = (height * width * (item + 1) + height * mask_extent * item
                      + (height + width) * mask_extent * (3 * item + 16))
    chunk = max(1, int(max_chunk_bytes // bytes_per_mask))
    for begin in range(0, masks.shape[0], chunk):
        end = begin + chunk
        x0, y0, x1, y1 = _chunk_window(corners[begin:end], height, width)
        if x0 >= x1 or y0 >= y1:
            continue  # every box of the chunk is outside the image
        rows = _interpolation_matrix(corners[begin:end, 1], corners[begin:end, 3], (y0, y1),
                                     mask_extent, dtype)
        cols = _interpolation_matrix(corners[begin:end, 0], corners[begin:end, 2], (x0, x1),
                                     mask_extent, dtype)
        pasted = torch.bmm(torch.bmm(rows, padded[begin:end]), cols.transpose(1, 2))
        output[begin:end, y0:y1, x0:x1] = (pasted >= threshold if threshold is not None
                                           else pasted)
    return output
