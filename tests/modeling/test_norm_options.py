"""Every norm option in backbone, FPN and head: training, per-level head norms, config keys."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from detector.layers import (
    EvoNormB0,
    EvoNormS0,
    FrozenBatchNorm2d,
    NormSpec,
    SyncBatchNorm2d,
    convert_sync_batchnorm,
    has_batch_statistics,
)
from detector.modeling import RetinaNetHead, build_model
from detector.modeling.backbone import ResNetBackbone

from modeling_testutils import make_batch, tiny_cfg

NORMS = ["", "BN", "FrozenBN", "SyncBN", "GN", "EvoNormS0", "EvoNormB0", "SN"]
LAYER_TYPE = {"BN": nn.BatchNorm2d, "FrozenBN": FrozenBatchNorm2d, "SyncBN": SyncBatchNorm2d,
              "GN": nn.GroupNorm, "EvoNormS0": EvoNormS0, "EvoNormB0": EvoNormB0}


def _cfg(norm, **overrides):
    return tiny_cfg(**{"MODEL.BACKBONE.NORM": norm, "MODEL.NECK.NORM": norm,
                       "MODEL.RETINANET.NORM": norm, "MODEL.EVONORM.NUM_GROUPS": "8",
                       **overrides})


def _model(norm, **overrides):
    torch.manual_seed(0)
    return build_model(_cfg(norm, **overrides))


def _layers(module, layer_type):
    return [m for m in module.modules() if isinstance(m, layer_type)]


@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n or "none")
def test_every_norm_trains_the_tiny_retinanet(norm, single_thread):
    model = _model(norm)
    for part in (model.backbone, model.neck, model.head):
        if norm in LAYER_TYPE:
            assert _layers(part, LAYER_TYPE[norm]), (norm, type(part).__name__)
        elif norm == "SN":  # every conv of the part but the head predictors / FPN top block
            assert any(parametrize.is_parametrized(m, "weight") for m in part.modules())
        else:
            assert not _layers(part, (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d))
    model.train()
    batch = make_batch(2, (64, 64))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                                momentum=0.9)
    totals = []
    for _ in range(30):
        total = sum(model(batch).values())
        assert torch.isfinite(total), (norm, len(totals), totals)
        totals.append(total.item())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert totals[-1] < 0.95 * totals[0], (norm, totals)
    model.eval()
    with torch.no_grad():
        out = model(make_batch(1, (64, 64), with_instances=False))
    assert torch.isfinite(out[0]["instances"].scores).all()


def test_evonorm_replaces_relu_only_where_a_relu_was():
    model = _model("EvoNormS0")
    # convs followed by ReLU (backbone stem and block conv1, head subnets) use the activation
    assert model.backbone.stages[0][1].applies_activation and len(model.backbone.stages[0]) == 2
    assert model.backbone.stages[1].bn1.applies_activation
    assert isinstance(model.backbone.stages[1].act1, nn.Identity)
    assert all(block[1].applies_activation and len(block) == 2 for block in model.head.cls_subnet)
    # the residual branch end, shortcut and FPN convs have no activation: normalization only
    assert not model.backbone.stages[1].bn2.applies_activation
    assert not model.backbone.stages[1].downsample[1].applies_activation
    assert not any(m.applies_activation for m in _layers(model.neck, EvoNormS0))


@pytest.mark.parametrize("norm,per_level", [("BN", True), ("SyncBN", True), ("FrozenBN", True),
                                            ("EvoNormB0", True), ("GN", False),
                                            ("EvoNormS0", False), ("SN", False), ("", False)])
def test_batch_statistics_norms_are_per_level_in_the_head(norm, per_level):
    head = RetinaNetHead(in_channels=16, num_anchors=2, num_classes=3, num_convs=2,
                         norm=NormSpec(norm, gn_groups=4, evonorm_groups=4), num_levels=3)
    assert head.norm_per_level == per_level
    keys = head.state_dict().keys()
    conv_keys = [k for k in keys if k.startswith("cls_subnet.")]
    if not per_level:
        assert head.cls_norms is None and not any("norms" in k for k in keys)
        return
    # one conv set shared by every level, no norm inside it
    assert "cls_subnet.0.0.weight" in conv_keys and not any(k.startswith("cls_subnet.0.1")
                                                            for k in conv_keys)
    assert len(head.cls_norms) == len(head.bbox_norms) == 3
    norms = [n for level in list(head.cls_norms) + list(head.bbox_norms) for n in level]
    assert len(norms) == 3 * 2 * 2 and len({id(n) for n in norms}) == len(norms)
    assert all(has_batch_statistics(n) for n in norms)
    assert "cls_norms.2.1.running_var" in keys and "bbox_norms.0.0.running_var" in keys

    head.train()
    g = torch.Generator().manual_seed(0)
    # levels with different statistics, as in a real pyramid
    features = [torch.randn(2, 16, s, s, generator=g) * (k + 1) + k
                for k, s in enumerate((8, 4, 2))]
    logits, deltas = head(features)
    (sum(x.sum() for x in logits) + sum(x.sum() for x in deltas)).backward()
    conv = head.cls_subnet[0].conv
    assert conv.weight.grad is not None
    if norm != "FrozenBN":
        running = [level[0].running_var for level in head.cls_norms]
        assert not torch.allclose(running[0], running[2])  # each level saw its own features
    with pytest.raises(ValueError, match="per-level norms for 3 levels"):
        head(features[:2])


def test_head_levels_have_distinct_bn_modules_but_share_conv_weights():
    model = _model("BN")
    head = model.head
    assert head.norm_per_level and head.num_levels == model.anchor_generator.num_levels == 3
    for i in range(2):
        per_level = [head.cls_norms[level][i] for level in range(3)]
        assert all(isinstance(n, nn.BatchNorm2d) for n in per_level)
        assert len({id(n) for n in per_level}) == 3
        assert len({n.weight.data_ptr() for n in per_level}) == 3
    conv_params = [k for k, _ in head.named_parameters() if k.startswith("cls_subnet.")]
    assert conv_params == ["cls_subnet.0.0.weight", "cls_subnet.1.0.weight"]  # one set only
    with pytest.raises(ValueError, match="needs num_levels"):
        RetinaNetHead(in_channels=16, num_anchors=2, num_classes=3, norm="BN")


def test_bn_and_evonorm_config_keys_reach_every_part():
    model = _model("EvoNormB0", **{"MODEL.BN.MOMENTUM": "0.01", "MODEL.EVONORM.EPS": "0.001"})
    for part in (model.backbone, model.neck, model.head):
        layers = _layers(part, EvoNormB0)
        assert layers and all(m.momentum == 0.01 and m.eps == 0.001 for m in layers)
    for norm, layer_type in (("BN", nn.BatchNorm2d), ("SyncBN", SyncBatchNorm2d)):
        model = _model(norm, **{"MODEL.BN.MOMENTUM": "0.01", "MODEL.BN.EPS": "0.001"})
        for part in (model.backbone, model.neck, model.head):
            layers = _layers(part, layer_type)
            assert layers and all(m.momentum == 0.01 and m.eps == 0.001 for m in layers)
    model = _model("FrozenBN", **{"MODEL.BN.EPS": "0.001"})
    assert all(m.eps == 0.001 for m in _layers(model, FrozenBatchNorm2d))
    model = _model("EvoNormS0", **{"MODEL.EVONORM.NUM_GROUPS": "4"})
    assert all(m.groups == 4 for m in _layers(model, EvoNormS0))


def test_convert_whole_model_to_sync_batchnorm():
    model = _model("BN")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model = convert_sync_batchnorm(model)
    assert not [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    assert len(_layers(model.head, SyncBatchNorm2d)) == 2 * 2 * 3
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    losses = model(make_batch(2, (64, 64)))
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("key", ["MODEL.BACKBONE.NORM", "MODEL.NECK.NORM", "MODEL.RETINANET.NORM"])
def test_unknown_norm_names_the_key_and_valid_names(key):
    with pytest.raises(ValueError) as e:
        build_model(tiny_cfg(**{key: "BatchNorm"}))
    msg = str(e.value)
    assert msg.startswith(f"{key}: unknown norm 'BatchNorm'") and "\n" not in msg
    assert all(name in msg for name in NORMS[1:] + ['""'])


def test_gn_groups_must_divide_the_channels():
    # TinyNet c1 has 8 channels, the FPN 32: 16 groups fit the FPN only
    with pytest.raises(ValueError, match=r"MODEL.BACKBONE.NORM='GN': .*MODEL.GN.NUM_GROUPS=16 "
                                         r"does not divide 8 channels"):
        build_model(tiny_cfg(**{"MODEL.BACKBONE.NORM": "GN", "MODEL.GN.NUM_GROUPS": "16"}))
    with pytest.raises(ValueError, match=r"MODEL.NECK.NORM='GN': .*MODEL.GN.NUM_GROUPS=5 "
                                         r"does not divide 32 channels"):
        build_model(tiny_cfg(**{"MODEL.NECK.NORM": "GN", "MODEL.GN.NUM_GROUPS": "5"}))


def test_resnet_blocks_take_every_norm():
    x = torch.randn(2, 3, 64, 64)
    for norm in ("SyncBN", "EvoNormS0", "EvoNormB0", "SN", ""):
        torch.manual_seed(0)
        backbone = ResNetBackbone(depth=18, norm=NormSpec(norm, evonorm_groups=16),
                                  out_features=["c3"], freeze_at=2)
        frozen_conv, trained_conv = backbone.layer1[0].conv1, backbone.layer2[0].conv1
        u_before = [c.parametrizations.weight[0]._u.clone() for c in (frozen_conv, trained_conv)
                    if parametrize.is_parametrized(c, "weight")]
        assert backbone(x)["c3"].shape == (2, 128, 8, 8)
        keys = backbone.state_dict().keys()
        # torchvision's names, so ImageNet weights load for the BN-family norms
        assert any(k.startswith("layer2.0.downsample.0.") for k in keys)
        if norm in ("SyncBN", "EvoNormB0", "EvoNormS0"):
            assert "layer2.0.bn2.weight" in keys and "layer2.0.conv1.weight" in keys
        if norm == "SyncBN":  # frozen stages became FrozenBN
            assert isinstance(backbone.layer1[0].bn1, FrozenBatchNorm2d)
            assert isinstance(backbone.layer2[0].bn1, SyncBatchNorm2d)
        if norm == "EvoNormB0":  # frozen stages stop updating the running variance
            assert backbone.bn1.frozen and backbone.layer1[0].bn1.frozen
            assert not backbone.layer2[0].bn1.frozen
        if norm == "SN":
            assert parametrize.is_parametrized(backbone.layer2[0].conv1, "weight")
            assert isinstance(backbone.layer2[0].bn1, nn.Identity)
            assert backbone.layer2[0].conv1.bias is not None
            # frozen stages stop the power iteration, trained ones run it
            assert torch.equal(frozen_conv.parametrizations.weight[0]._u, u_before[0])
            assert not torch.equal(trained_conv.parametrizations.weight[0]._u, u_before[1])
