import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

from detector.layers import FrozenBatchNorm2d, NormSpec
from detector.modeling import build_backbone
from detector.modeling.backbone import ResNetBackbone, TinyNetBackbone

from modeling_testutils import tiny_cfg

EXPECTED_CHANNELS = {18: [64, 128, 256, 512], 34: [64, 128, 256, 512], 50: [256, 512, 1024, 2048]}


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_resnet_depth_shapes(depth):
    cfg = tiny_cfg(**{"MODEL.BACKBONE.NAME": "ResNet", "MODEL.RESNETS.DEPTH": str(depth),
                      "MODEL.BACKBONE.NORM": "FrozenBN",
                      "MODEL.BACKBONE.OUT_FEATURES": '["c2", "c3", "c4", "c5"]'})
    backbone = build_backbone(cfg)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = backbone(x)
    shapes = backbone.output_shape()
    assert list(out) == ["c2", "c3", "c4", "c5"] == list(shapes)
    for k, channels in zip(range(2, 6), EXPECTED_CHANNELS[depth]):
        assert shapes[f"c{k}"].channels == channels and shapes[f"c{k}"].stride == 2 ** k
        assert out[f"c{k}"].shape == (1, channels, 64 // 2 ** k, 96 // 2 ** k)


def _trainable_prefixes(backbone):
    return sorted({n.split(".")[0] for n, p in backbone.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("freeze_at,trainable", [
    (0, ["bn1", "conv1", "layer1", "layer2", "layer3", "layer4"]),
    (1, ["layer1", "layer2", "layer3", "layer4"]),
    (2, ["layer2", "layer3", "layer4"]),
    (5, []),
])
def test_resnet_freeze_at(freeze_at, trainable):
    backbone = ResNetBackbone(depth=18, norm="BN", freeze_at=freeze_at)
    assert _trainable_prefixes(backbone) == trainable
    # BatchNorm in frozen stages stops updating statistics too
    if freeze_at >= 2:
        assert isinstance(backbone.bn1, FrozenBatchNorm2d)
        assert isinstance(backbone.layer1[0].bn1, FrozenBatchNorm2d)
    if freeze_at < 5:
        assert isinstance(backbone.layer4[0].bn1, nn.BatchNorm2d)


def test_resnet_norms_and_unbuilt_stages():
    gn = ResNetBackbone(depth=18, norm=NormSpec("GN", gn_groups=16), out_features=["c3"])
    assert isinstance(gn.bn1, nn.GroupNorm) and gn.bn1.num_groups == 16
    assert not hasattr(gn, "layer3") and not hasattr(gn, "layer4")  # above c3: not built
    assert list(gn(torch.randn(1, 3, 64, 64))) == ["c3"]
    with pytest.raises(ValueError, match="MODEL.BACKBONE.OUT_FEATURES"):
        ResNetBackbone(depth=18, out_features=["c1", "c3"])
    with pytest.raises(ValueError, match="MODEL.RESNETS.DEPTH=152"):
        ResNetBackbone(depth=152)
    with pytest.raises(ValueError, match="MODEL.BACKBONE.NORM: unknown norm 'LN'"):
        ResNetBackbone(depth=18, norm="LN")


def test_tinynet_shapes_and_cost():
    backbone = build_backbone(tiny_cfg(**{
        "MODEL.TINYNET.CHANNELS": "[16, 32, 64, 96, 128]",
        "MODEL.BACKBONE.OUT_FEATURES": '["c2", "c3", "c4", "c5"]'}))
    assert isinstance(backbone, TinyNetBackbone)
    backbone.eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        out = backbone(x)
    for k, channels in zip(range(2, 6), [32, 64, 96, 128]):
        assert out[f"c{k}"].shape == (2, channels, 128 // 2 ** k, 128 // 2 ** k)
        assert backbone.output_shape()[f"c{k}"].stride == 2 ** k
    # light enough for the CPU demo: < 1 M parameters, < 0.1 GMAC per 128 px image (ResNet-18: 0.6)
    assert sum(p.numel() for p in backbone.parameters()) < 1_000_000
    flops = FlopCountAnalysis(backbone, x[:1])
    flops.unsupported_ops_warnings(False)
    assert flops.total() < 0.1e9


def test_tinynet_freeze_and_registry():
    backbone = TinyNetBackbone(channels=[8, 8, 8, 8, 8], norm="BN", freeze_at=2)
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("stages.0.", "stages.1.")) for n in frozen)
    assert isinstance(backbone.stages[1].bn1, FrozenBatchNorm2d)
    with pytest.raises(KeyError, match="MODEL.BACKBONE.NAME='VGG'"):
        build_backbone(tiny_cfg(**{"MODEL.BACKBONE.NAME": "VGG"}))


def test_tinynet_plain_stages():
    backbone = build_backbone(tiny_cfg(**{
        "MODEL.TINYNET.CHANNELS": "[16, 32, 64, 96, 128]", "MODEL.TINYNET.BLOCK": "plain",
        "MODEL.BACKBONE.OUT_FEATURES": '["c2", "c3", "c4", "c5"]'}))
    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    # two 3x3 convs per stage, the first strided, no 1x1 projection
    assert [c.kernel_size for c in convs] == [(3, 3)] * 10
    assert [c.stride[0] for c in convs] == [2, 1] * 5
    with torch.no_grad():
        out = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(out[f"c{k}"].shape[1:]) for k in range(2, 6)] == [
        (32, 16, 16), (64, 8, 8), (96, 4, 4), (128, 2, 2)]
    # stage 3 and above are not built when c2 is the highest output
    low = TinyNetBackbone(channels=[8] * 5, block="plain", out_features=["c2"], freeze_at=1)
    assert len(low.stages) == 2
    assert not any(p.requires_grad for p in low.stages[0].parameters())
    with pytest.raises(ValueError, match="MODEL.TINYNET.BLOCK='vgg'"):
        TinyNetBackbone(block="vgg")


def test_efficientnet_split_gradient_depthwise_convs_train_like_timm_convs():
    """The stride-1 5x5 depthwise convs run as DepthwiseConv2d (faster CPU weight gradient):
    training-mode features, gradients and BN statistics equal those of timm's own convs."""
    import copy

    from detector.layers import DepthwiseConv2d, replace_modules
    from detector.modeling.backbone import efficientnet

    torch.manual_seed(0)
    backbone = efficientnet.EfficientNetBackbone(variant="b0", drop_path_rate=0.0).train()
    converted = [m for m in backbone.modules() if isinstance(m, DepthwiseConv2d)]
    # B0's stride-1 5x5 depthwise convs: 1 of the 2 blocks of stage 3, all 3 of stage 5, 3 of
    # the 4 of stage 6
    assert len(converted) == 7
    assert all(m.kernel_size == (5, 5) and m.stride == (1, 1) for m in converted)

    def plain(module):
        if type(module) is not DepthwiseConv2d:
            return module
        conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                         padding=module.padding, groups=module.groups, bias=False)
        conv.weight = module.weight
        return conv

    reference = replace_modules(copy.deepcopy(backbone), plain)
    assert not any(isinstance(m, DepthwiseConv2d) for m in reference.modules())
    assert list(reference.state_dict()) == list(backbone.state_dict())
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    results = []
    for model in (reference, backbone):
        features = model(x)
        sum((f * f).mean() for f in features.values()).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((features, grads, model.state_dict()))
    (ref_features, ref_grads, ref_state), (features, grads, state) = results
    for name in ref_features:
        torch.testing.assert_close(features[name], ref_features[name], rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-6)
    for name in ref_state:
        torch.testing.assert_close(state[name], ref_state[name], rtol=1e-5, atol=1e-6)


