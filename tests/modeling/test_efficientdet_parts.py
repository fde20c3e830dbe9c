"""EfficientDet's small pieces: effdet anchors, the sparse focal loss, loss weighting and
normalisation, batched inference."""
import pytest
import torch

from detector.layers import NormSpec
from detector.modeling.anchor_generator import AnchorGenerator, efficientdet_anchor_generator
from detector.modeling.box_coder import BoxCoder
from detector.modeling.losses import efficientdet_losses, focal_loss_sum
from detector.modeling.postprocessing import efficientdet_inference

ASPECTS = [[1.0, 1.0], [1.4, 0.7], [0.7, 1.4]]


@pytest.mark.parametrize("size,anchor_scale", [(512, 4.0), (256, 5.0), ((384, 640), 4.0)])
def test_anchors_equal_effdet(size, anchor_scale):
    from effdet.anchors import Anchors

    h, w = (size, size) if isinstance(size, int) else size
    theirs = Anchors(3, 7, 3, [tuple(a) for a in ASPECTS], anchor_scale, (h, w)).boxes
    generator = efficientdet_anchor_generator(min_level=3, max_level=7, anchor_scale=anchor_scale,
                                              num_scales=3, aspect_ratios=ASPECTS)
    features = [torch.zeros(1, 1, h // 2 ** k, w // 2 ** k) for k in range(3, 8)]
    ours = torch.cat(generator(features))
    assert generator.num_anchors_per_location == 9
    assert torch.equal(ours, theirs[:, [1, 0, 3, 2]])  # effdet stores (y1, x1, y2, x2)


def test_existing_anchor_layout_is_unchanged_by_the_effdet_option():
    kwargs = dict(sizes=[[32], [64]], scales=[1.0, 2 ** 0.5], ratios=[0.5, 1.0, 2.0],
                  strides=[8, 16], offset=0.0, round_base_anchors=True)
    default = AnchorGenerator(**kwargs)
    explicit = AnchorGenerator(**kwargs, aspect_multipliers=(), scale_major=False)
    features = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
    assert all(torch.equal(a, b) for a, b in zip(default(features), explicit(features)))
    scale_major = AnchorGenerator(**kwargs, scale_major=True).base_anchors(0)
    # same anchors per location, reordered from (ratio, scale) to (scale, ratio)
    reordered = default.base_anchors(0).reshape(3, 2, 4).transpose(0, 1).reshape(-1, 4)
    assert torch.equal(scale_major, reordered)


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 25.0], [0.0, 0.0, 40.0, 20.0],
                            [30.0, 30.0, 50.0, 60.0]])
    logits = torch.randn(2, 4, 3, generator=g).requires_grad_()
    deltas = (torch.randn(2, 4, 4, generator=g) * 0.1).requires_grad_()
    labels = torch.tensor([[0, 3, 2, 3], [3, 3, -1, 1]])
    gt_boxes = torch.tensor([[1.0, 2.0, 12.0, 11.0], [6.0, 5.0, 24.0, 27.0]])[None].expand(
        2, 2, 4).reshape(1, 4, 4).expand(2, 4, 4).clone()
    return logits, deltas, anchors, labels, gt_boxes


def test_efficientdet_loss_weighting_and_normalisation():
    logits, deltas, anchors, labels, gt_boxes = _loss_inputs()
    coder = BoxCoder()
    losses = efficientdet_losses(logits, deltas, anchors, labels, gt_boxes, num_classes=3,
                                 box_coder=coder, focal_alpha=0.25, focal_gamma=1.5,
                                 huber_delta=0.1, box_loss_weight=50.0)
    fg = (labels >= 0) & (labels < 3)
    normalizer = fg.sum() + 1.0  # 3 foreground anchors in the batch, + 1 as effdet
    cls = focal_loss_sum(logits.reshape(-1, 3), labels.reshape(-1), num_classes=3, alpha=0.25,
                         gamma=1.5)
    torch.testing.assert_close(losses["loss_cls"], cls / normalizer)
    target = coder.encode(gt_boxes[fg], anchors[None].expand(2, 4, 4)[fg])
    err = (deltas[fg] - target).abs()
    huber = torch.where(err < 0.1, 0.5 * err ** 2, 0.1 * err - 0.5 * 0.1 ** 2).sum()
    torch.testing.assert_close(losses["loss_box_reg"], 50.0 * huber / (4 * normalizer))

    per_level = efficientdet_losses([logits[:, :1], logits[:, 1:]], deltas, anchors, labels,
                                    gt_boxes, num_classes=3, box_coder=coder)
    torch.testing.assert_close(per_level["loss_cls"], losses["loss_cls"])

    giou = efficientdet_losses(logits, deltas, anchors, labels, gt_boxes, num_classes=3,
                               box_coder=coder, box_loss_type="giou", giou_loss_weight=2.0)
    from fvcore.nn import giou_loss
    expected = 2.0 * giou_loss(coder.decode(deltas[fg], anchors[None].expand(2, 4, 4)[fg]),
                               gt_boxes[fg], reduction="sum") / normalizer
    torch.testing.assert_close(giou["loss_box_reg"], expected)
    with pytest.raises(ValueError, match="MODEL.EFFICIENTDET.BOX_LOSS_TYPE='l1'"):
        efficientdet_losses(logits, deltas, anchors, labels, gt_boxes, num_classes=3,
                            box_coder=coder, box_loss_type="l1")


