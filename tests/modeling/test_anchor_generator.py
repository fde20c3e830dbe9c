import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList as TVImageList

from detector.config import get_cfg
from detector.layers import ShapeSpec
from detector.modeling import AnchorGenerator

from modeling_testutils import CONFIGS


def _pyramid(levels):
    return {f"p{k}": ShapeSpec(channels=8, stride=2 ** k) for k in levels}


def _keras_anchors(base_size, ratios, scales, stride, height, width):
    """keras-retinanet's generate_anchors + shift, written out in numpy as the reference."""
    ratios, scales = np.array(ratios), np.array(scales)
    n = len(ratios) * len(scales)
    anchors = np.zeros((n, 4))
    anchors[:, 2:] = base_size * np.tile(scales, (2, len(ratios))).T
    areas = anchors[:, 2] * anchors[:, 3]
    anchors[:, 2] = np.sqrt(areas / np.repeat(ratios, len(scales)))
    anchors[:, 3] = anchors[:, 2] * np.repeat(ratios, len(scales))
    anchors[:, 0::2] -= np.tile(anchors[:, 2] * 0.5, (2, 1)).T
    anchors[:, 1::2] -= np.tile(anchors[:, 3] * 0.5, (2, 1)).T
    shift_x = (np.arange(0, width) + 0.5) * stride
    shift_y = (np.arange(0, height) + 0.5) * stride
    shift_x, shift_y = np.meshgrid(shift_x, shift_y)
    shifts = np.vstack((shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel())).T
    return (anchors[None] + shifts[:, None]).reshape(-1, 4)


PYRAMID_CONFIGS = {
    # file: (levels, base sizes, strides)
    "retinanet_base.yaml": (range(3, 8), [16, 32, 64, 128, 256], [8, 16, 32, 64, 128]),
    "retinanet_P2-P6.yaml": (range(2, 7), [16, 32, 64, 128, 256], [4, 8, 16, 32, 64]),
    "retinanet_P2-P5_high.yaml": (range(2, 6), [32, 64, 128, 256], [4, 8, 16, 32]),
    "retinanet_P2-P5_low.yaml": (range(2, 6), [16, 32, 64, 128], [4, 8, 16, 32]),
    "retinanet_P2-P5_a8.yaml": (range(2, 6), [8, 16, 32, 64], [4, 8, 16, 32]),
}


@pytest.mark.parametrize("name", sorted(PYRAMID_CONFIGS))
def test_keras_pyramid_configs_match_keras_retinanet(name):
    levels, sizes, strides = PYRAMID_CONFIGS[name]
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / "pyramid" / name))
    gen = AnchorGenerator(**AnchorGenerator.from_config(cfg, _pyramid(levels)))
    assert gen.num_anchors_per_location == 12  # ratios 0.5 1 2 3 x scales 1 1.2 1.6
    assert gen.strides == strides
    image_h, image_w = 96, 160
    features = [torch.zeros(1, 8, math.ceil(image_h / s), math.ceil(image_w / s)) for s in strides]
    anchors = gen(features)
    for level_anchors, feature, size, stride in zip(anchors, features, sizes, strides):
        h, w = feature.shape[-2:]
        assert level_anchors.shape == (h * w * 12, 4) and level_anchors.dtype == torch.float32
        expected = _keras_anchors(size, [0.5, 1, 2, 3], [1.0, 1.2, 1.6], stride, h, w)
        np.testing.assert_allclose(level_anchors.numpy(), expected, rtol=0, atol=1e-3)


def test_matches_torchvision_anchor_generator_exactly():
    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3)))
                  for x in [32, 64, 128, 256, 512])
    tv = TVAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    ours = AnchorGenerator(sizes=[list(s) for s in sizes], scales=[1.0], ratios=[0.5, 1.0, 2.0],
                           strides=[8, 16, 32, 64, 128], offset=0.0, round_base_anchors=True)
    features = [torch.zeros(2, 4, 256 // s, 384 // s) for s in [8, 16, 32, 64, 128]]
    expected = tv(TVImageList(torch.zeros(2, 3, 256, 384), [(256, 384)] * 2), features)[0]
    got = torch.cat(ours(features))
    assert torch.equal(got, expected)


def test_config_sizes_forms_and_base_anchor_shapes():
    one_per_level = AnchorGenerator(sizes=[32, 64], scales=[1.0, 2.0], ratios=[0.5, 2.0],
                                    strides=[8, 16])
    lists = AnchorGenerator(sizes=[[32], [64]], scales=[1.0, 2.0], ratios=[0.5, 2.0],
                            strides=[8, 16])
    assert torch.equal(one_per_level.base_anchors(0), lists.base_anchors(0))
    base = one_per_level.base_anchors(1)
    widths, heights = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
    # ratio-major: (r=0.5, s=1), (0.5, 2), (2, 1), (2, 2); ratio = h / w, area = (size * scale)^2
    expected_w = torch.tensor([64 / math.sqrt(0.5), 128 / math.sqrt(0.5),
                               64 / math.sqrt(2), 128 / math.sqrt(2)])
    torch.testing.assert_close(widths, expected_w)
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 0.5, 2.0, 2.0]))
    torch.testing.assert_close(base[:, :2] + base[:, 2:], torch.zeros(4, 2))  # centred on 0


