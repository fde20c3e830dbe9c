import math

import pytest
import torch

from detector.modeling import BoxCoder
from detector.modeling.losses import (
    box_regression_loss_sum,
    focal_loss_sum,
    retinanet_losses,
    sparse_focal_loss_sum,
)


def _focal(logit, target, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-logit))
    p_t = p if target else 1 - p
    alpha_t = alpha if target else 1 - alpha
    return -alpha_t * (1 - p_t) ** gamma * math.log(p_t)


def test_focal_loss_hand_computed_with_ignored_and_background():
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [5.0, 5.0]])
    labels = torch.tensor([0, 2, -1])  # class 0, background (K=2), ignored
    expected = _focal(0.0, 1) + _focal(1.0, 0) + _focal(2.0, 0) + _focal(-1.0, 0)
    got = focal_loss_sum(logits, labels, num_classes=2, alpha=0.25, gamma=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_smooth_l1_and_l1_hand_computed():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = anchors.clone()  # target deltas are 0
    pred = torch.tensor([[0.5, -0.5, 0.1, 0.0]])
    coder = BoxCoder()
    l1 = box_regression_loss_sum("smooth_l1", pred, anchors, gt, box_coder=coder,
                                 smooth_l1_beta=0.0)
    assert l1.item() == pytest.approx(1.1, rel=1e-6)
    smooth = box_regression_loss_sum("smooth_l1", pred, anchors, gt, box_coder=coder,
                                     smooth_l1_beta=1.0)
    assert smooth.item() == pytest.approx(0.5 * 0.25 * 2 + 0.5 * 0.01, rel=1e-6)


def test_giou_on_decoded_boxes_hand_computed():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    pred = torch.zeros(2, 4)  # decodes to the anchors
    gt = torch.tensor([[5.0, 0.0, 15.0, 10.0],     # IoU 1/3, enclosing box = union
                       [20.0, 0.0, 30.0, 10.0]])   # disjoint: IoU 0, enclosing 300, union 200
    loss = box_regression_loss_sum("giou", pred, anchors, gt, box_coder=BoxCoder())
    expected = (1 - 1 / 3) + (1 - (0 - (300 - 200) / 300))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="box regression loss 'iou' is not one of"):
        box_regression_loss_sum("iou", pred, anchors, gt, box_coder=BoxCoder())


def _two_image_batch():
    """Image 0: two fg anchors with L1 box sums 1 and 3; image 1: one fg anchor with L1 sum 5."""
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    gt_boxes = anchors[None].repeat(2, 1, 1)
    deltas = torch.tensor([[[1.0, 0, 0, 0], [1.0, 1.0, 1.0, 0], [9.0, 9, 9, 9]],
                           [[0.0, 0, 0, 5.0], [7.0, 7, 7, 7], [7.0, 7, 7, 7]]])
    labels = torch.tensor([[0, 1, -1], [2, 3, 3]])  # K=3: 3 = background, -1 ignored
    logits = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [9.0, 9, 9]],
                           [[0.0, 0, 2.0], [-1.0, 0, 0], [0.0, 3.0, 0]]])
    cls_sums = [
        _focal(0, 1) + 2 * _focal(0, 0) + _focal(1, 0) + _focal(0, 1) + _focal(0, 0),
        2 * _focal(0, 0) + _focal(2, 1) + _focal(-1, 0) + 2 * _focal(0, 0) + 2 * _focal(0, 0)
        + _focal(3, 0),
    ]
    return logits, deltas, anchors, labels, gt_boxes, cls_sums


@pytest.mark.parametrize("normalization", ["batch", "per_image"])
def test_normalization(normalization):
    logits, deltas, anchors, labels, gt_boxes, cls_sums = _two_image_batch()
    losses = retinanet_losses(logits, deltas, anchors, labels, gt_boxes, num_classes=3,
                              box_coder=BoxCoder(), smooth_l1_beta=0.0, normalization=normalization)
    if normalization == "batch":
        expected_box, expected_cls = (4 + 5) / 3, sum(cls_sums) / 3
    else:
        expected_box, expected_cls = (4 / 2 + 5 / 1) / 2, (cls_sums[0] / 2 + cls_sums[1] / 1) / 2
    assert losses["loss_box_reg"].item() == pytest.approx(expected_box, rel=1e-6)
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-6)


def test_no_foreground_divides_by_one_and_keeps_gradients():
    logits = torch.zeros(1, 4, 2, requires_grad=True)
    deltas = torch.zeros(1, 4, 4, requires_grad=True)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4)
    labels = torch.full((1, 4), 2)
    for normalization in ("batch", "per_image"):
        losses = retinanet_losses(logits, deltas, anchors, labels, anchors[None], num_classes=2,
                                  box_coder=BoxCoder(), normalization=normalization)
        assert losses["loss_cls"].item() == pytest.approx(8 * _focal(0, 0), rel=1e-6)
        assert losses["loss_box_reg"].item() == 0.0
    (losses["loss_cls"] + losses["loss_box_reg"]).backward()
    assert deltas.grad is not None and torch.count_nonzero(deltas.grad) == 0


def test_unknown_normalization():
    logits, deltas, anchors, labels, gt_boxes, _ = _two_image_batch()
    with pytest.raises(ValueError, match="LOSS_NORMALIZATION='image'"):
        retinanet_losses(logits, deltas, anchors, labels, gt_boxes, num_classes=3,
                         box_coder=BoxCoder(), normalization="image")


@pytest.mark.parametrize("gamma", [1.5, 2.0, 0.7])
def test_sparse_focal_loss_equals_the_generic_one(gamma):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(600, 7, generator=g) * 4).requires_grad_()
    labels = torch.randint(-1, 8, (600,), generator=g)  # -1 ignored, 7 background
    logits.data[:5] = 30.0  # confident mistakes: log(1 - p) must stay exact
    expected = focal_loss_sum(logits, labels, num_classes=7, alpha=0.25, gamma=gamma)
    (expected_grad,) = torch.autograd.grad(expected * 3.0, logits)
    got = sparse_focal_loss_sum(logits, labels, num_classes=7, alpha=0.25, gamma=gamma)
    (got_grad,) = torch.autograd.grad(got * 3.0, logits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # autograd through (1 - p) ** gamma gives 0 * inf = nan at p == 1 for gamma < 1; the closed
    # form has the true limit 0
    assert torch.isfinite(got_grad).all()
    finite = torch.isfinite(expected_grad)
    assert finite.float().mean() > 0.99
    torch.testing.assert_close(got_grad[finite], expected_grad[finite], rtol=1e-5, atol=1e-6)
    assert float(got.detach()) > 5 * 30 * 0.75  # the five confident mistakes count fully


def test_sparse_focal_loss_stays_exact_at_detector_scale():
    """~2M logits, as a RetinaNet batch has: the sum must not drift as one long float32 dot does."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20000, 91, generator=g) * 2 - 4.6  # the prior-probability bias
    labels = torch.full((20000,), 91)
    labels[torch.randint(0, 20000, (300,), generator=g)] = torch.randint(0, 91, (300,), generator=g)
    labels[:50] = -1
    expected = focal_loss_sum(logits.double(), labels, num_classes=91, alpha=0.25, gamma=2.0)
    got = sparse_focal_loss_sum(logits, labels, num_classes=91, alpha=0.25, gamma=2.0)
    assert abs(float(got) - float(expected)) / float(expected) < 1e-6
