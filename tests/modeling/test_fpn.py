from collections import OrderedDict

import pytest
import torch
from torchvision.ops import FeaturePyramidNetwork as TVFeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from detector.layers import ShapeSpec
from detector.modeling import build_neck
from detector.modeling.neck import FeaturePyramidNetwork

from modeling_testutils import tiny_cfg

BACKBONE_SHAPES = {f"c{k}": ShapeSpec(channels=4 * k, stride=2 ** k) for k in range(2, 6)}


def _features(size=128, names=("c2", "c3", "c4", "c5")):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(2, BACKBONE_SHAPES[n].channels, size // BACKBONE_SHAPES[n].stride,
                           size // BACKBONE_SHAPES[n].stride, generator=g) for n in names}


@pytest.mark.parametrize("min_level,max_level", [(2, 5), (2, 6), (2, 7), (3, 5), (3, 6), (3, 7)])
def test_levels_and_shapes(min_level, max_level):
    fpn = FeaturePyramidNetwork(input_shape=BACKBONE_SHAPES, out_channels=16, min_level=min_level,
                                max_level=max_level)
    out = fpn(_features())
    names = [f"p{k}" for k in range(min_level, max_level + 1)]
    assert list(out) == names and list(fpn.output_shape()) == names
    for k in range(min_level, max_level + 1):
        assert out[f"p{k}"].shape == (2, 16, 128 // 2 ** k, 128 // 2 ** k)
        assert fpn.output_shape()[f"p{k}"] == ShapeSpec(channels=16, stride=2 ** k)


def test_odd_sizes_upsample_to_the_lateral():
    fpn = FeaturePyramidNetwork(input_shape=BACKBONE_SHAPES, out_channels=8, min_level=3,
                                max_level=7)
    feats = {"c3": torch.randn(1, 12, 13, 9), "c4": torch.randn(1, 16, 7, 5),
             "c5": torch.randn(1, 20, 4, 3)}
    out = fpn(feats)
    sizes = [tuple(out[f"p{k}"].shape[-2:]) for k in range(3, 8)]
    assert sizes == [(13, 9), (7, 5), (4, 3), (2, 2), (1, 1)]


def test_top_block_input_c5_or_p5():
    from_p5 = FeaturePyramidNetwork(input_shape=BACKBONE_SHAPES, out_channels=16, top_block_in="p5")
    from_c5 = FeaturePyramidNetwork(input_shape=BACKBONE_SHAPES, out_channels=16, top_block_in="c5")
    assert from_p5.top_block["p6"].in_channels == 16
    assert from_c5.top_block["p6"].in_channels == BACKBONE_SHAPES["c5"].channels == 20
    feats = _features(names=("c3", "c4", "c5"))
    out = from_c5(feats)
    expected_p6 = from_c5.top_block["p6"](feats["c5"])
    assert torch.equal(out["p6"], expected_p6)
    assert torch.equal(out["p7"], from_c5.top_block["p7"](torch.relu(expected_p6)))
    out = from_p5(feats)
    assert torch.equal(out["p6"], from_p5.top_block["p6"](out["p5"]))


def test_top_down_path_is_lateral_plus_nearest_upsampling():
    fpn = FeaturePyramidNetwork(input_shape=BACKBONE_SHAPES, out_channels=8, min_level=4,
                                max_level=5)
    feats = _features(names=("c4", "c5"))
    inner5 = fpn.lateral_convs["p5"](feats["c5"])
    upsampled5 = inner5.repeat_interleave(2, -1).repeat_interleave(2, -2)
    inner4 = fpn.lateral_convs["p4"](feats["c4"]) + upsampled5
    out = fpn(feats)
    torch.testing.assert_close(out["p4"], fpn.output_convs["p4"](inner4))
    torch.testing.assert_close(out["p5"], fpn.output_convs["p5"](inner5))


def test_p2_needs_c2():
    expected = r"need backbone features \['c2'\].*MODEL.BACKBONE.OUT_FEATURES"
    with pytest.raises(ValueError, match=expected):
        FeaturePyramidNetwork(input_shape={k: v for k, v in BACKBONE_SHAPES.items() if k != "c2"},
                              min_level=2, max_level=6)


def test_build_from_config_with_norm_and_init():
    cfg = tiny_cfg(**{"MODEL.NECK.NORM": "GN", "MODEL.NECK.MAX_LEVEL": "6"})
    shapes = {k: v for k, v in BACKBONE_SHAPES.items() if k != "c2"}
    fpn = build_neck(cfg, shapes)
    assert isinstance(fpn.lateral_convs["p3"][1], torch.nn.GroupNorm)
    assert fpn.lateral_convs["p3"][0].bias is None  # the norm provides the bias
    assert torch.count_nonzero(fpn.top_block["p6"].bias) == 0
    with pytest.raises(KeyError, match="MODEL.NECK.NAME='NoSuchNeck'"):
        build_neck(tiny_cfg(**{"MODEL.NECK.NAME": "NoSuchNeck"}), shapes)


def _copy_torchvision_fpn_weights(tv, ours, levels):
    """torchvision's inner/layer block i is our lateral/output conv of the i-th lowest level."""
    with torch.no_grad():
        for i, k in enumerate(levels):
            for tv_blocks, our_convs in ((tv.inner_blocks, ours.lateral_convs),
                                         (tv.layer_blocks, ours.output_convs)):
                our_convs[f"p{k}"][0].weight.copy_(tv_blocks[i][0].weight)
                our_convs[f"p{k}"][0].bias.copy_(tv_blocks[i][0].bias)


def _random_biases_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))