def test_efficientnet_training_norms_match_timm_and_reuse_their_maps(bn_act_kernel):
    """In training, the BN + activation layers run through pooled maps (pointwise_conv_norm_act,
    its 1x1 convs as matrix products): over two steps, features, gradients and BN statistics are
    as close to a float64 run of timm's own forward as timm's own float32 forward is (the sums
    run in another order); the second step reuses the first one's maps; eval mode releases
    them."""
    import copy

    from timm.models._efficientnet_blocks import InvertedResidual

    from detector.modeling.backbone import efficientnet

    torch.manual_seed(0)
    backbone = efficientnet.EfficientNetBackbone(variant="b0", drop_path_rate=0.0).train()
    backbone = backbone.to(memory_format=torch.channels_last)
    timm_fp32 = copy.deepcopy(backbone)
    timm_fp64 = copy.deepcopy(backbone).double()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)

    def close_as_timm(ours, timm, exact, what):
        ours, timm = ours.double(), timm.double()
        ours_error, timm_error = (ours - exact).norm(), (timm - exact).norm()
        assert ours_error <= 3 * timm_error + 1e-5 * exact.norm(), (
            f"{what}: error {ours_error:.3g}, timm's {timm_error:.3g}")

    addresses = []
    for step in range(2):
        results = []
        for model, own in ((backbone, True), (timm_fp32, False), (timm_fp64, False)):
            inputs = x.to(next(model.parameters()).dtype)
            features = model(inputs) if own else dict(zip(model.out_features,
                                                          model.body(inputs)))
            model.zero_grad()
            sum((f * f).mean() for f in features.values()).backward()
            results.append((features, {n: p.grad for n, p in model.named_parameters()},
                            model.state_dict()))
        (ours, timm, exact) = results
        for part, what in ((0, "feature"), (1, "gradient"), (2, "state")):
            for name in exact[part]:
                if exact[part][name].is_floating_point():
                    close_as_timm(ours[part][name], timm[part][name], exact[part][name],
                                  f"step {step} {what} {name}")
                else:
                    assert torch.equal(ours[part][name], timm[part][name]), name
        maps = backbone._train_buffers._maps
        addresses.append({k: v.data_ptr() for k, v in maps.items()})
        # the returned features are pooled maps too: held, they would not be reused
        del results, ours, timm, exact, features
    blocks = [b for stage in backbone.body.blocks for b in stage]
    mbconv = sum(isinstance(b, InvertedResidual) for b in blocks)
    pointwise_convs = [c for b in blocks for c in (b.conv_pw, getattr(b, "conv_pwl", None))
                       if c is not None]
    # norm and activation maps of the stem and of each block's BNs with an activation, norm
    # maps of the BNs without one (their output), conv maps of the 1x1 convs before a BN:
    # depthwise-separable block 2 + 2, MBConv 3 (expansion) + 2 + 2 (projection); and the
    # input-gradient maps of the 1x1 convs whose backward runs as matmuls (32+ input channels).
    # The C++ kernel keeps no norm map beside an activation's, but the norm's input gradient:
    # one map more for each BN without an activation, one per block.
    wide = sum(c.in_channels >= 32 for c in pointwise_convs)
    assert len(pointwise_convs) == 1 + 2 * mbconv and wide == 28
    fused = len(blocks) if bn_act_kernel == "fused" else 0
    assert len(addresses[0]) == 2 + 4 + mbconv * 7 + wide + fused == 139 + fused
    assert addresses[1] == addresses[0]
    backbone.eval()
    assert len(backbone._train_buffers) == 0
    # contiguous maps take timm's forward
    backbone.to(memory_format=torch.contiguous_format).train()(x.contiguous())
    assert len(backbone._train_buffers) == 0


