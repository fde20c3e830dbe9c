"""Norm layers against their formulas computed independently in numpy, the registry, converters."""
import numpy as np
import pytest
import torch
from torch import nn

from detector.layers import (
    NORM_REGISTRY,
    EvoNormB0,
    EvoNormS0,
    FrozenBatchNorm2d,
    NormSpec,
    SyncBatchNorm2d,
    available_norms,
    convert_frozen_batchnorm,
    convert_sync_batchnorm,
    get_norm,
    has_batch_statistics,
)

ALL_NAMES = ["BN", "EvoNormB0", "EvoNormS0", "FrozenBN", "GN", "SN", "SyncBN"]


def _randn(*shape, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float() * scale + shift


def _np(t):
    return t.detach().double().numpy()


def _channel(v):
    return v.reshape(1, -1, 1, 1)


def test_frozen_bn_matches_formula_in_train_and_eval():
    c, eps = 5, 1e-3
    layer = FrozenBatchNorm2d(c, eps=eps)
    weight, bias = _randn(c, seed=1), _randn(c, seed=2)
    mean, var = _randn(c, seed=3), _randn(c, seed=4).abs() + 0.5
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
    x = _randn(3, c, 4, 6, seed=5, scale=2.0, shift=1.0)
    expected = ((_np(x) - _channel(_np(mean))) / np.sqrt(_channel(_np(var)) + eps)
                * _channel(_np(weight)) + _channel(_np(bias)))
    for train in (True, False):
        layer.train(train)
        np.testing.assert_allclose(_np(layer(x)), expected, rtol=1e-5, atol=1e-5)
    # nothing to learn, nothing to update
    assert not list(layer.parameters())
    assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)


def _set_affine(layer, seed):
    with torch.no_grad():
        layer.weight.copy_(_randn(layer.num_features, seed=seed) * 0.5 + 1.0)
        layer.bias.copy_(_randn(layer.num_features, seed=seed + 1) * 0.5)
        if layer.v is not None:
            layer.v.copy_(_randn(layer.num_features, seed=seed + 2) * 0.5 + 1.0)