def test_batch_without_objects_has_a_finite_loss():
    logits, deltas, anchors, _, gt_boxes = _loss_inputs()
    labels = torch.full((2, 4), 3)
    losses = efficientdet_losses(logits, deltas, anchors, labels, gt_boxes, num_classes=3,
                                 box_coder=BoxCoder())
    assert float(losses["loss_box_reg"].detach()) == 0.0 and torch.isfinite(losses["loss_cls"])
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all()


def test_batched_inference_equals_per_image_inference():
    g = torch.Generator().manual_seed(0)
    num_anchors, num_classes = 300, 5
    xy = torch.rand(num_anchors, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + 8 + torch.rand(num_anchors, 2, generator=g) * 40], 1)
    logits = torch.randn(3, num_anchors, num_classes, generator=g) * 2
    deltas = torch.randn(3, num_anchors, 4, generator=g) * 0.2
    sizes = [(100, 120), (90, 90), (128, 128)]
    kwargs = dict(box_coder=BoxCoder(), score_thresh=0.0, topk_candidates=200, nms_thresh=0.5,
                  max_detections=40)
    batched = efficientdet_inference(logits, deltas, anchors, sizes, **kwargs)
    for i, size in enumerate(sizes):
        single = efficientdet_inference(logits[i:i + 1], deltas[i:i + 1], anchors, [size],
                                        **kwargs)[0]
        assert batched[i].image_size == size and len(batched[i]) == len(single) == 40
        assert torch.equal(batched[i].pred_boxes.tensor, single.pred_boxes.tensor)
        assert torch.equal(batched[i].scores, single.scores)
        assert torch.equal(batched[i].pred_classes, single.pred_classes)
        boxes = single.pred_boxes.tensor
        assert float(boxes[:, 2].max()) <= size[1] and float(boxes[:, 3].max()) <= size[0]
        assert float(boxes.min()) >= 0
    thresholded = efficientdet_inference(logits, deltas, anchors, sizes,
                                         **{**kwargs, "score_thresh": 0.9})
    assert all(float(r.scores.min()) > 0.9 for r in thresholded if len(r))


def test_topk_over_levels_is_exact_and_falls_back():
    from detector.modeling.postprocessing import topk_over_levels

    g = torch.Generator().manual_seed(0)
    levels = [torch.randn(2, n * 9, generator=g) - 4 for n in (4096, 1024, 256)]
    levels[1][0, :50] += 10  # image 0's best logits all sit on one level
    full = torch.cat(levels, 1)
    for k in (500, 37, 1):
        values, idxs = topk_over_levels(levels, k)
        expected_values, expected_idxs = full.topk(k, dim=1)
        assert torch.equal(values, expected_values)
        assert torch.equal(idxs.sort(1).values, expected_idxs.sort(1).values)
    # a sample unlike the whole (its best logits are the only high ones; many just below sit
    # between sampled positions): fewer than k above the threshold, so the full top-k is used
    skewed = torch.full((1, 31 * 4000), -5.0)
    skewed[0, 0:31 * 36:31] = 5.0
    skewed[0, 1:31 * 500:31] = 4.0
    values, idxs = topk_over_levels([skewed], 420)
    assert torch.equal(values, skewed.topk(420, dim=1).values)
    assert int((values == 4.0).sum()) == 420 - 36