def test_efficientnet_without_reused_training_maps_trains_the_same():
    """MODEL.EFFICIENTNET.REUSE_TRAINING_MAPS False keeps no maps; features and gradients equal
    those with reused maps up to float rounding."""
    from detector.config import get_cfg
    from detector.modeling.backbone import efficientnet

    cfg = get_cfg()
    cfg.MODEL.EFFICIENTNET.VARIANT = "b0"
    cfg.MODEL.EFFICIENTNET.REUSE_TRAINING_MAPS = False
    assert efficientnet.EfficientNetBackbone.from_config(cfg)["reuse_training_maps"] is False
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    results = []
    for reuse in (True, False):
        torch.manual_seed(0)
        backbone = efficientnet.EfficientNetBackbone(variant="b0", drop_path_rate=0.0,
                                                     reuse_training_maps=reuse)
        backbone = backbone.train().to(memory_format=torch.channels_last)
        features = backbone(x)
        sum((f * f).mean() for f in features.values()).backward()
        results.append((features, {n: p.grad for n, p in backbone.named_parameters()}))
        assert (backbone._train_buffers is None) != reuse
    (features, grads), (plain_features, plain_grads) = results

    def relative_difference(a, b):
        return float((a - b).norm() / b.norm())

    # the 1x1 convs sum in another order (matmul against oneDNN), and BN over the 2x2 maps of
    # c5 amplifies that; both runs are as far from a float64 run (see the test above)
    for name in features:
        assert relative_difference(plain_features[name], features[name]) < 1e-4, name
    names = sorted(grads)
    assert relative_difference(torch.cat([plain_grads[n].flatten() for n in names]),
                               torch.cat([grads[n].flatten() for n in names])) < 1e-4
