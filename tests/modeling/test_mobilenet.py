"""MobileNetV3 backbone: levels, norms, freezing, torchvision weights, training on shapes."""
import itertools

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v3_small
from torchvision.ops.misc import Conv2dNormActivation

from detector.checkpoint import load_backbone_weights
from detector.data import build_detection_train_loader
from detector.layers import EvoNormB0, EvoNormS0, FrozenBatchNorm2d, NormSpec, SyncBatchNorm2d
from detector.modeling import build_backbone, build_model
from detector.modeling.backbone import MobileNetV3Backbone

from modeling_testutils import tiny_cfg

ALL_LEVELS = ["c1", "c2", "c3", "c4", "c5"]
# channels of c1..c5 at width 1.0: the last torchvision block of each stride
EXPECTED_CHANNELS = {"large": [16, 24, 40, 112, 960], "small": [16, 16, 24, 48, 576]}
NORM_LAYERS = {"FrozenBN": FrozenBatchNorm2d, "BN": nn.BatchNorm2d, "SyncBN": SyncBatchNorm2d,
               "GN": nn.GroupNorm, "EvoNormS0": EvoNormS0, "EvoNormB0": EvoNormB0}


def _small(norm="BN", **kwargs):
    spec = NormSpec(norm, gn_groups=4, evonorm_groups=4, key="MODEL.BACKBONE.NORM")
    return MobileNetV3Backbone(variant="small", width_mult=0.5, norm=spec, **kwargs)


