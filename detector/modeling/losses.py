"""RetinaNet losses as pure functions of tensors.

Label convention per anchor: ``gt_labels`` in [0, num_classes) foreground class, ``num_classes``
background, -1 ignored (IoU between the matcher's thresholds, or matched to a crowd box).

Data-parallel training: DistributedDataParallel *averages* gradients over the W processes, each of
which sees N/W of the N images of a step. For the result to equal one process seeing all N images:
- "batch" normalisation divides the summed losses by the foreground-anchor count of the *whole*
  step. Each process therefore divides its local sums by ``max(1, F_all) / W`` (``F_all`` summed
  over processes, see ``num_foreground_all_ranks``); DDP's mean of the W gradients is then
  ``grad(sum over all images) / max(1, F_all)``, exactly the single-process gradient.
- "per_image" normalisation is a mean over images; with the same number of images per process
  (enforced by SOLVER.IMS_PER_BATCH % W == 0) the mean over processes of the per-process means is
  the mean over all images, so no cross-process term is needed.

The focal loss is fvcore's sigmoid focal loss (:func:`focal_loss_sum`), computed by
:func:`sparse_focal_loss_sum` in a few passes over the (R, K) logits: with one-hot targets almost
every entry is a negative, so it sums the negative term everywhere, derives its gradient in
closed form, and corrects the few foreground entries and ignored anchors. At EfficientDet's 49k
anchors x 90 classes this is ~10x faster than the generic per-element version.
"""
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from fvcore.nn import giou_loss, sigmoid_focal_loss, smooth_l1_loss

from .box_coder import BoxCoder

__all__ = ["BBOX_REG_LOSS_TYPES", "LOSS_NORMALIZATIONS", "focal_loss_sum",
           "sparse_focal_loss_sum", "box_regression_loss_sum", "retinanet_losses"]

BBOX_REG_LOSS_TYPES = ("smooth_l1", "giou")
LOSS_NORMALIZATIONS = ("batch", "per_image")


def focal_loss_sum(pred_logits: torch.Tensor, gt_labels: torch.Tensor, *, num_classes: int,
                   alpha: float, gamma: float) -> torch.Tensor:
    """Summed sigmoid focal loss of (R, K) logits against (R,) labels; ignored anchors (-1)
    excluded, background (``num_classes``) is an all-zero target."""
    valid = gt_labels >= 0
    targets = F.one_hot(gt_labels[valid], num_classes=num_classes + 1)[:, :num_classes]
    return sigmoid_focal_loss(pred_logits[valid], targets.to(pred_logits.dtype), alpha=alpha,
                              gamma=gamma, reduction="sum")


