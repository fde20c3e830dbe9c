"""EfficientDet losses (effdet / TF EfficientDet): focal loss plus a Huber or GIoU box loss, as pure
functions. The per-anchor sums come from :mod:`.focal`; what differs from RetinaNet is the
weighting and the normaliser:

- normaliser ``F + 1`` with F the foreground anchors of the whole batch (effdet's
  ``num_positives.sum() + 1``), so a batch without objects still has a finite loss;
- Huber loss with delta d = ``d * smooth_l1(beta=d)``, divided by ``4 (F + 1)`` and multiplied by
  ``box_loss_weight`` (effdet: d = 0.1, weight 50);
- GIoU option: ``giou_loss_weight * sum(1 - GIoU) / (F + 1)`` on decoded boxes.

The focal loss is :func:`.focal.sparse_focal_loss_sum` over the (N * R, K) logits of the batch.
"""
from typing import Dict, List, Optional, Union

import torch

from ..box_coder import BoxCoder
from .focal import box_regression_loss_sum, sparse_focal_loss_sum

__all__ = ["EFFICIENTDET_BOX_LOSS_TYPES", "efficientdet_losses"]

EFFICIENTDET_BOX_LOSS_TYPES = ("huber", "giou")


def efficientdet_losses(pred_logits: Union[torch.Tensor, List[torch.Tensor]],
                        pred_deltas: torch.Tensor,
                        anchors: torch.Tensor, gt_labels: torch.Tensor,
                        matched_gt_boxes: torch.Tensor, *, num_classes: int, box_coder: BoxCoder,
                        focal_alpha: float = 0.25, focal_gamma: float = 1.5,
                        box_loss_type: str = "huber", huber_delta: float = 0.1,
                        box_loss_weight: float = 50.0, giou_loss_weight: float = 1.0,
                        normalizer: Optional[torch.Tensor] = None
                        ) -> Dict[str, torch.Tensor]:
    """Args:
        pred_logits: (N, R, K) class logits, or a list of per-level (N, R_l, K) logits (the R
            anchors in order), which saves concatenating the largest tensor of the step.
        pred_deltas: (N, R, 4) box deltas.
        anchors: (R, 4) anchors shared by the batch.
        gt_labels: (N, R) int64, class in [0, K), K background, -1 ignored.
        matched_gt_boxes: (N, R, 4) ground truth box of each anchor (used where foreground).
        normalizer: the divisor to use instead of this batch's ``F + 1``; under data
            parallelism with W processes, ``(F_all + 1) / W`` (``F_all`` summed over processes,
            :meth:`DenseDetector.loss_normalizer`) makes the averaged gradients equal those of
            one process seeing every image.
    Returns: ``{"loss_cls", "loss_box_reg"}``; their sum is effdet's total loss.
    """
    if box_loss_type not in EFFICIENTDET_BOX_LOSS_TYPES:
        raise ValueError(f"MODEL.EFFICIENTDET.BOX_LOSS_TYPE='{box_loss_type}' is not one of "
                         f"{EFFICIENTDET_BOX_LOSS_TYPES}")
    fg = (gt_labels >= 0) & (gt_labels < num_classes)
    if normalizer is None:
        normalizer = fg.sum() + 1.0  # a tensor: no device synchronisation
    normalizer = torch.as_tensor(normalizer, dtype=torch.float32, device=gt_labels.device)
    per_level = [pred_logits] if isinstance(pred_logits, torch.Tensor) else list(pred_logits)
    if sum(x.shape[1] for x in per_level) != gt_labels.shape[1]:
        raise ValueError(f"efficientdet_losses: {sum(x.shape[1] for x in per_level)} predicted "
                         f"anchors but {gt_labels.shape[1]} labels per image")
    loss_cls, start = 0.0, 0
    for logits in per_level:
        labels = gt_labels[:, start:start + logits.shape[1]]
        start += logits.shape[1]
        loss_cls = loss_cls + sparse_focal_loss_sum(
            logits.reshape(-1, num_classes), labels.reshape(-1), num_classes=num_classes,
            alpha=focal_alpha, gamma=focal_gamma)
    fg_anchors = anchors.unsqueeze(0).expand(gt_labels.shape[0], -1, -1)[fg]
    if box_loss_type == "huber":
        box_sum = box_regression_loss_sum("smooth_l1", pred_deltas[fg], fg_anchors,
                                          matched_gt_boxes[fg], box_coder=box_coder,
                                          smooth_l1_beta=huber_delta) * huber_delta
        loss_box = box_loss_weight * box_sum / (4.0 * normalizer)
    else:
        box_sum = box_regression_loss_sum("giou", pred_deltas[fg], fg_anchors,
                                          matched_gt_boxes[fg], box_coder=box_coder)
        loss_box = giou_loss_weight * box_sum / normalizer
    return {"loss_cls": loss_cls / normalizer, "loss_box_reg": loss_box}