@pytest.mark.parametrize("variant", ["large", "small"])
def test_levels_have_strides_and_channels_of_the_last_block_per_stride(variant):
    backbone = MobileNetV3Backbone(variant=variant, norm="BN", out_features=ALL_LEVELS).eval()
    shapes = backbone.output_shape()
    assert list(shapes) == ALL_LEVELS
    assert [shapes[f].channels for f in ALL_LEVELS] == EXPECTED_CHANNELS[variant]
    assert [shapes[f].stride for f in ALL_LEVELS] == [2, 4, 8, 16, 32]
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 64, 96))
    assert list(out) == ALL_LEVELS
    for level, spec in shapes.items():
        assert out[level].shape == (2, spec.channels, 64 // spec.stride, 96 // spec.stride)
    # the level is the LAST module of its stride: the next module halves the resolution
    assert len(backbone.features) == {"large": 17, "small": 13}[variant]
    x = torch.randn(1, 3, 64, 64)
    sizes = []
    with torch.no_grad():
        for module in backbone.features:
            x = module(x)
            sizes.append(x.shape[-1])
    last_of_stride = [i for i in range(len(sizes))
                      if i + 1 == len(sizes) or sizes[i + 1] < sizes[i]]
    assert [backbone.level_index[k] for k in range(1, 6)] == last_of_stride


def test_width_mult_and_levels_above_the_highest_are_not_built():
    backbone = _small(out_features=["c3", "c4"])
    # torchvision rounds width 0.5 to multiples of 8: c3 24 -> 16, c4 48 -> 24
    assert {k: (s.channels, s.stride) for k, s in backbone.output_shape().items()} == {
        "c3": (16, 8), "c4": (24, 16)}
    assert len(backbone.features) == 9  # features[0..8]; c4 is features[8]
    out = backbone(torch.randn(2, 3, 64, 64))
    assert [tuple(t.shape) for t in out.values()] == [(2, 16, 8, 8), (2, 24, 4, 4)]
    gray = _small(out_features=["c3"], in_channels=1)
    assert gray.features[0][0].in_channels == 1
    assert gray(torch.randn(2, 1, 64, 64))["c3"].shape == (2, 16, 8, 8)


@pytest.mark.parametrize("norm", list(NORM_LAYERS))
def test_each_norm_builds_trains_and_evaluates(norm):
    torch.manual_seed(0)
    backbone = _small(norm)
    layers = [m for m in backbone.modules() if isinstance(m, NORM_LAYERS[norm])]
    assert len(layers) == len([m for m in backbone.modules() if isinstance(m, nn.Conv2d)
                               and m.bias is None])  # one norm per bias-free conv
    out = backbone(torch.randn(2, 3, 64, 64))
    loss = sum(t.square().mean() for t in out.values())
    assert torch.isfinite(loss)
    loss.backward()
    stem = backbone.features[0][0].weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    with torch.no_grad():
        out = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert all(torch.isfinite(t).all() for t in out.values())


def test_evonorm_replaces_the_activation_only_where_one_was():
    backbone = _small("EvoNormS0")
    stem = backbone.features[0]
    assert len(stem) == 2 and stem[1].applies_activation
    expand, depthwise, project = (backbone.features[2].block[i] for i in (0, 1, 2))
    assert expand[1].applies_activation and depthwise[1].applies_activation
    assert not project[1].applies_activation and len(project) == 2
    # no conv block keeps a ReLU / hard-swish of its own
    blocks = [m for m in backbone.modules() if isinstance(m, Conv2dNormActivation)]
    assert blocks and not any(isinstance(m, (nn.ReLU, nn.Hardswish)) for b in blocks for m in b)
    # squeeze-excitation keeps its own ReLU / hard-sigmoid
    assert isinstance(backbone.features[1].block[1].activation, nn.ReLU)


@pytest.mark.parametrize("norm", ["", "SN"])
def test_norms_without_a_layer_are_refused(norm):
    with pytest.raises(ValueError, match=f"MODEL.BACKBONE.NORM='{norm}' is not supported"):
        MobileNetV3Backbone(variant="small", norm=norm)


@pytest.mark.parametrize("freeze_at,last_frozen", [(0, -1), (1, 0), (2, 1), (3, 3), (5, 12)])
def test_freeze_at_freezes_the_modules_up_to_the_level(freeze_at, last_frozen):
    torch.manual_seed(0)
    backbone = _small("BN", out_features=ALL_LEVELS, freeze_at=freeze_at)
    for index, module in enumerate(backbone.features):
        frozen = index <= last_frozen
        assert all(p.requires_grad != frozen for p in module.parameters()), index
        bns = [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert bns and all(isinstance(m, FrozenBatchNorm2d) == frozen for m in bns), index
    # frozen modules compute the same function in training mode (no batch statistics)
    if last_frozen >= 0:
        head = backbone.features[:last_frozen + 1]
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            before = head.eval()(x)
            after = head.train()(x)
        torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_built_from_config_with_errors_naming_the_key():
    cfg = tiny_cfg(**{"MODEL.BACKBONE.NAME": "MobileNetV3", "MODEL.MOBILENET.VARIANT": "small",
                      "MODEL.MOBILENET.WIDTH_MULT": "0.5", "MODEL.BACKBONE.FREEZE_AT": "2",
                      "MODEL.BACKBONE.NORM": "GN", "MODEL.GN.NUM_GROUPS": "4"})
    backbone = build_backbone(cfg)
    assert isinstance(backbone, MobileNetV3Backbone) and backbone.width_mult == 0.5
    assert isinstance(backbone.features[3].block[0][1], nn.GroupNorm)
    assert not any(p.requires_grad for p in backbone.features[1].parameters())
    assert all(p.requires_grad for p in backbone.features[2].parameters())
    with pytest.raises(ValueError, match="MODEL.MOBILENET.VARIANT='medium'"):
        MobileNetV3Backbone(variant="medium")
    with pytest.raises(ValueError, match="MODEL.MOBILENET.WIDTH_MULT=0"):
        MobileNetV3Backbone(width_mult=0)
    with pytest.raises(ValueError, match="MODEL.BACKBONE.OUT_FEATURES"):
        MobileNetV3Backbone(out_features=["c6"])
    with pytest.raises(ValueError, match="MODEL.GN.NUM_GROUPS=32 does not divide"):
        MobileNetV3Backbone(variant="small", width_mult=0.5, norm="GN")


def _random_torchvision_small(seed):
    """An untrained torchvision MobileNetV3-Small (width 0.5) with non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = mobilenet_v3_small(width_mult=0.5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_torchvision_weights_land_bitwise(tmp_path, norm):
    source = _random_torchvision_small(seed=1)
    path = tmp_path / "mobilenet_v3_small.pth"
    torch.save(source.state_dict(), path)
    ours = MobileNetV3Backbone(variant="small", width_mult=0.5, norm=NormSpec(norm, bn_eps=1e-3),
                               out_features=ALL_LEVELS)
    report = load_backbone_weights(ours, str(path))
    assert report.missing == [] and report.unused == []
    assert report.dropped == ["classifier.0.bias", "classifier.0.weight",
                              "classifier.3.bias", "classifier.3.weight"]
    theirs = source.state_dict()
    loaded = ours.state_dict()
    for key in report.loaded:
        assert torch.equal(loaded[key], theirs[key]), key
    assert len(report.loaded) == len([k for k in theirs if k.startswith("features.")
                                      and not k.endswith("num_batches_tracked")])
    # with torchvision's eps the loaded trunk computes torchvision's features (exactly with the
    # same BatchNorm kernel; FrozenBN folds the statistics into one scale and shift)
    x = torch.randn(2, 3, 64, 64)
    exact = {"rtol": 0, "atol": 0} if norm == "BN" else {}
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x)["c5"], source.eval().features(x), **exact)


def test_weights_beyond_the_highest_level_are_reported_unused(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(_random_torchvision_small(seed=2).state_dict(), path)
    ours = _small("BN", out_features=["c3"])
    report = load_backbone_weights(ours, str(path))
    assert report.missing == []
    assert report.unused and all(int(k.split(".")[1]) > 3 for k in report.unused)


def _shapes_cfg():
    return tiny_cfg(**{
        "MODEL.BACKBONE.NAME": "MobileNetV3", "MODEL.MOBILENET.VARIANT": "small",
        "MODEL.MOBILENET.WIDTH_MULT": "0.5", "MODEL.BACKBONE.NORM": "BN",
        "MODEL.PIXEL_MEAN": "[127.5, 127.5, 127.5]", "MODEL.PIXEL_STD": "[64.0, 64.0, 64.0]",
        "DATASETS.TRAIN": '("shapes_train",)', "DATASETS.TEST": "()",
        "INPUT.MIN_SIZE_TRAIN": "(64,)", "INPUT.MAX_SIZE_TRAIN": "64",
        "SOLVER.IMS_PER_BATCH": "8", "DATALOADER.NUM_WORKERS": "0", "SEED": "7",
    })


def test_retinanet_with_mobilenet_trains_on_shapes(single_thread):
    cfg = _shapes_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.backbone, MobileNetV3Backbone)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03,
                                momentum=0.9)
    totals = []
    for batch in itertools.islice(build_detection_train_loader(cfg), 60):
        total = sum(model(batch).values())
        assert torch.isfinite(total), (len(totals), totals)
        totals.append(total.item())
        optimizer.zero_grad()
        total.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
    first, last = sum(totals[:8]) / 8, sum(totals[-8:]) / 8
    assert last < 0.8 * first, totals
