import pytest
import torch
import torch.nn.functional as F

from detector.layers import NormSpec, ShapeSpec
from detector.modeling import build_neck
from detector.modeling.neck import PConvNeck

from modeling_testutils import tiny_cfg
from neck_testutils import (
    BACKBONE_SHAPES,
    assert_levels_and_shapes,
    assert_odd_sizes_round_up,
    backbone_features,
    falling_loss_on_shapes,
)


@pytest.mark.parametrize("min_level,max_level,num_convs", [(3, 5, 2), (3, 7, 1), (2, 6, 3),
                                                           (4, 4, 1), (3, 5, 0)])
def test_levels_and_shapes(min_level, max_level, num_convs):
    neck = PConvNeck(input_shape=BACKBONE_SHAPES, out_channels=8, min_level=min_level,
                     max_level=max_level, num_convs=num_convs, norm="BN")
    assert_levels_and_shapes(neck, neck(backbone_features()), min_level, max_level, 8)
    assert len(neck.pyramid_convs) == num_convs


def test_odd_sizes_round_up_and_mismatches_are_reported():
    neck = PConvNeck(input_shape=BACKBONE_SHAPES, out_channels=8, min_level=3, max_level=7,
                     num_convs=2)
    assert_odd_sizes_round_up(neck, r"PConv p3 -> p4: resampled to \(7, 5\)")


def test_two_levels_by_hand():
    """One channel, no norm, one repeat: every weight set to a known value."""
    neck = PConvNeck(input_shape={"c3": ShapeSpec(channels=1, stride=8),
                                  "c4": ShapeSpec(channels=1, stride=16)},
                     out_channels=1, min_level=3, max_level=4, num_convs=1, norm="")
    with torch.no_grad():
        for name, (gain, bias) in {"p3": (2.0, 1.0), "p4": (-1.0, 0.5)}.items():
            neck.projections[name].conv.weight.fill_(gain)
            neck.projections[name].conv.bias.fill_(bias)
        branches = neck.pyramid_convs[0]
        for branch, (gain, bias) in ((branches.finer, (1.0, 0.0)), (branches.same, (0.5, -1.0)),
                                     (branches.coarser, (-2.0, 3.0))):
            branch.conv.weight.fill_(gain)
            branch.conv.bias.fill_(bias)
    c3 = torch.tensor([[0., 1., -2., 3.],
                       [4., -5., 6., 7.],
                       [-8., 9., 10., 11.],
                       [12., 13., -14., 15.]])
    c4 = torch.tensor([[1., -2.],
                       [3., 4.]])
    out = neck({"c3": c3.view(1, 1, 4, 4), "c4": c4.view(1, 1, 2, 2)})

    x3 = 2 * c3 + 1                      # projections: no norm, no activation
    x4 = -c4 + 0.5                       # [[-0.5, 2.5], [-2.5, -3.5]]
    same3 = (0.5 * x3 - 1).clamp(min=0)
    coarser4 = (-2 * x4 + 3).clamp(min=0)  # [[4, 0], [8, 10]]
    up_coarser4 = torch.tensor([[4., 4., 0., 0.], [4., 4., 0., 0.],
                                [8., 8., 10., 10.], [8., 8., 10., 10.]])
    torch.testing.assert_close(coarser4, torch.tensor([[4., 0.], [8., 10.]]))
    finer3 = x3.clamp(min=0)             # [[1, 3, 0, 7], [9, 0, 13, 15], [0, 19, 21, 23], ...]
    pooled_finer3 = torch.tensor([[(1 + 3 + 9 + 0) / 4, (0 + 7 + 13 + 15) / 4],
                                  [(0 + 19 + 25 + 27) / 4, (21 + 23 + 0 + 31) / 4]])
    torch.testing.assert_close(F.avg_pool2d(finer3.view(1, 1, 4, 4), 2)[0, 0], pooled_finer3)
    same4 = (0.5 * x4 - 1).clamp(min=0)  # all zero
    torch.testing.assert_close(out["p3"][0, 0], same3 + up_coarser4)
    torch.testing.assert_close(out["p4"][0, 0], pooled_finer3 + same4)