@pytest.mark.parametrize("c2_size", [(64, 96), (50, 38)], ids=["even", "odd"])
def test_maxpool_p6_matches_torchvision_fpn_with_last_level_max_pool(c2_size):
    """Mask R-CNN's FPN: P2-P5 from C2-C5 and P6 = kernel-1 stride-2 max-pool of P5."""
    torch.manual_seed(0)
    tv = TVFeaturePyramidNetwork([BACKBONE_SHAPES[f"c{k}"].channels for k in range(2, 6)], 16,
                                 extra_blocks=LastLevelMaxPool())
    _random_biases_(tv, seed=1)  # torchvision initialises them to 0
    ours = FeaturePyramidNetwork(input_shape=BACKBONE_SHAPES, out_channels=16, min_level=2,
                                 max_level=6, top_block="maxpool")
    assert len(ours.top_block) == 0
    _copy_torchvision_fpn_weights(tv, ours, range(2, 6))
    g = torch.Generator().manual_seed(2)
    h, w = c2_size
    feats = {}
    for k in range(2, 6):
        feats[f"c{k}"] = torch.randn(2, BACKBONE_SHAPES[f"c{k}"].channels, h, w, generator=g)
        h, w = (h + 1) // 2, (w + 1) // 2  # a stride-2 ResNet stage rounds up
    expected = tv(OrderedDict(feats))
    got = ours(feats)
    assert list(got) == ["p2", "p3", "p4", "p5", "p6"]
    assert list(expected) == ["c2", "c3", "c4", "c5", "pool"]
    for ours_name, tv_name in zip(got, expected):
        assert got[ours_name].shape == expected[tv_name].shape
        torch.testing.assert_close(got[ours_name], expected[tv_name], rtol=1e-5, atol=1e-5)
    p5 = got["p5"]
    assert got["p6"].shape[-2:] == ((p5.shape[-2] + 1) // 2, (p5.shape[-1] + 1) // 2)
    assert torch.equal(got["p6"], p5[..., ::2, ::2])
    assert ours.output_shape()["p6"] == ShapeSpec(channels=16, stride=64)


def test_conv_p6_p7_match_torchvision_last_level_p6p7():
    torch.manual_seed(0)
    tv = TVFeaturePyramidNetwork([BACKBONE_SHAPES[f"c{k}"].channels for k in range(3, 6)], 16,
                                 extra_blocks=LastLevelP6P7(16, 16))
    _random_biases_(tv, seed=1)
    ours = FeaturePyramidNetwork(input_shape=BACKBONE_SHAPES, out_channels=16, min_level=3,
                                 max_level=7, top_block="conv", top_block_in="p5")
    _copy_torchvision_fpn_weights(tv, ours, range(3, 6))
    with torch.no_grad():
        for k, tv_conv in (("p6", tv.extra_blocks.p6), ("p7", tv.extra_blocks.p7)):
            ours.top_block[k].weight.copy_(tv_conv.weight)
            ours.top_block[k].bias.copy_(tv_conv.bias)
    feats = _features(size=96, names=("c3", "c4", "c5"))
    expected = list(tv(OrderedDict(feats)).values())
    got = list(ours(feats).values())
    assert len(got) == len(expected) == 5
    for o, e in zip(got, expected):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


def test_maxpool_top_block_from_config_and_its_errors():
    shapes = dict(BACKBONE_SHAPES)
    cfg = tiny_cfg(**{"MODEL.NECK.MIN_LEVEL": "2", "MODEL.NECK.MAX_LEVEL": "6",
                      "MODEL.NECK.TOP_BLOCK": "maxpool"})
    fpn = build_neck(cfg, shapes)
    assert fpn.top_block_name == "maxpool"
    assert not any(name.startswith("top_block") for name in fpn.state_dict())
    assert list(fpn.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]
    with pytest.raises(ValueError, match=r"TOP_BLOCK='maxpool' makes P6 alone from P5: needs "
                                         r"MAX_LEVEL=6 \(got 7\)"):
        FeaturePyramidNetwork(input_shape=shapes, max_level=7, top_block="maxpool")
    with pytest.raises(ValueError, match=r"TOP_BLOCK_IN='p5' \(got 'c5'\)"):
        FeaturePyramidNetwork(input_shape=shapes, max_level=6, top_block="maxpool",
                              top_block_in="c5")
    with pytest.raises(ValueError, match=r"MODEL.NECK.TOP_BLOCK='pool' must be one of "
                                         r"\['conv', 'maxpool'\]"):
        FeaturePyramidNetwork(input_shape=shapes, top_block="pool")