def test_offset_places_centres_inside_cells():
    gen = AnchorGenerator(sizes=[[16]], scales=[1.0], ratios=[1.0], strides=[8], offset=0.5)
    anchors = gen([torch.zeros(1, 1, 2, 3)])[0]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    expected = torch.tensor([[4.0, 4.0], [12.0, 4.0], [20.0, 4.0],
                             [4.0, 12.0], [12.0, 12.0], [20.0, 12.0]])
    assert torch.equal(centres, expected)


def test_grids_are_cached():
    gen = AnchorGenerator(sizes=[[16]], scales=[1.0], ratios=[1.0], strides=[8])
    first = gen([torch.zeros(1, 1, 4, 5)])[0]
    assert gen([torch.zeros(2, 1, 4, 5)])[0] is first
    assert gen([torch.zeros(1, 1, 5, 5)])[0] is not first


def test_strides_must_be_powers_of_level():
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.NECK.MIN_LEVEL", "2", "MODEL.NECK.MAX_LEVEL", "5",
                         "MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64], [128], [256]]",
                         "MODEL.ANCHOR_GENERATOR.STRIDES", "[8, 16, 32, 64]"])
    expected = r"STRIDES=\[8, 16, 32, 64\] must equal 2\*\*level.*\[4, 8, 16, 32\]"
    with pytest.raises(ValueError, match=expected):
        AnchorGenerator.from_config(cfg, _pyramid(range(2, 6)))
    cfg.merge_from_list(["MODEL.ANCHOR_GENERATOR.STRIDES", "[]"])  # derived from the pyramid
    assert AnchorGenerator.from_config(cfg, _pyramid(range(2, 6)))["strides"] == [4, 8, 16, 32]


def test_sizes_must_cover_every_level():
    cfg = get_cfg()  # P3-P7, five levels
    cfg.merge_from_list(["MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64], [128]]"])
    with pytest.raises(ValueError, match="SIZES has 3 levels but the pyramid has 5"):
        AnchorGenerator.from_config(cfg, _pyramid(range(3, 8)))
    with pytest.raises(ValueError, match="same number of sizes"):
        AnchorGenerator(sizes=[[32, 40], [64]], scales=[1.0], ratios=[1.0], strides=[8, 16])


def _retinanet_level_sizes(image_h, image_w):
    """P3-P7 feature sizes of a ResNet + FPN (P6/P7 by 3x3 stride-2 convs) on a padded batch."""
    sizes = [(image_h // 8, image_w // 8), (image_h // 16, image_w // 16),
             (image_h // 32, image_w // 32)]
    for _ in range(2):
        h, w = sizes[-1]
        sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    return sizes


def _torchvision_retinanet_generators(stride_rule):
    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3)))
                  for x in [32, 64, 128, 256, 512])
    tv = TVAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    ours = AnchorGenerator(sizes=[list(s) for s in sizes], scales=[1.0], ratios=[0.5, 1.0, 2.0],
                           strides=[8, 16, 32, 64, 128], offset=0.0, round_base_anchors=True,
                           stride_rule=stride_rule)
    return tv, ours


@pytest.mark.parametrize("image_size", [(480, 544), (800, 1088), (256, 384)])
def test_torchvision_stride_rule_matches_torchvision_at_any_padded_size(image_size):
    tv, ours = _torchvision_retinanet_generators("torchvision")
    _, pyramid = _torchvision_retinanet_generators("pyramid")
    features = [torch.zeros(1, 4, h, w) for h, w in _retinanet_level_sizes(*image_size)]
    expected = tv(TVImageList(torch.zeros(1, 3, *image_size), [image_size]), features)[0]
    got = ours(features, image_size)
    assert torch.equal(torch.cat(got), expected)
    # the pyramid rule agrees on P3-P5 (multiples of 32) and only where the size is a multiple
    # of P6's and P7's strides too
    by_pyramid = pyramid(features)
    for level in range(5):
        same = torch.equal(by_pyramid[level], got[level])
        stride = 8 * 2 ** level
        assert same == (image_size[0] % stride == 0 and image_size[1] % stride == 0)


