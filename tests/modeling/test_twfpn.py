import pytest
import torch

from detector.layers import NormSpec, ShapeSpec
from detector.modeling import build_neck
from detector.modeling.neck import TwoWayFPNNeck

from modeling_testutils import tiny_cfg
from neck_testutils import (
    BACKBONE_SHAPES,
    assert_levels_and_shapes,
    assert_odd_sizes_round_up,
    backbone_features,
    falling_loss_on_shapes,
)


@pytest.mark.parametrize("min_level,max_level", [(3, 5), (3, 7), (2, 6), (4, 4)])
def test_levels_and_shapes(min_level, max_level):
    neck = TwoWayFPNNeck(input_shape=BACKBONE_SHAPES, out_channels=8, min_level=min_level,
                         max_level=max_level, norm="BN")
    assert_levels_and_shapes(neck, neck(backbone_features()), min_level, max_level, 8)


def test_odd_sizes_round_up_and_mismatches_are_reported():
    neck = TwoWayFPNNeck(input_shape=BACKBONE_SHAPES, out_channels=8, min_level=3, max_level=7)
    assert_odd_sizes_round_up(neck, r"TwoWayFPN bottom-up p3 -> p4: resampled to \(7, 5\)")


def test_two_levels_by_hand():
    """One channel, no norm: every weight set to a known value, the output computed by hand."""
    neck = TwoWayFPNNeck(input_shape={"c4": ShapeSpec(channels=1, stride=16),
                                      "c5": ShapeSpec(channels=1, stride=32)},
                         out_channels=1, min_level=4, max_level=5, norm="")
    with torch.no_grad():
        for laterals, gains in ((neck.top_down_laterals, {"p4": 1.0, "p5": 2.0}),
                                (neck.bottom_up_laterals, {"p4": 0.5, "p5": -1.0})):
            for name, gain in gains.items():
                laterals[name].conv.weight.fill_(gain)
                laterals[name].conv.bias.fill_(0.0)
        neck.top_down_fusions["p4"].edge_weights.copy_(torch.tensor([3.0, 1.0]))
        neck.bottom_up_fusions["p5"].edge_weights.copy_(torch.tensor([1.0, -2.0]))
        for out_conv in neck.output_convs.values():
            kernel = torch.zeros(3, 3)
            kernel[1, 1], kernel[1, 2] = 1.0, 0.5  # the pixel itself + half its right neighbour
            out_conv.conv.conv_dw.weight.copy_(kernel.view(1, 1, 3, 3))
            out_conv.conv.conv_pw.weight.fill_(2.0)
            out_conv.conv.conv_pw.bias.fill_(-1.0)
    c4 = torch.tensor([[0., 1., -2., 3.],
                       [4., -5., 6., 7.],
                       [-8., 9., 10., 11.],
                       [12., 13., -14., 15.]])
    c5 = torch.tensor([[1., -2.],
                       [3., 4.]])
    out = neck({"c4": c4.view(1, 1, 4, 4), "c5": c5.view(1, 1, 2, 2)})

    # top-down: td5 = relu(2 c5); td4 = (3 up(td5) + 1 relu(c4)) / (3 + 1 + 1e-4)
    td5 = torch.tensor([[2., 0.], [6., 8.]])
    up_td5 = torch.tensor([[2., 2., 0., 0.], [2., 2., 0., 0.], [6., 6., 8., 8.], [6., 6., 8., 8.]])
    td4 = (3 * up_td5 + c4.clamp(min=0)) / 4.0001
    # bottom-up: bu4 = relu(0.5 c4); bu5 = (1 maxpool(bu4) + relu(-2) relu(-c5)) / (1 + 1e-4)
    bu4 = 0.5 * c4.clamp(min=0)
    pooled_bu4 = torch.tensor([[2., 3.5], [6.5, 7.5]])
    bu5 = (1 * pooled_bu4 + 0 * torch.tensor([[0., 2.], [0., 0.]])) / 1.0001

    def output_conv(s):  # relu(2 (s + 0.5 s[right]) - 1), zero padded
        right = torch.cat([s[:, 1:], torch.zeros(s.shape[0], 1)], dim=1)
        return (2 * (s + 0.5 * right) - 1).clamp(min=0)

    torch.testing.assert_close(out["p4"][0, 0], output_conv(td4 + bu4))
    torch.testing.assert_close(out["p5"][0, 0], output_conv(td5 + bu5))


def _twfpn_parameters_of_the_original(in_channels, c, norm_params_per_channel):
    """What object_detection2's TwoWayFPN holds for these widths: per level a top-down and a
    bottom-up 1x1 lateral (no bias with a norm) + norm, a separable 3x3 output conv (depthwise
    9c, pointwise c*c, no bias) + norm; two fusion scalars per node except the first of each
    path."""
    levels = len(in_channels)
    laterals = sum(2 * (cin * c + norm_params_per_channel * c) for cin in in_channels)
    outputs = levels * (9 * c + c * c + norm_params_per_channel * c)
    fusions = 2 * 2 * (levels - 1)
    return laterals + outputs + fusions


@pytest.mark.parametrize("norm,per_channel", [
    ("BN", 2), (NormSpec("GN", gn_groups=4), 2), (NormSpec("EvoNormS0", evonorm_groups=4), 3)])