def _pow(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """x ** gamma, cheaper for effdet's 1.5 and RetinaNet's 2 (one new tensor)."""
    if gamma == 2.0:
        return x * x
    if gamma == 1.5:
        return x.sqrt().mul_(x)
    return x.pow(gamma)


class _SparseFocalLossSum(torch.autograd.Function):
    """Sum of the sigmoid focal loss of (M, K) logits with one-hot targets, given as the flat
    indices of the positive entries and the rows to ignore. Per entry, with p = sigmoid(x) and
    q = 1 - p: a negative contributes ``-(1 - a) p^g log q`` with gradient
    ``(1 - a) p^g (p - g q log q)``; a positive ``-a q^g log p`` with gradient
    ``-a q^g (q - g p log p)``. ``log q`` is taken from sigmoid(-x), exact where q is tiny."""

    @staticmethod
    def forward(ctx, logits, positive_idxs, ignored_rows, alpha: float, gamma: float):
        # few passes and three (M, K) temporaries: at ~10^7 entries memory traffic dominates
        x = logits.float()
        p = torch.sigmoid(x)
        log_q = torch.neg(x).sigmoid_().log_()
        p_gamma = _pow(p, gamma)
        # short dots per row, then a pairwise sum: one float32 dot over all ~10^7 entries
        # drifts by ~1e-4 relative
        total = -(1.0 - alpha) * torch.einsum("ij,ij->i", p_gamma, log_q).sum()
        # corrections read log_q before it becomes the gradient
        if ignored_rows.numel():
            total = total + (1.0 - alpha) * (p_gamma[ignored_rows] * log_q[ignored_rows]).sum()
        if positive_idxs.numel():
            x_pos = x.reshape(-1)[positive_idxs]
            p_pos = p.reshape(-1)[positive_idxs]
            q_pos = torch.sigmoid(-x_pos)
            log_p = F.logsigmoid(x_pos)
            q_gamma = _pow(q_pos, gamma)
            total = total - (alpha * q_gamma * log_p).sum() + (1.0 - alpha) * (
                p_gamma.reshape(-1)[positive_idxs] * log_q.reshape(-1)[positive_idxs]).sum()
        # the negatives' gradient without its (1 - a) factor, applied in backward (one pass less)
        neg_scale = 1.0 - alpha if alpha < 1.0 else 1.0
        grad = None
        if ctx.needs_input_grad[0]:
            grad = log_q.addcmul_(p, log_q, value=-1.0)  # q log q, in place
            torch.add(p, grad, alpha=-gamma, out=grad)
            grad.mul_(p_gamma)
            if alpha >= 1.0:
                grad.zero_()
            if ignored_rows.numel():
                grad[ignored_rows] = 0
            if positive_idxs.numel():
                grad.view(-1)[positive_idxs] = \
                    -alpha * q_gamma * (q_pos - gamma * p_pos * log_p) / neg_scale
            ctx.neg_scale = neg_scale
            ctx.consumed = False
            ctx.save_for_backward(grad)
        return total.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.consumed:
            raise RuntimeError("sparse_focal_loss_sum: backward through the same graph twice "
                               "is not supported (its gradient buffer is reused)")
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        grad.mul_(grad_output.float() * ctx.neg_scale)  # in place: no new (M, K) tensor
        return grad.to(grad_output.dtype), None, None, None, None


def sparse_focal_loss_sum(pred_logits: torch.Tensor, gt_labels: torch.Tensor, *,
                          num_classes: int, alpha: float = 0.25, gamma: float = 2.0
                          ) -> torch.Tensor:
    """Equal to :func:`detector.modeling.losses.focal_loss_sum` (same label convention: class in
    [0, K), K background, -1 ignored row) for (M, K) ``pred_logits`` and (M,) ``gt_labels``, with
    ``alpha`` >= 0, in a handful of passes over the logits."""
    if alpha < 0 or gamma < 0 or not math.isfinite(gamma):
        raise ValueError(f"sparse_focal_loss_sum needs alpha >= 0 and gamma >= 0, got {alpha}, "
                         f"{gamma}")
    logits = pred_logits.contiguous()
    fg = (gt_labels >= 0) & (gt_labels < num_classes)
    rows = torch.nonzero(fg).squeeze(1)
    positive_idxs = rows * num_classes + gt_labels[rows]
    ignored_rows = torch.nonzero(gt_labels < 0).squeeze(1)
    return _SparseFocalLossSum.apply(logits, positive_idxs, ignored_rows, float(alpha),
                                     float(gamma))


def box_regression_loss_sum(loss_type: str, pred_deltas: torch.Tensor, anchors: torch.Tensor,
                            gt_boxes: torch.Tensor, *, box_coder: BoxCoder,
                            smooth_l1_beta: float = 0.0) -> torch.Tensor:
    """Summed box loss over foreground anchors: smooth-L1 on encoded deltas (beta 0 = L1) or GIoU on
    decoded boxes. All inputs are (F, 4)."""
    if loss_type == "smooth_l1":
        gt_deltas = box_coder.encode(gt_boxes, anchors)
        return smooth_l1_loss(pred_deltas, gt_deltas, beta=smooth_l1_beta, reduction="sum")
    if loss_type == "giou":
        pred_boxes = box_coder.decode(pred_deltas, anchors)
        return giou_loss(pred_boxes, gt_boxes, reduction="sum")
    raise ValueError(f"MODEL.RETINANET.BBOX_REG_LOSS_TYPE='{loss_type}' is not one of "
                     f"{BBOX_REG_LOSS_TYPES}")


def retinanet_losses(pred_logits: torch.Tensor, pred_deltas: torch.Tensor, anchors: torch.Tensor,
                     gt_labels: torch.Tensor, matched_gt_boxes: torch.Tensor, *, num_classes: int,
                     box_coder: BoxCoder, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                     bbox_reg_loss_type: str = "smooth_l1", smooth_l1_beta: float = 0.0,
                     normalization: str = "batch",
                     num_foreground_all_ranks: Optional[float] = None,
                     world_size: int = 1) -> Dict[str, torch.Tensor]:
    """Focal classification loss and box regression loss of a batch.

    Args:
        pred_logits: (N, R, K) class logits. pred_deltas: (N, R, 4) box deltas.
        anchors: (R, 4) anchors shared by all images.
        gt_labels: (N, R) int64 labels (see module docstring).
        matched_gt_boxes: (N, R, 4) ground truth box of each anchor (used where foreground).
        normalization: "batch" divides batch sums by the batch's foreground count (at least 1);
            "per_image" (torchvision) divides each image's sums by its own foreground count (at
            least 1) and averages over images.
        num_foreground_all_ranks, world_size: for "batch" normalisation under data parallelism,
            the foreground-anchor count summed over all ``world_size`` processes; the local sums
            are then divided by ``max(1, num_foreground_all_ranks) / world_size`` so that averaged
            gradients equal the single-process ones (module docstring). None: this batch's own
            count (single process). Ignored by "per_image".
    Returns: ``{"loss_cls", "loss_box_reg"}`` scalar tensors.
    """
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"MODEL.RETINANET.LOSS_NORMALIZATION='{normalization}' is not one of "
                         f"{LOSS_NORMALIZATIONS}")
    if world_size < 1:
        raise ValueError(f"retinanet_losses: world_size must be >= 1, got {world_size}")
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
        if num_foreground_all_ranks is None:
            normalizer = max(1, sum(num_fg))
        else:
            normalizer = max(1.0, float(num_foreground_all_ranks)) / world_size
        return {"loss_cls": cls_sums.sum() / normalizer,
                "loss_box_reg": box_sums.sum() / normalizer}
    per_image = torch.tensor([max(1, n) for n in num_fg], dtype=cls_sums.dtype,
                             device=cls_sums.device)
    return {"loss_cls": (cls_sums / per_image).mean(),
            "loss_box_reg": (box_sums / per_image).mean()}
