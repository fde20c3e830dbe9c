"""Generic per-anchor loss sums shared by the dense detectors, as pure functions of tensors.

Label convention per anchor: ``gt_labels`` in [0, num_classes) foreground class, ``num_classes``
background, -1 ignored. Each function returns a *sum*; the model-specific assembly (RetinaNet's,
EfficientDet's) chooses the weights and the normaliser.

The focal loss is fvcore's sigmoid focal loss (:func:`focal_loss_sum`), computed by
:func:`sparse_focal_loss_sum` in a few passes over the (R, K) logits: with one-hot targets almost
every entry is a negative, so it sums the negative term everywhere, derives its gradient in
closed form, and corrects the few foreground entries and ignored anchors. At EfficientDet's 49k
anchors x 90 classes this is ~10x faster than the generic per-element version.
"""
import math
import warnings

import torch
import torch.nn.functional as F

from ..box_coder import BoxCoder

with warnings.catch_warnings():
    # fvcore.nn scripts two functions we do not use at import time; torch warns about that
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.script")
    from fvcore.nn import giou_loss, sigmoid_focal_loss, smooth_l1_loss

__all__ = ["BBOX_REG_LOSS_TYPES", "focal_loss_sum", "sparse_focal_loss_sum",
           "box_regression_loss_sum"]

BBOX_REG_LOSS_TYPES = ("smooth_l1", "giou")


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
    """Equal to :func:`focal_loss_sum` (same label convention: class in
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
    raise ValueError(f"box regression loss '{loss_type}' is not one of {BBOX_REG_LOSS_TYPES}")
