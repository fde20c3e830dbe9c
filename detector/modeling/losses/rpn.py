"""The RPN's losses: binary cross-entropy on objectness and a box regression loss on the
positive anchors, both summed over the sampled anchors of the batch and divided by one normaliser.

Normalisers (``MODEL.RPN.LOSS_NORMALIZATION``):
- "batch_size": images x ``BATCH_SIZE_PER_IMAGE`` (detectron2), whatever was actually sampled.
- "num_sampled": the anchors actually sampled (torchvision: its objectness loss is a mean over the
  sampled anchors and its box loss is divided by their count).
Under data parallelism the counts can be summed over the W processes and divided by W
(:func:`rpn_loss_count` gives one process's count), so DDP's averaged gradients equal one process's
over the whole batch.
"""
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F

from ..box_coder import BoxCoder
from .focal import BBOX_REG_LOSS_TYPES, box_regression_loss_sum

__all__ = ["RPN_LOSS_NORMALIZATIONS", "check_rpn_loss_options", "rpn_loss_count", "rpn_losses"]

RPN_LOSS_NORMALIZATIONS = ("batch_size", "num_sampled")


def check_rpn_loss_options(*, bbox_reg_loss_type: Optional[str] = None,
                           normalization: Optional[str] = None) -> None:
    """One-line errors naming the config keys for unknown RPN loss options (None: not checked)."""
    if bbox_reg_loss_type is not None and bbox_reg_loss_type not in BBOX_REG_LOSS_TYPES:
        raise ValueError(f"MODEL.RPN.BBOX_REG_LOSS_TYPE='{bbox_reg_loss_type}' is not one of "
                         f"{BBOX_REG_LOSS_TYPES}")
    if normalization is not None and normalization not in RPN_LOSS_NORMALIZATIONS:
        raise ValueError(f"MODEL.RPN.LOSS_NORMALIZATION='{normalization}' is not one of "
                         f"{RPN_LOSS_NORMALIZATIONS}")


def rpn_loss_count(gt_labels: torch.Tensor, *, normalization: str,
                   batch_size_per_image: int) -> torch.Tensor:
    """The loss normaliser of this batch as a float tensor before clamping: the anchors sampled
    in ``gt_labels`` (N, R) (1 positive, 0 negative, -1 not sampled) or N x
    ``batch_size_per_image``. Divide by ``max(count, 1)``; under data parallelism by
    ``max(sum of the counts of all processes, 1) / W``."""
    check_rpn_loss_options(normalization=normalization)
    if normalization == "num_sampled":
        return (gt_labels >= 0).sum().to(torch.float32)
    return torch.tensor(float(gt_labels.shape[0] * batch_size_per_image), device=gt_labels.device)


def rpn_losses(pred_objectness_logits: torch.Tensor, pred_anchor_deltas: torch.Tensor,
               anchors: torch.Tensor, gt_labels: torch.Tensor, matched_gt_boxes: torch.Tensor, *,
               box_coder: BoxCoder, normalizer: Union[float, torch.Tensor],
               bbox_reg_loss_type: str = "smooth_l1", smooth_l1_beta: float = 0.0,
               loss_weight: float = 1.0, bbox_reg_loss_weight: float = 1.0
               ) -> Dict[str, torch.Tensor]:
    """Objectness and box losses of a batch.

    Args:
        pred_objectness_logits: (N, R) logits. pred_anchor_deltas: (N, R, 4) box deltas.
        anchors: (R, 4) anchors shared by all images.
        gt_labels: (N, R) sampled labels: 1 positive, 0 negative, -1 not sampled.
        matched_gt_boxes: (N, R, 4) ground truth box of each anchor (read where positive).
        normalizer: divisor of both sums (from :func:`rpn_loss_count`).
        smooth_l1_beta: 0 gives L1 (detectron2); torchvision uses 1/9.
        loss_weight: multiplies both losses; bbox_reg_loss_weight further multiplies the box loss.
    Returns: ``{"loss_rpn_cls", "loss_rpn_loc"}`` scalar tensors.
    """
    check_rpn_loss_options(bbox_reg_loss_type=bbox_reg_loss_type)
    sampled = gt_labels >= 0
    positive = gt_labels == 1
    logits = pred_objectness_logits[sampled].float()
    loss_cls = F.binary_cross_entropy_with_logits(logits, gt_labels[sampled].to(logits.dtype),
                                                  reduction="sum")
    num_images = gt_labels.shape[0]
    anchors = anchors.unsqueeze(0).expand(num_images, -1, -1)
    loss_loc = box_regression_loss_sum(
        bbox_reg_loss_type, pred_anchor_deltas[positive].float(), anchors[positive],
        matched_gt_boxes[positive], box_coder=box_coder, smooth_l1_beta=smooth_l1_beta)
    return {"loss_rpn_cls": loss_cls / normalizer * loss_weight,
            "loss_rpn_loc": loss_loc / normalizer * (loss_weight * bbox_reg_loss_weight)}
