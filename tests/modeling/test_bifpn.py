"""BiFPN pieces: node graph, padded max-pool, fusion methods, input sizes, no decay on fusion
weights."""
import pytest
import torch
from torch import nn

from detector.config import get_cfg
from detector.modeling import build_model
from detector.modeling.neck.bifpn import NormalizedFusion, bifpn_graph
from detector.layers import MaxPool2dPadded
from detector.solver import build_optimizer

from modeling_testutils import make_batch


def tiny_efficientdet_cfg(*opts):
    """EfficientDet with a TinyNet backbone, a 16-channel BiFPN and 3 classes."""
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu",
        "MODEL.META_ARCHITECTURE", "EfficientDet",
        "MODEL.BACKBONE.NAME", "TinyNet",
        "MODEL.BACKBONE.NORM", "BN",
        "MODEL.BACKBONE.FREEZE_AT", "0",
        "MODEL.TINYNET.CHANNELS", "[8, 16, 24, 32, 48]",
        "MODEL.NECK.NAME", "BiFPN",
        "MODEL.BIFPN.CHANNELS", "16",
        "MODEL.BIFPN.NUM_REPEATS", "2",
        "MODEL.EFFICIENTDET.NUM_HEAD_CONVS", "2",
        "MODEL.EFFICIENTDET.NUM_CLASSES", "3",
        "MODEL.EVONORM.NUM_GROUPS", "4",
        *opts,
    ])
    return cfg


def test_graph_matches_effdet_bifpn_config():
    from effdet.config.fpn_config import get_fpn_config

    for min_level, max_level in [(3, 7), (2, 6), (3, 5)]:
        graph = bifpn_graph(min_level, max_level)
        names = [f"p{k}_in" for k in range(min_level, max_level + 1)] + [n for n, _, _ in graph]
        theirs = get_fpn_config("bifpn_fa", min_level=min_level, max_level=max_level).nodes
        assert [level for _, level, _ in graph] == [n["feat_level"] for n in theirs]
        assert [inputs for _, _, inputs in graph] == [
            [names[o] for o in n["inputs_offsets"]] for n in theirs]
    assert [n for n, _, _ in bifpn_graph(3, 7)] == [
        "p6_td", "p5_td", "p4_td", "p3_out", "p4_out", "p5_out", "p6_out", "p7_out"]


def test_same_max_pool_matches_timm_and_symmetric_matches_torch():
    from timm.layers import create_pool2d

    timm_same = create_pool2d("max", 3, stride=2, padding="same")
    ours_same = MaxPool2dPadded(3, 2, "same")
    torch_symmetric = nn.MaxPool2d(3, 2, padding=1)
    ours_symmetric = MaxPool2dPadded(3, 2, "symmetric")
    g = torch.Generator().manual_seed(0)
    for h in range(1, 19):
        for w in (1, 2, 5, 8, 13, 16):
            x = torch.randn(2, 3, h, w, generator=g)
            assert torch.equal(ours_same(x), timm_same(x)), (h, w)
            if min(h, w) >= 2:
                assert torch.equal(ours_symmetric(x), torch_symmetric(x)), (h, w)
    x = torch.randn(1, 2, 16, 16, generator=g)
    assert not torch.equal(ours_same(x), ours_symmetric(x))
    with pytest.raises(ValueError, match="padding_mode='valid' is not one of"):
        MaxPool2dPadded(3, 2, "valid")


def test_fusion_methods():
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 4, 5, 5, generator=g) for _ in range(3)]
    weights = torch.tensor([0.5, -1.0, 2.0])

    fast = NormalizedFusion(3, "fast")
    fast.edge_weights.data.copy_(weights)
    relu_w = weights.clamp(min=0)
    expected = sum(w * x for w, x in zip(relu_w, inputs)) / (relu_w.sum() + 1e-4)
    torch.testing.assert_close(fast(inputs), expected)

    attn = NormalizedFusion(3, "attn")
    attn.edge_weights.data.copy_(weights)
    soft = torch.softmax(weights, 0)
    torch.testing.assert_close(attn(inputs), sum(w * x for w, x in zip(soft, inputs)))

    plain = NormalizedFusion(3, "sum")
    assert len(list(plain.parameters())) == 0
    torch.testing.assert_close(plain(inputs), inputs[0] + inputs[1] + inputs[2])

    out = fast(inputs)
    out.sum().backward()
    assert fast.edge_weights.grad is not None and fast.edge_weights.grad[1] == 0  # ReLU'd away
    with pytest.raises(ValueError, match="MODEL.BIFPN.FUSION='max'"):
        NormalizedFusion(2, "max")


@pytest.mark.parametrize("fusion", ["fast", "attn", "sum"])
def test_any_image_size_is_padded_for_the_bifpn(fusion):
    torch.manual_seed(0)
    model = build_model(tiny_efficientdet_cfg("MODEL.BIFPN.FUSION", fusion))
    assert model.size_divisibility == 128
    batch = make_batch(2, size=(97, 131), num_classes=3) + make_batch(1, size=(200, 65))
    model.train()
    losses = model(batch[:2])
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        outputs = model(batch)
    assert [o["instances"].image_size for o in outputs] == [(97, 131), (97, 131), (200, 65)]
    for out, (h, w) in zip(outputs, [(97, 131), (97, 131), (200, 65)]):
        boxes = out["instances"].pred_boxes.tensor
        assert len(boxes) > 0 and float(boxes[:, 2].max()) <= w and float(boxes[:, 3].max()) <= h


def test_size_divisibility_must_fit_the_pyramid():
    with pytest.raises(ValueError, match="MODEL.SIZE_DIVISIBILITY=32 must be a multiple of .* 128"):
        build_model(tiny_efficientdet_cfg("MODEL.SIZE_DIVISIBILITY", "32"))


def test_fusion_weights_and_norms_get_no_weight_decay():
    cfg = tiny_efficientdet_cfg("SOLVER.WEIGHT_DECAY", "0.5", "SOLVER.WEIGHT_DECAY_NORM", "0.0",
                                "SOLVER.WEIGHT_DECAY_BIAS", "0.0")
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups
                for p in group["params"]}
    named = dict(model.named_parameters())
    edge = [n for n in named if n.endswith("edge_weights")]
    assert edge and all(decay_of[id(named[n])] == 0.0 for n in edge)
    assert decay_of[id(named["neck.cells.0.nodes.p4_td.norm.weight"])] == 0.0
    assert decay_of[id(named["neck.cells.0.nodes.p4_td.conv.conv_pw.weight"])] == 0.5