def _assert_exact_topk(levels, k):
    """topk_over_levels returns torch.topk's values and k distinct indices holding them."""
    from detector.modeling.postprocessing import topk_over_levels

    full = torch.cat(levels, 1)
    values, idxs = topk_over_levels(levels, k)
    assert torch.equal(values, full.topk(k, dim=1).values)
    assert bool((values[:, :-1] >= values[:, 1:]).all())
    assert int(idxs.min()) >= 0 and int(idxs.max()) < full.shape[1]
    assert all(row.unique().numel() == k for row in idxs)
    assert torch.equal(full.gather(1, idxs), values)
    return values, idxs


def test_topk_over_levels_is_exact_under_heavy_ties():
    # rounded logits: a handful of values, each held by thousands of logits, plus a few distinct
    # larger ones; the k-th value and the sample's threshold land on tied values for these k
    g = torch.Generator().manual_seed(0)
    distinct = torch.tensor([-7.0, -6.0, -5.0, -4.5])
    cumulative = torch.tensor([0.395, 0.695, 0.995, 1.0])
    levels = []
    for num_cells in (3000, 700, 200):
        draws = torch.rand(2, num_cells * 90, generator=g)
        levels.append(distinct[torch.searchsorted(cumulative, draws).clamp_(max=3)])
    for image in range(2):
        level_idx = torch.randint(0, 3, (30,), generator=g)
        for j, level in enumerate(level_idx.tolist()):
            position = int(torch.randint(0, levels[level].shape[1], (1,), generator=g))
            levels[level][image, position] = 10.0 + j + image / 2
    for k in (100, 400, 1000, 2500):
        _assert_exact_topk(levels, k)
    # a tied threshold in the sample, but its 200 logits are all the whole has at or above it:
    # fewer than k, so the full top-k is used
    sampled_ties = torch.full((2, 31 * 4000), -5.0)
    sampled_ties[:, 0:31 * 200:31] = 1.0
    values, _ = _assert_exact_topk([sampled_ties], 1000)
    assert int((values == 1.0).sum()) == 2 * 200


def test_topk_over_levels_takes_only_the_needed_ties_in_order():
    # image 0: all logits equal; image 1: 50 distinct larger ones, the rest equal, so the tie at
    # the threshold straddles the k-th place in both
    tied = -4.59375
    levels = [torch.full((2, n * 90), tied) for n in (3000, 700, 200)]
    g = torch.Generator().manual_seed(0)
    high = torch.randperm(levels[1].shape[1], generator=g)[:50]
    levels[1][1, high] = torch.arange(50.0)
    k = 700
    values, idxs = _assert_exact_topk(levels, k)
    # only the ties each image needs, the first in concatenation order, were candidates: image 0
    # gets positions 0..k-1, image 1 its 50 larger logits and the first k - 50 ties
    assert torch.equal(idxs[0].sort().values, torch.arange(k))
    full = torch.cat(levels, 1)
    tied_positions = torch.nonzero(full[1] == tied).squeeze(1)
    picked_ties = idxs[1][values[1] == tied].sort().values
    assert torch.equal(picked_ties, tied_positions[:k - 50])


def test_efficientnet_backbone_options():
    from timm.layers import FrozenBatchNormAct2d

    from detector.modeling.backbone.efficientnet import EfficientNetBackbone

    backbone = EfficientNetBackbone(variant="b0", norm=NormSpec("BN", bn_eps=1e-3), freeze_at=3,
                                    out_features=["c3", "c4", "c5"])
    shapes = backbone.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "c3": (40, 8), "c4": (112, 16), "c5": (320, 32)}
    # stem and the blocks up to c3 (blocks 0..2) are frozen, with frozen statistics
    assert not any(p.requires_grad for p in backbone.body.blocks[2].parameters())
    assert all(p.requires_grad for p in backbone.body.blocks[3].parameters())
    assert isinstance(backbone.body.bn1, FrozenBatchNormAct2d) and backbone.body.bn1.eps == 1e-3
    out = backbone(torch.randn(1, 3, 64, 96))
    assert tuple(out["c5"].shape) == (1, 320, 2, 3)
    with pytest.raises(ValueError, match="MODEL.EFFICIENTNET.VARIANT='b9'"):
        EfficientNetBackbone(variant="b9")
    with pytest.raises(ValueError, match="MODEL.BACKBONE.NORM='GN'"):
        EfficientNetBackbone(variant="b0", norm="GN")
