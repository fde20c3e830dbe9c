"""RetinaNet's loss assembly: focal classification and box regression sums (from
:mod:`.focal`) with RetinaNet's normalisers.

Data-parallel training: DistributedDataParallel *averages* gradients over the W processes, each of
which sees N/W of the N images of a step. For the result to equal one process seeing all N images:
- "batch" normalisation divides the summed losses by the foreground-anchor count of the *whole*
  step. Each process therefore divides its local sums by ``max(1, F_all) / W`` (``F_all`` summed
  over processes; :meth:`DenseDetector.loss_normalizer` computes it); DDP's mean of the W
  gradients is then ``grad(sum over all images) / max(1, F_all)``, exactly the single-process
  gradient.
- "per_image" normalisation is a mean over images; with the same number of images per process
  (enforced by SOLVER.IMS_PER_BATCH % W == 0) the mean over processes of the per-process means is
  the mean over all images, so no cross-process term is needed.
"""
from typing import Dict, Optional, Union

import torch

from ..box_coder import BoxCoder
from .focal import BBOX_REG_LOSS_TYPES, box_regression_loss_sum, sparse_focal_loss_sum

__all__ = ["LOSS_NORMALIZATIONS", "check_retinanet_loss_options", "retinanet_losses"]

LOSS_NORMALIZATIONS = ("batch", "per_image")


def check_retinanet_loss_options(bbox_reg_loss_type: str, normalization: str) -> None:
    """One-line errors naming the config keys for unknown loss options."""
    if bbox_reg_loss_type not in BBOX_REG_LOSS_TYPES:
        raise ValueError(f"MODEL.RETINANET.BBOX_REG_LOSS_TYPE='{bbox_reg_loss_type}' is not one "
                         f"of {BBOX_REG_LOSS_TYPES}")
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"MODEL.RETINANET.LOSS_NORMALIZATION='{normalization}' is not one of "
                         f"{LOSS_NORMALIZATIONS}")


def retinanet_losses(pred_logits: torch.Tensor, pred_deltas: torch.Tensor, anchors: torch.Tensor,
                     gt_labels: torch.Tensor, matched_gt_boxes: torch.Tensor, *, num_classes: int,
                     box_coder: BoxCoder, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                     bbox_reg_loss_type: str = "smooth_l1", smooth_l1_beta: float = 0.0,
                     normalization: str = "batch",
                     normalizer: Optional[Union[float, torch.Tensor]] = None
                     ) -> Dict[str, torch.Tensor]:
    """Focal classification loss and box regression loss of a batch.

    Args:
        pred_logits: (N, R, K) class logits. pred_deltas: (N, R, 4) box deltas.
        anchors: (R, 4) anchors shared by all images.
        gt_labels: (N, R) int64 labels (see module docstring).
        matched_gt_boxes: (N, R, 4) ground truth box of each anchor (used where foreground).
        normalization: "batch" divides batch sums by the batch's foreground count (at least 1);
            "per_image" (torchvision) divides each image's sums by its own foreground count (at
            least 1) and averages over images.
        normalizer: for "batch" normalisation, the divisor to use instead of this batch's
            ``max(1, F)``; under data parallelism ``max(1, F_all) / W`` (module docstring).
            Ignored by "per_image".
    Returns: ``{"loss_cls", "loss_box_reg"}`` scalar tensors.
    """
    check_retinanet_loss_options(bbox_reg_loss_type, normalization)
    cls_sums, box_sums, num_fg = [], [], []
    for logits_i, deltas_i, labels_i, boxes_i in zip(pred_logits, pred_deltas, gt_labels,
                                                     matched_gt_boxes):
        fg = (labels_i >= 0) & (labels_i < num_classes)
        cls_sums.append(sparse_focal_loss_sum(logits_i, labels_i, num_classes=num_classes,
                                              alpha=focal_alpha, gamma=focal_gamma))
        box_sums.append(box_regression_loss_sum(bbox_reg_loss_type, deltas_i[fg], anchors[fg],
                                                boxes_i[fg], box_coder=box_coder,
                                                smooth_l1_beta=smooth_l1_beta))
        num_fg.append(int(fg.sum()))
    cls_sums, box_sums = torch.stack(cls_sums), torch.stack(box_sums)
    if normalization == "batch":
        if normalizer is None:
            normalizer = max(1, sum(num_fg))
        return {"loss_cls": cls_sums.sum() / normalizer,
                "loss_box_reg": box_sums.sum() / normalizer}
    per_image = torch.tensor([max(1, n) for n in num_fg], dtype=cls_sums.dtype,
                             device=cls_sums.device)
    return {"loss_cls": (cls_sums / per_image).mean(),
            "loss_box_reg": (box_sums / per_image).mean()}