def _pconv_parameters_of_the_original(in_channels, c, num_convs, norm_params_per_channel):
    """What object_detection2's PConv holds for these widths: a 1x1 projection per level with
    bias (no norm), then per repeat three 1x1 convs (no bias with a norm) + norm, shared by every
    level."""
    projections = sum(cin * c + c for cin in in_channels)
    repeats = num_convs * 3 * (c * c + norm_params_per_channel * c)
    return projections + repeats


@pytest.mark.parametrize("norm,per_channel", [
    ("BN", 2), (NormSpec("GN", gn_groups=4), 2), (NormSpec("EvoNormS0", evonorm_groups=4), 3)])
def test_parameter_count_matches_the_original_structure(norm, per_channel):
    neck = PConvNeck(input_shape=BACKBONE_SHAPES, out_channels=16, min_level=3, max_level=5,
                     num_convs=4, norm=norm)
    count = sum(p.numel() for p in neck.parameters())
    assert count == _pconv_parameters_of_the_original([12, 16, 20], 16, 4, per_channel)
    if norm == "BN":
        # projections (12+16+20)*16 + 3*16 = 816, repeats 4*3*(256+32) = 3456
        assert count == 816 + 3456
    # the convs of a repeat are shared: more levels add projections only
    wider = PConvNeck(input_shape=BACKBONE_SHAPES, out_channels=16, min_level=2, max_level=5,
                      num_convs=4, norm=norm)
    assert sum(p.numel() for p in wider.parameters()) == count + 8 * 16 + 16


def test_extra_levels_are_inputs_made_from_c5():
    neck = PConvNeck(input_shape=BACKBONE_SHAPES, out_channels=16, min_level=3, max_level=7,
                     num_convs=2, norm="BN")
    extra_inputs = (20 * 16 * 9 + 16) + (16 * 16 * 9 + 16)
    count = sum(p.numel() for p in neck.parameters())
    assert count == _pconv_parameters_of_the_original([12, 16, 20, 16, 16], 16, 2, 2) + extra_inputs
    feats = backbone_features(names=("c3", "c4", "c5"))
    neck.eval()
    p6_input = neck.inputs.extra.convs["p6"](feats["c5"])
    p7_input = neck.inputs.extra.convs["p7"](torch.relu(p6_input))
    inputs = [feats["c3"], feats["c4"], feats["c5"], p6_input, p7_input]
    x = [neck.projections[f"p{k}"](t) for k, t in zip(range(3, 8), inputs)]
    for repeat in neck.pyramid_convs:
        x = repeat(x)
    out = neck(feats)
    for k, expected in zip(range(3, 8), x):
        torch.testing.assert_close(out[f"p{k}"], expected)


def test_build_from_config_and_errors():
    cfg = tiny_cfg(**{"MODEL.NECK.NAME": "PConv", "MODEL.NECK.OUT_CHANNELS": "16",
                      "MODEL.PCONV.NUM_CONVS": "3", "MODEL.NECK.NORM": "GN",
                      "MODEL.GN.NUM_GROUPS": "4", "MODEL.NECK.MAX_LEVEL": "6"})
    shapes = {k: v for k, v in BACKBONE_SHAPES.items() if k != "c2"}
    neck = build_neck(cfg, shapes)
    assert isinstance(neck, PConvNeck) and len(neck.pyramid_convs) == 3
    assert list(neck.output_shape()) == ["p3", "p4", "p5", "p6"]
    assert neck.pyramid_convs[0].same[1].num_groups == 4
    assert neck.projections["p3"].norm is None and neck.projections["p3"].conv.bias is not None
    cfg.merge_from_list(["MODEL.PCONV.NUM_CONVS", "-1"])
    with pytest.raises(ValueError, match="MODEL.PCONV.NUM_CONVS=-1"):
        build_neck(cfg, shapes)
    with pytest.raises(ValueError, match=r"PConv levels P2-P5 .* need backbone features \['c2'\]"):
        PConvNeck(input_shape=shapes, min_level=2, max_level=5)


def test_retinanet_with_pconv_loss_falls_on_shapes(tmp_path, single_thread):
    first, last, losses = falling_loss_on_shapes(tmp_path, {
        "MODEL.NECK.NAME": "PConv", "MODEL.NECK.OUT_CHANNELS": "32",
        "MODEL.PCONV.NUM_CONVS": "2", "MODEL.NECK.NORM": "BN"})
    assert last < 0.5 * first, (first, last, losses)