@pytest.mark.parametrize("activation", [True, False])
def test_evonorm_s0_matches_formula(activation):
    n, c, h, w, groups, eps = 2, 6, 3, 5, 3, 1e-3
    layer = EvoNormS0(c, groups=groups, eps=eps, activation=activation)
    _set_affine(layer, seed=10)
    x = _randn(n, c, h, w, seed=11, scale=3.0, shift=0.5)

    xs = _np(x)
    grouped = xs.reshape(n, groups, c // groups, h, w)
    group_var = grouped.var(axis=(2, 3, 4), keepdims=True)  # numpy var is the biased one
    group_std = np.broadcast_to(np.sqrt(group_var + eps), grouped.shape).reshape(n, c, h, w)
    if activation:
        numerator = xs / (1 + np.exp(-_channel(_np(layer.v)) * xs))  # x * sigmoid(v x)
    else:
        numerator = xs
    expected = numerator / group_std * _channel(_np(layer.weight)) + _channel(_np(layer.bias))

    for train in (True, False):  # per-sample statistics: no train/eval difference
        layer.train(train)
        np.testing.assert_allclose(_np(layer(x)), expected, rtol=1e-5, atol=1e-5)
    assert layer.applies_activation is activation


@pytest.mark.parametrize("activation", [True, False])
def test_evonorm_b0_matches_formula_in_train_and_eval(activation):
    n, c, h, w, eps, momentum = 3, 4, 5, 2, 1e-3, 0.2
    layer = EvoNormB0(c, momentum=momentum, eps=eps, activation=activation)
    _set_affine(layer, seed=20)
    gamma, beta = _channel(_np(layer.weight)), _channel(_np(layer.bias))
    v = _channel(_np(layer.v)) if activation else None

    def expected_output(xs, var):
        denominator = np.sqrt(_channel(var) + eps)
        if activation:
            instance_std = np.sqrt(xs.var(axis=(2, 3), keepdims=True) + eps)
            denominator = np.maximum(denominator, v * xs + instance_std)
        return xs / denominator * gamma + beta

    running_var = np.ones(c)
    layer.train()
    for step in range(3):
        x = _randn(n, c, h, w, seed=30 + step, scale=2.0 + step, shift=-0.5)
        xs = _np(x)
        batch_var = xs.var(axis=(0, 2, 3))
        np.testing.assert_allclose(_np(layer(x)), expected_output(xs, batch_var), rtol=1e-5,
                                   atol=1e-5)
        unbiased = batch_var * (n * h * w) / (n * h * w - 1)
        running_var = (1 - momentum) * running_var + momentum * unbiased
        np.testing.assert_allclose(_np(layer.running_var), running_var, rtol=1e-5)

    layer.eval()
    x = _randn(n, c, h, w, seed=40, scale=1.5)
    np.testing.assert_allclose(_np(layer(x)), expected_output(_np(x), running_var), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(_np(layer.running_var), running_var, rtol=1e-5)  # not updated

    # frozen (FREEZE_AT stages): running variance in training too, and no update
    convert_frozen_batchnorm(layer)
    layer.train()
    np.testing.assert_allclose(_np(layer(x)), expected_output(_np(x), running_var), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(_np(layer.running_var), running_var, rtol=1e-5)


def test_evonorm_gradients_flow_to_every_parameter():
    for layer in (EvoNormS0(4, groups=2), EvoNormB0(4)):
        x = _randn(2, 4, 3, 3, seed=50).requires_grad_()
        layer(x).square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_registry_builds_every_name_with_config_options():
    opts = dict(gn_groups=4, gn_eps=1e-6, bn_momentum=0.01, bn_eps=1e-3, evonorm_groups=2,
                evonorm_eps=1e-4)
    assert set(ALL_NAMES) <= set(name for name, _ in NORM_REGISTRY)
    assert available_norms()[-1] == '""' and set(ALL_NAMES) <= set(available_norms())
    bn = get_norm("BN", 8, **opts)
    assert type(bn) is nn.BatchNorm2d and bn.momentum == 0.01 and bn.eps == 1e-3
    sync = get_norm("SyncBN", 8, **opts)
    assert isinstance(sync, SyncBatchNorm2d) and sync.momentum == 0.01 and sync.eps == 1e-3
    frozen = get_norm("FrozenBN", 8, **opts)
    assert isinstance(frozen, FrozenBatchNorm2d) and frozen.eps == 1e-3
    gn = get_norm("GN", 8, **opts)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4 and gn.eps == 1e-6
    s0 = get_norm("EvoNormS0", 8, activation=True, **opts)
    assert isinstance(s0, EvoNormS0) and s0.groups == 2 and s0.eps == 1e-4 and s0.v is not None
    b0 = get_norm("EvoNormB0", 8, **opts)
    assert isinstance(b0, EvoNormB0) and b0.momentum == 0.01 and b0.eps == 1e-4 and b0.v is None
    assert get_norm("SN", 8, **opts) is None and get_norm("", 8, **opts) is None
    assert [has_batch_statistics(m) for m in (bn, sync, frozen, gn, s0, b0)] == [
        True, True, True, False, False, True]


def test_bad_norm_options_are_one_line_errors():
    with pytest.raises(ValueError) as e:
        get_norm("LayerNorm", 8)
    msg = str(e.value)
    assert "'LayerNorm'" in msg and "\n" not in msg
    assert all(name in msg for name in ALL_NAMES + ['""'])
    with pytest.raises(ValueError, match="MODEL.BACKBONE.NORM: unknown norm 'bn'"):
        NormSpec("bn", key="MODEL.BACKBONE.NORM")
    with pytest.raises(ValueError, match=r"MODEL.GN.NUM_GROUPS=32 does not divide 24 channels"):
        get_norm("GN", 24)
    with pytest.raises(ValueError,
                       match=r"MODEL.NECK.NORM='EvoNormS0': .*MODEL.EVONORM.NUM_GROUPS=5 does "
                             r"not divide 8 channels"):
        NormSpec("EvoNormS0", evonorm_groups=5, key="MODEL.NECK.NORM").layer(8)


def _bn_pair(c=3, momentum=0.3):
    bn = nn.BatchNorm2d(c, momentum=momentum, eps=1e-4)
    with torch.no_grad():
        bn.weight.copy_(_randn(c, seed=60) + 1)
        bn.bias.copy_(_randn(c, seed=61))
        bn.running_mean.copy_(_randn(c, seed=62))
        bn.running_var.copy_(_randn(c, seed=63).abs() + 0.5)
    return bn


def test_sync_bn_without_process_group_is_batchnorm():
    bn = _bn_pair()
    sync = convert_sync_batchnorm(nn.Sequential(_bn_pair()))[0]
    assert isinstance(sync, SyncBatchNorm2d)
    for step in range(2):
        x = _randn(4, 3, 5, 5, seed=70 + step, scale=2.0, shift=1.0)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = bn(x1), sync(x2)
        torch.testing.assert_close(y2, y1)
        (y1 * x).sum().backward()
        (y2 * x).sum().backward()
        torch.testing.assert_close(x2.grad, x1.grad)
        torch.testing.assert_close(sync.weight.grad, bn.weight.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(sync, name), getattr(bn, name))
    bn.eval()
    sync.eval()
    x = _randn(2, 3, 4, 4, seed=80)
    torch.testing.assert_close(sync(x), bn(x))
    with pytest.raises(ValueError, match=r"expects \(N, C, H, W\) input"):
        sync(torch.zeros(2, 3))


def test_convert_sync_batchnorm_copies_parameters_buffers_and_mode():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), _bn_pair(), nn.Sequential(_bn_pair(momentum=0.05)))
    model[1].num_batches_tracked.fill_(7)
    model[2][0].weight.requires_grad_(False)
    model[2].eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model)
    assert isinstance(converted[1], SyncBatchNorm2d) and isinstance(converted[2][0],
                                                                    SyncBatchNorm2d)
    assert converted[2][0].momentum == 0.05 and converted[1].eps == 1e-4
    assert converted.state_dict().keys() == reference.keys()
    for k, v in converted.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert converted[1].training and not converted[2][0].training
    assert not converted[2][0].weight.requires_grad and converted[2][0].bias.requires_grad
    # back to frozen: SyncBN is a BatchNorm to convert_frozen_batchnorm
    frozen = convert_frozen_batchnorm(converted)
    assert isinstance(frozen[1], FrozenBatchNorm2d)
    assert torch.equal(frozen[1].running_var, reference["1.running_var"])


def test_norm_spec_from_config_reads_every_norm_option():
    from detector.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.GN.NUM_GROUPS", "4", "MODEL.GN.EPS", "1e-3", "MODEL.BN.MOMENTUM",
                         "0.01", "MODEL.BN.EPS", "1e-4", "MODEL.EVONORM.NUM_GROUPS", "2",
                         "MODEL.EVONORM.EPS", "1e-6"])
    spec = NormSpec.from_config(cfg, "GN", key="MODEL.NECK.NORM")
    assert (spec.name, spec.key) == ("GN", "MODEL.NECK.NORM")
    assert (spec.gn_groups, spec.gn_eps, spec.bn_momentum, spec.bn_eps, spec.evonorm_groups,
            spec.evonorm_eps) == (4, 1e-3, 0.01, 1e-4, 2, 1e-6)
    gn = spec.layer(8)
    assert isinstance(gn, nn.GroupNorm) and (gn.num_groups, gn.eps) == (4, 1e-3)