def test_torchvision_stride_rule_gives_per_axis_strides():
    _, ours = _torchvision_retinanet_generators("torchvision")
    sizes = _retinanet_level_sizes(800, 1088)
    assert sizes[3:] == [(13, 17), (7, 9)]
    assert ours.level_strides(sizes, (800, 1088)) == [(8, 8), (16, 16), (32, 32), (61, 64),
                                                       (114, 120)]
    p7 = ours([torch.zeros(1, 1, h, w) for h, w in sizes], (800, 1088))[4].view(7, 9, 9, 4)
    # the same anchor shape one cell right / down moves by stride_w / stride_h
    torch.testing.assert_close(p7[0, 1] - p7[0, 0], torch.tensor([120.0, 0, 120, 0]).expand(9, 4))
    torch.testing.assert_close(p7[1, 0] - p7[0, 0], torch.tensor([0, 114.0, 0, 114]).expand(9, 4))


def test_mask_rcnn_anchors_on_p2_p6_match_torchvision():
    """torchvision's Mask R-CNN RPN anchors: one size per level on P2-P6, P6 = max-pool of P5."""
    tv = TVAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.NECK.MIN_LEVEL", "2", "MODEL.NECK.MAX_LEVEL", "6",
                         "MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64], [128], [256], [512]]",
                         "MODEL.ANCHOR_GENERATOR.SCALES", "[1.0]",
                         "MODEL.ANCHOR_GENERATOR.STRIDES", "[4, 8, 16, 32, 64]",
                         "MODEL.ANCHOR_GENERATOR.ROUND_BASE_ANCHORS", "True",
                         "MODEL.ANCHOR_GENERATOR.STRIDE_RULE", "torchvision"])
    ours = AnchorGenerator(**AnchorGenerator.from_config(cfg, _pyramid(range(2, 7))))
    assert ours.stride_rule == "torchvision" and ours.num_anchors_per_location == 3
    image_size = (800, 1088)
    features = [torch.zeros(1, 2, 800 // s, 1088 // s) for s in (4, 8, 16, 32)]
    features.append(features[-1][..., ::2, ::2])  # 13x17: stride 61 x 64
    expected = tv(TVImageList(torch.zeros(1, 3, *image_size), [image_size]), features)[0]
    assert torch.equal(torch.cat(ours(features, image_size)), expected)


def test_grid_cache_is_keyed_by_the_strides():
    _, ours = _torchvision_retinanet_generators("torchvision")
    features = [torch.zeros(1, 1, h, w) for h, w in _retinanet_level_sizes(800, 1088)]
    at_800 = ours(features, (800, 1088))
    assert ours(features, (800, 1088))[3] is at_800[3]
    at_832 = ours(features, (832, 1088))  # same P6 size 13x17, stride 64 instead of 61
    assert at_832[0] is at_800[0]
    assert not torch.equal(at_832[3], at_800[3])
    assert float(at_832[3][-1, 1] - at_800[3][-1, 1]) == 12 * (64 - 61)


def test_torchvision_stride_rule_with_offset_centres_cells_per_axis():
    gen = AnchorGenerator(sizes=[[16]], scales=[1.0], ratios=[1.0], strides=[8], offset=0.5,
                          stride_rule="torchvision")
    anchors = gen([torch.zeros(1, 1, 2, 3)], (20, 30))[0]  # strides 10 (h) and 10 (w)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    expected = torch.tensor([[5.0, 5.0], [15.0, 5.0], [25.0, 5.0],
                             [5.0, 15.0], [15.0, 15.0], [25.0, 15.0]])
    assert torch.equal(centres, expected)
    anchors = gen([torch.zeros(1, 1, 2, 3)], (18, 36))[0]  # strides 9 (h) and 12 (w)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert torch.equal(centres[:3, 0], torch.tensor([6.0, 18.0, 30.0]))
    assert torch.equal(centres[::3, 1], torch.tensor([4.5, 13.5]))


def test_stride_rule_errors():
    with pytest.raises(ValueError, match=r"STRIDE_RULE='keras' must be one of \['pyramid', "
                                         r"'torchvision'\]"):
        AnchorGenerator(sizes=[[16]], scales=[1.0], ratios=[1.0], strides=[8],
                        stride_rule="keras")
    gen = AnchorGenerator(sizes=[[16]], scales=[1.0], ratios=[1.0], strides=[8],
                          stride_rule="torchvision")
    with pytest.raises(ValueError, match="STRIDE_RULE='torchvision' needs the padded image size"):
        gen([torch.zeros(1, 1, 4, 4)])
    with pytest.raises(ValueError, match="feature map 4x4 does not fit the padded image 3x32"):
        gen([torch.zeros(1, 1, 4, 4)], (3, 32))
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.ANCHOR_GENERATOR.STRIDE_RULE", "nearest"])
    with pytest.raises(ValueError, match="MODEL.ANCHOR_GENERATOR.STRIDE_RULE='nearest'"):
        AnchorGenerator(**AnchorGenerator.from_config(cfg, _pyramid(range(3, 8))))
