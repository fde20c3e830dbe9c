"""MODEL.FUSE_CONV_NORM: a RetinaNet with conv + frozen norm + ReLU blocks folded gives the
detections, losses and gradients of its eager blocks, and so does timm's EfficientNet backbone;
batched postprocessing equals the per-image algorithm."""
import pytest
import torch
from torchvision.ops import batched_nms

from detector.layers import conv_norm_fusion
from detector.layers.fused_conv import _AVAILABLE
from detector.modeling import build_model
from detector.modeling.backbone import efficientnet
from detector.modeling.box_coder import BoxCoder
from detector.modeling.postprocessing import retinanet_inference, topk_above_threshold
from detector.structures import Boxes

from modeling_testutils import make_batch, tiny_cfg


def _random_statistics(model, seed=1):
    """Every norm with running statistics (BN, FrozenBN, timm's frozen norms) gets random ones."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "running_var") and m.running_var is not None:
            c = m.running_var.numel()
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def _resnet_retinanet(depth):
    cfg = tiny_cfg(**{"MODEL.BACKBONE.NAME": "ResNet", "MODEL.BACKBONE.NORM": "FrozenBN",
                      "MODEL.BACKBONE.FREEZE_AT": "2", "MODEL.RESNETS.DEPTH": str(depth),
                      "MODEL.BACKBONE.WEIGHTS": "", "MODEL.RETINANET.SCORE_THRESH_TEST": "0.0",
                      "MODEL.RETINANET.NORM": "BN"})
    torch.manual_seed(0)
    # random statistics, so that folding them is a real change
    return _random_statistics(build_model(cfg).eval())


@pytest.mark.skipif(not _AVAILABLE, reason="this torch build has no oneDNN fused conv")
@pytest.mark.parametrize("depth", [18, 50])
def test_fused_retinanet_equals_eager(depth, single_thread):
    model = _resnet_retinanet(depth)
    batch = make_batch(2, (96, 64), with_instances=False)
    with torch.no_grad():
        model.fuse_conv_norm = False
        eager = model(batch)
        eager_raw = model.forward_features(model.preprocess_image(batch).tensor)
        model.fuse_conv_norm = True
        fused = model(batch)
        fused_raw = model.forward_features(model.preprocess_image(batch).tensor)
    for a, b in zip(eager_raw[0] + eager_raw[1], fused_raw[0] + fused_raw[1]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    for e, f in zip(eager, fused):
        e, f = e["instances"], f["instances"]
        assert len(e) == len(f) == 100
        torch.testing.assert_close(f.scores, e.scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(f.pred_boxes.tensor, e.pred_boxes.tensor, rtol=0, atol=1e-3)


def test_fused_training_step_equals_eager(single_thread):
    model = _resnet_retinanet(18).train()
    batch = make_batch(2, (64, 64))
    results = []
    for fused in (False, True):
        model.fuse_conv_norm = fused
        model.zero_grad()
        losses = model(batch)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (eager_losses, eager_grads), (fused_losses, fused_grads) = results
    for k in eager_losses:
        torch.testing.assert_close(fused_losses[k], eager_losses[k], rtol=1e-4, atol=1e-6)
    assert eager_grads.keys() == fused_grads.keys()
    assert any(n.startswith("backbone.layer2") for n in fused_grads)  # trainable, FrozenBN
    for n in eager_grads:
        torch.testing.assert_close(fused_grads[n], eager_grads[n], rtol=1e-3, atol=1e-5)


def _count_fused_blocks(monkeypatch):
    calls = []
    original = efficientnet._fused_block

    def counting(block, x):
        calls.append(type(block).__name__)
        return original(block, x)

    monkeypatch.setattr(efficientnet, "_fused_block", counting)
    return calls


@pytest.mark.skipif(not _AVAILABLE, reason="this torch build has no oneDNN fused conv")
@pytest.mark.parametrize("padding", ["same", "symmetric"])
def test_fused_efficientnet_equals_eager(padding, single_thread, monkeypatch):
    torch.manual_seed(0)
    backbone = efficientnet.EfficientNetBackbone(variant="b0", padding_mode=padding,
                                                 out_features=("c2", "c3", "c4", "c5"))
    backbone = _random_statistics(backbone).eval()
    x = torch.randn(2, 3, 72, 64).contiguous(memory_format=torch.channels_last)
    calls = _count_fused_blocks(monkeypatch)
    with torch.no_grad():
        eager = backbone(x)
        assert not calls
        with conv_norm_fusion(True):
            fused = backbone(x)
    # every MBConv and depthwise-separable block of B0 took the folded path
    assert sorted(set(calls)) == ["DepthwiseSeparableConv", "InvertedResidual"]
    assert len(calls) == sum(len(stage) for stage in backbone.body.blocks)
    assert list(fused) == list(eager) == ["c2", "c3", "c4", "c5"]
    for name in eager:
        torch.testing.assert_close(fused[name], eager[name], rtol=1e-4, atol=1e-5)


def test_fused_efficientnet_training_with_frozen_bn_equals_eager(single_thread, monkeypatch):
    """FrozenBN trains the convs through the fold; drop path stays a separate, seeded step."""
    torch.manual_seed(0)
    backbone = efficientnet.EfficientNetBackbone(variant="b0", norm="FrozenBN", freeze_at=2,
                                                 drop_path_rate=0.3)
    backbone = _random_statistics(backbone).train()
    x = torch.randn(2, 3, 64, 64)
    calls = _count_fused_blocks(monkeypatch)
    results = []
    for fused in (False, True):
        backbone.zero_grad()
        torch.manual_seed(5)  # the same drop-path draws in both runs
        with conv_norm_fusion(fused):
            features = backbone(x)
        sum((f * f).mean() for f in features.values()).backward()
        grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
        results.append((features, grads))
    assert calls
    (eager, eager_grads), (fused, fused_grads) = results
    for name in eager:
        torch.testing.assert_close(fused[name], eager[name], rtol=1e-4, atol=1e-5)
    assert eager_grads.keys() == fused_grads.keys()
    assert any(".conv_pwl." in n for n in fused_grads)  # trainable convs before frozen norms
    for n in eager_grads:
        torch.testing.assert_close(fused_grads[n], eager_grads[n], rtol=1e-3, atol=1e-5)


def _per_image_reference(logits_per_level, deltas_per_level, anchors_per_level, image_size,
                         box_coder, score_thresh, topk, nms_thresh, max_det):
    """detectron2/torchvision's per-image RetinaNet postprocessing, written out plainly."""
    boxes_all, scores_all, classes_all = [], [], []
    for logits, deltas, anchors in zip(logits_per_level, deltas_per_level, anchors_per_level):
        k = logits.shape[-1]
        scores = torch.sigmoid(logits).flatten()
        idxs = torch.where(scores > score_thresh)[0]
        scores, order = scores[idxs].topk(min(topk, idxs.numel()))
        idxs = idxs[order]
        boxes = Boxes(box_coder.decode(deltas[idxs // k], anchors[idxs // k]))
        boxes.clip(image_size)
        boxes_all.append(boxes.tensor)
        scores_all.append(scores)
        classes_all.append(idxs % k)
    boxes, scores = torch.cat(boxes_all), torch.cat(scores_all)
    classes = torch.cat(classes_all)
    keep = batched_nms(boxes, scores, classes, nms_thresh)[:max_det]
    return boxes[keep], scores[keep], classes[keep]


def test_batched_postprocessing_equals_per_image():
    g = torch.Generator().manual_seed(0)
    num_images, num_classes = 3, 4
    sizes = [(40, 48), (56, 56), (33, 70)]
    anchors = [torch.rand(n, 2, generator=g).mul(50).repeat(1, 2)
               + torch.tensor([0.0, 0.0, 12.0, 10.0]) for n in (60, 15, 4)]
    # image 2 is nearly empty: few scores pass the threshold
    logits = [torch.randn(num_images, a.shape[0], num_classes, generator=g) * 2 - 2
              for a in anchors]
    for x in logits:
        x[2] -= 6
    deltas = [torch.randn(num_images, a.shape[0], 4, generator=g) * 0.3 for a in anchors]
    options = dict(box_coder=BoxCoder(), score_thresh=0.05, topk_candidates=20, nms_thresh=0.5,
                   max_detections=25)
    batched = retinanet_inference(logits, deltas, anchors, sizes, **options)
    for i, size in enumerate(sizes):
        boxes, scores, classes = _per_image_reference(
            [x[i] for x in logits], [x[i] for x in deltas], anchors, size,
            options["box_coder"], 0.05, 20, 0.5, 25)
        assert batched[i].image_size == size
        assert torch.equal(batched[i].pred_classes, classes)
        assert torch.equal(batched[i].scores, scores)
        assert torch.equal(batched[i].pred_boxes.tensor, boxes)
    assert 0 < len(batched[2]) < len(batched[0]) == 25


def test_topk_above_threshold_pads_short_rows():
    scores = torch.tensor([[0.9, 0.1, 0.7, 0.8], [0.2, 0.1, 0.6, 0.5], [0.1] * 4])
    values, cols, valid = topk_above_threshold(scores, 0.5, 3)
    assert cols[0].tolist() == [0, 3, 2] and cols[1, 0].item() == 2
    assert valid.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert values[valid].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    empty = topk_above_threshold(torch.zeros(2, 5), 0.5, 3)
    assert [tuple(t.shape) for t in empty] == [(2, 0)] * 3
