import pytest
import torch

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
