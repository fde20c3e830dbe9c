"""Fast R-CNN box-head losses: softmax classification over K classes plus background, and
class-specific box regression of the foreground proposals.

Class layout (kept in this one place): logits are (R, K + 1) with background at index K, as in
detectron2; box deltas are (R, 4 K) with class c at columns 4c..4c+3, or (R, 4) class-agnostic.
torchvision puts background at index 0 and predicts 4 (K + 1) deltas; its weights convert by
moving row 0 of ``cls_score`` to the end and dropping the first 4 rows of ``bbox_pred``.
"""
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F

from ..box_coder import BoxCoder
from .focal import box_regression_loss_sum

__all__ = ["fast_rcnn_losses", "select_class_deltas"]


def select_class_deltas(pred_deltas: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(R, 4) deltas of class ``classes[i]`` for every row of the (R, 4 K) class-specific
    ``pred_deltas``; (R, 4) class-agnostic deltas are returned as they are."""
    if pred_deltas.shape[1] == 4:
        return pred_deltas
    rows = torch.arange(pred_deltas.shape[0], device=pred_deltas.device)
    return pred_deltas.view(pred_deltas.shape[0], pred_deltas.shape[1] // 4, 4)[rows, classes]


def fast_rcnn_losses(pred_class_logits: torch.Tensor, pred_proposal_deltas: torch.Tensor,
                     proposal_boxes: torch.Tensor, gt_classes: torch.Tensor,
                     gt_boxes: torch.Tensor, *, box_coder: BoxCoder,
                     loss_type: str = "smooth_l1", smooth_l1_beta: float = 0.0,
                     box_loss_weight: float = 1.0,
                     normalizer: Optional[Union[float, torch.Tensor]] = None
                     ) -> Dict[str, torch.Tensor]:
    """``loss_cls`` (cross-entropy summed over the sampled proposals) and ``loss_box_reg`` (box
    loss summed over the foreground proposals), both divided by the number of sampled proposals
    (``normalizer``), as detectron2 and torchvision do: ``loss_cls`` is then their mean.

    Args:
        pred_class_logits: (R, K + 1), background at index K.
        pred_proposal_deltas: (R, 4 K) class-specific or (R, 4) class-agnostic.
        proposal_boxes: (R, 4) XYXY sampled proposals the deltas are relative to.
        gt_classes: (R,) int64 in [0, K], K = background.
        gt_boxes: (R, 4) XYXY matched ground truth (ignored for background rows).
        loss_type: "smooth_l1" on encoded deltas (beta 0 = L1; torchvision: beta 1/9) or "giou"
            on decoded boxes.
        normalizer: divisor of both sums; None: this batch's sampled proposals. Under data
            parallelism the sampled proposals of all W processes divided by W, so that DDP's
            averaged gradient is that of the whole batch.
    """
    num_classes = pred_class_logits.shape[1] - 1
    num_sampled = gt_classes.numel()
    if num_sampled == 0:
        # keeps every parameter in the graph so data-parallel gradient reduction still runs
        zero = pred_class_logits.sum() * 0.0 + pred_proposal_deltas.sum() * 0.0
        return {"loss_cls": zero, "loss_box_reg": zero.clone()}
    if normalizer is None:
        normalizer = float(num_sampled)
    # the mean rescaled, rather than the sum divided: bitwise the mean when normalizer equals
    # the local count (one process), as torchvision computes it
    loss_cls = F.cross_entropy(pred_class_logits, gt_classes, reduction="mean") * (
        num_sampled / normalizer)
    foreground = torch.nonzero((gt_classes >= 0) & (gt_classes < num_classes)).squeeze(1)
    fg_deltas = select_class_deltas(pred_proposal_deltas[foreground], gt_classes[foreground])
    loss_box_reg = box_regression_loss_sum(
        loss_type, fg_deltas, proposal_boxes[foreground], gt_boxes[foreground],
        box_coder=box_coder, smooth_l1_beta=smooth_l1_beta)
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg * box_loss_weight / normalizer}
