"""Mask R-CNN mask targets and loss.

Targets are the ground-truth masks resampled inside each positive proposal by RoIAlign of the
full-image masks, one batched op for all proposals. Two conventions:
- "binary" (detectron2): half-pixel aligned RoIAlign, then thresholded at 0.5;
- "soft" (torchvision): unaligned RoIAlign, the fractional coverage kept as the target.
"""
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

__all__ = ["MASK_TARGET_TYPES", "mask_rcnn_targets", "mask_rcnn_loss"]

# target type -> (RoIAlign aligned, binarise at 0.5)
MASK_TARGET_TYPES: Dict[str, tuple] = {"binary": (True, True), "soft": (False, False)}


def mask_rcnn_targets(gt_masks: torch.Tensor, gt_idxs: torch.Tensor, boxes: torch.Tensor,
                      mask_size: int, target_type: str = "binary") -> torch.Tensor:
    """(R, M, M) float targets: ground-truth mask ``gt_idxs[i]`` of the (G, H, W) full-image
    ``gt_masks`` (bool or float, network-input pixels), resampled inside the XYXY box
    ``boxes[i]`` at M x M.

    Only the masks some proposal uses are converted to float, so a crowded image costs memory
    for its positive instances only. Sampling points per bin are adaptive (RoIAlign's <= 0).
    """
    if target_type not in MASK_TARGET_TYPES:
        raise ValueError(f"MODEL.ROI_MASK_HEAD.TARGET_TYPE='{target_type}' is not one of "
                         f"{sorted(MASK_TARGET_TYPES)}")
    aligned, binarize = MASK_TARGET_TYPES[target_type]
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, mask_size, mask_size))
    used, local_idxs = torch.unique(gt_idxs, return_inverse=True)
    masks = gt_masks[used].to(dtype=boxes.dtype, device=boxes.device)[:, None]
    rois = torch.cat([local_idxs.to(boxes.dtype)[:, None], boxes], dim=1)
    targets = roi_align(masks, rois, (mask_size, mask_size), spatial_scale=1.0,
                        sampling_ratio=0, aligned=aligned)[:, 0]
    if binarize:
        targets = (targets >= 0.5).to(boxes.dtype)
    return targets


def mask_rcnn_loss(pred_mask_logits: torch.Tensor, gt_classes: torch.Tensor,
                   mask_targets: torch.Tensor, *,
                   normalizer: Optional[Union[float, torch.Tensor]] = None) -> torch.Tensor:
    """Per-pixel binary cross-entropy between the ground-truth class's mask logits and the
    targets, summed and divided by M x M x ``normalizer`` positive proposals: the mean per pixel
    when ``normalizer`` is this batch's R.

    Args:
        pred_mask_logits: (R, K, M, M) per-class, or (R, 1, M, M) class-agnostic, logits of the
            positive proposals.
        gt_classes: (R,) int64 foreground class of each proposal's ground truth.
        mask_targets: (R, M, M) in [0, 1] (see :func:`mask_rcnn_targets`).
        normalizer: positive proposals the sum is divided by (None: R). Under data parallelism
            those of all W processes divided by W, so that DDP's averaged gradient is that of the
            whole batch.
    """
    if mask_targets.numel() == 0:
        # keeps every parameter in the graph so data-parallel gradient reduction still runs
        return pred_mask_logits.sum() * 0.0
    if pred_mask_logits.shape[1] == 1:
        logits = pred_mask_logits[:, 0]
    else:
        rows = torch.arange(pred_mask_logits.shape[0], device=pred_mask_logits.device)
        logits = pred_mask_logits[rows, gt_classes]
    loss = F.binary_cross_entropy_with_logits(logits, mask_targets.to(logits.dtype),
                                              reduction="mean")
    if normalizer is None:
        return loss
    # the mean rescaled: bitwise the mean when normalizer equals the local R (one process)
    return loss * (mask_targets.shape[0] / normalizer)