def test_parameter_count_matches_the_original_structure(norm, per_channel):
    neck = TwoWayFPNNeck(input_shape=BACKBONE_SHAPES, out_channels=16, min_level=3, max_level=5,
                         norm=norm)
    count = sum(p.numel() for p in neck.parameters())
    assert count == _twfpn_parameters_of_the_original([12, 16, 20], 16, per_channel)
    # written out for BN: laterals 2*(12*16+32) + 2*(16*16+32) + 2*(20*16+32) = 1728,
    # outputs 3*(144+256+32) = 1296, fusions 8
    if norm == "BN":
        assert count == 1728 + 1296 + 8


def test_extra_levels_are_inputs_made_from_c5():
    neck = TwoWayFPNNeck(input_shape=BACKBONE_SHAPES, out_channels=16, min_level=3, max_level=7,
                         norm="BN")
    count = sum(p.numel() for p in neck.parameters())
    # P6: 3x3 stride-2 conv c5 (20) -> 16 with bias, P7: 16 -> 16; both levels then go through
    # the paths with 16-channel inputs
    extra_inputs = (20 * 16 * 9 + 16) + (16 * 16 * 9 + 16)
    assert count == _twfpn_parameters_of_the_original([12, 16, 20, 16, 16], 16, 2) + extra_inputs
    feats = backbone_features(128, names=("c3", "c4", "c5"))
    out = neck(feats)
    p6_input = neck.inputs.extra.convs["p6"](feats["c5"])
    p7_input = neck.inputs.extra.convs["p7"](torch.relu(p6_input))
    top_down_p7 = neck.top_down_laterals["p7"](p7_input)
    bottom_up_p7 = neck.bottom_up_fusions["p7"]([
        torch.nn.functional.max_pool2d(_bottom_up(neck, feats, 6), 2, 2, ceil_mode=True),
        neck.bottom_up_laterals["p7"](p7_input)])
    torch.testing.assert_close(out["p7"], neck.output_convs["p7"](top_down_p7 + bottom_up_p7))


def _bottom_up(neck, feats, level):
    """The bottom-up path's value at ``level`` recomputed from the module's parts."""
    inputs = {k: feats[f"c{k}"] for k in (3, 4, 5)}
    inputs.update(zip((6, 7), neck.inputs.extra(feats["c5"])))
    x = neck.bottom_up_laterals["p3"](inputs[3])
    for k in range(4, level + 1):
        pooled = torch.nn.functional.max_pool2d(x, 2, 2, ceil_mode=True)
        x = neck.bottom_up_fusions[f"p{k}"]([pooled, neck.bottom_up_laterals[f"p{k}"](inputs[k])])
    return x


def test_fusion_weights_stay_non_negative_when_pushed_negative():
    torch.manual_seed(0)
    neck = TwoWayFPNNeck(input_shape=BACKBONE_SHAPES, out_channels=8, min_level=3, max_level=5)
    fusions = list(neck.top_down_fusions.values()) + list(neck.bottom_up_fusions.values())
    optimizer = torch.optim.SGD([f.edge_weights for f in fusions], lr=1.0)
    feats = backbone_features(64, names=("c3", "c4", "c5"))
    for step in range(3):
        optimizer.zero_grad()
        # the first input's weight is rewarded for growing, the second's for going negative
        loss = sum(f.edge_weights[1] - 0.1 * f.edge_weights[0] for f in fusions)
        loss.backward()
        optimizer.step()
    for f in fusions:
        assert f.edge_weights[1] < 0  # the raw parameter did go negative
        w = f.effective_weights()
        assert (w >= 0).all() and w[1] == 0
        torch.testing.assert_close(w[0], f.edge_weights[0] / (f.edge_weights[0] + 1e-4))
    out = neck(feats)
    assert all(torch.isfinite(t).all() for t in out.values())


def test_build_from_config_and_errors():
    cfg = tiny_cfg(**{"MODEL.NECK.NAME": "TwoWayFPN", "MODEL.NECK.OUT_CHANNELS": "16",
                      "MODEL.NECK.NORM": "GN", "MODEL.GN.NUM_GROUPS": "4",
                      "MODEL.NECK.MAX_LEVEL": "6"})
    shapes = {k: v for k, v in BACKBONE_SHAPES.items() if k != "c2"}
    neck = build_neck(cfg, shapes)
    assert isinstance(neck, TwoWayFPNNeck)
    assert list(neck.output_shape()) == ["p3", "p4", "p5", "p6"]
    assert neck.top_down_laterals["p3"][1].num_groups == 4
    cfg.merge_from_list(["MODEL.NECK.NORM", "SN"])
    with pytest.raises(ValueError, match="MODEL.NECK.NORM='SN' normalizes conv weights"):
        build_neck(cfg, shapes)
    with pytest.raises(ValueError, match=r"need backbone features \['c2'\]"):
        TwoWayFPNNeck(input_shape=shapes, min_level=2, max_level=5)


def test_retinanet_with_twfpn_loss_falls_on_shapes(tmp_path, single_thread):
    first, last, losses = falling_loss_on_shapes(tmp_path, {
        "MODEL.NECK.NAME": "TwoWayFPN", "MODEL.NECK.OUT_CHANNELS": "32",
        "MODEL.NECK.NORM": "GN"})
    assert last < 0.5 * first, (first, last, losses)
