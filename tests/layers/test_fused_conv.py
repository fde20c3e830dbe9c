"""Fused inference convs (detector/layers/fused_conv.py) against the eager blocks they replace."""
import copy

import pytest
import torch
from torch import nn

from detector.layers import (
    FrozenBatchNorm2d,
    fold_norm_into_conv,
    fused_conv_norm_act,
    fusion_enabled,
    conv_norm_fusion,
)
from detector.layers.fused_conv import _AVAILABLE

pytestmark = pytest.mark.skipif(not _AVAILABLE, reason="this torch build has no oneDNN fused conv")


def _random_stats(norm: nn.Module, generator: torch.Generator) -> nn.Module:
    c = norm.running_mean.numel()
    norm.weight.data = torch.rand(c, generator=generator) + 0.5
    norm.bias.data = torch.randn(c, generator=generator)
    norm.running_mean.data = torch.randn(c, generator=generator)
    norm.running_var.data = torch.rand(c, generator=generator) + 0.1
    return norm


def _case(norm_kind="frozen", stride=1, groups=1, kernel=3, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 16 if groups == 1 else 8, kernel, stride=stride, padding=kernel // 2,
                     groups=groups, bias=bias)
    channels = conv.out_channels
    norm = {"frozen": lambda: _random_stats(FrozenBatchNorm2d(channels), g),
            "bn": lambda: _random_stats(nn.BatchNorm2d(channels), g).eval(),
            "none": lambda: None}[norm_kind]()
    x = torch.randn(2, 8, 12, 10, generator=g).contiguous(memory_format=torch.channels_last)
    return conv, norm, x


def _eager(conv, norm, act, x, residual=None):
    y = conv(x)
    y = norm(y) if norm is not None else y
    y = y + residual if residual is not None else y
    return act(y) if act is not None else y


@pytest.mark.parametrize("norm_kind, act, stride, groups, kernel, bias", [
    ("frozen", nn.ReLU(), 1, 1, 3, False),
    ("frozen", None, 2, 1, 1, False),
    ("bn", nn.SiLU(), 1, 1, 3, False),
    ("bn", None, 1, 8, 3, False),      # depthwise
    ("none", nn.ReLU(), 1, 1, 3, True),
    ("none", None, 2, 1, 3, True),
])
def test_fused_equals_eager(norm_kind, act, stride, groups, kernel, bias):
    conv, norm, x = _case(norm_kind, stride, groups, kernel, bias)
    with torch.no_grad():
        expected = _eager(conv, norm, act, x)
        with conv_norm_fusion():
            fused = fused_conv_norm_act(x, conv, norm, act)
    assert fused is not None
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)


def test_residual_add_before_activation():
    conv, norm, x = _case("frozen", kernel=1)
    residual = torch.randn(2, 16, 12, 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), conv_norm_fusion():
        fused = fused_conv_norm_act(x, conv, norm, nn.ReLU(), residual=residual)
        expected = _eager(conv, norm, nn.ReLU(), x, residual)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)
    assert (fused == 0).any()  # the ReLU came after the add


def test_fold_is_the_affine_map_of_the_norm():
    conv, norm, x = _case("frozen", bias=True)
    weight, bias = fold_norm_into_conv(conv, norm)
    with torch.no_grad():
        torch.testing.assert_close(nn.functional.conv2d(x, weight, bias, padding=1),
                                   norm(conv(x)), rtol=1e-4, atol=1e-4)
    assert fold_norm_into_conv(conv, nn.GroupNorm(4, 16)) is None
    assert fold_norm_into_conv(conv, nn.BatchNorm2d(16).train()) is None


def test_not_applied_outside_its_context_or_for_other_norms():
    conv, norm, x = _case("frozen")
    with torch.no_grad():
        assert fused_conv_norm_act(x, conv, norm, nn.ReLU()) is None  # no context
        with conv_norm_fusion(False):
            assert not fusion_enabled()
        with conv_norm_fusion():
            assert fusion_enabled()
            assert fused_conv_norm_act(x, conv, nn.GroupNorm(4, 16), None) is None
            assert fused_conv_norm_act(x, conv, nn.BatchNorm2d(16).train(), None) is None
            assert fused_conv_norm_act(x, conv, norm, nn.LeakyReLU()) is None
            assert fused_conv_norm_act(x.double(), conv.double(), None, None) is None
            sn_conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(8, 16, 3, padding=1))
            assert fused_conv_norm_act(x.float(), sn_conv, None, None) is None
    assert not fusion_enabled()  # the context restored the previous state


def test_training_folds_with_autograd_and_keeps_the_gradients():
    conv, norm, x = _case("frozen", bias=True)
    x.requires_grad_(True)
    residual = torch.randn(2, 16, 12, 10, requires_grad=True)
    grads = []
    for fused in (False, True):
        for t in (x, residual, conv.weight, conv.bias):
            t.grad = None
        with conv_norm_fusion(fused):
            y = fused_conv_norm_act(x, conv, norm, nn.ReLU(), residual=residual)
        if not fused:
            assert y is None
            y = _eager(conv, norm, nn.ReLU(), x, residual)
        assert y.grad_fn is not None
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append([t.grad.clone() for t in (x, residual, conv.weight, conv.bias)])
    for eager_grad, fused_grad in zip(*grads):
        torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_frozen_block_on_an_input_without_grad_runs_fused_in_grad_mode():
    conv, norm, x = _case("frozen")
    conv.requires_grad_(False)
    with conv_norm_fusion():
        y = fused_conv_norm_act(x, conv, norm, nn.ReLU())
    assert y.grad_fn is None and not y.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(y, _eager(conv, norm, nn.ReLU(), x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_output_keeps_the_memory_format_of_the_input(memory_format):
    """As an eager conv: a frozen stem must not switch the trainable convs after it to another
    memory format than the model chose."""
    conv, norm, x = _case()
    x = x.contiguous(memory_format=memory_format)
    with conv_norm_fusion(True), torch.no_grad():
        y = fused_conv_norm_act(x, conv, norm, nn.ReLU())
    assert y.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(y, torch.relu(norm(conv(x))), rtol=1e-4, atol=1e-5)


def test_cached_weights_follow_parameter_updates():
    conv, norm, x = _case("frozen")
    with torch.no_grad(), conv_norm_fusion():
        before = fused_conv_norm_act(x, conv, norm, None)
        conv.weight.mul_(2.0)  # an optimizer step or load_state_dict changes weights in place
        after = fused_conv_norm_act(x, conv, norm, None)
        norm.running_var.mul_(4.0)
        again = fused_conv_norm_act(x, conv, norm, None)
        expected = _eager(conv, norm, None, x)
    shift = norm.bias - norm.running_mean * norm.weight / torch.sqrt(norm.running_var / 4.0)
    torch.testing.assert_close(after - shift.view(1, -1, 1, 1),
                               2 * (before - shift.view(1, -1, 1, 1)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-4)
    assert set(conv.state_dict()) == {"weight"}
    copy.deepcopy(conv)  # the cached oneDNN weights stay out of the module


def test_bf16_autocast_runs_in_bf16():
    conv, norm, x = _case("frozen")
    with torch.no_grad():
        expected = _eager(conv, norm, nn.ReLU(), x)
        with conv_norm_fusion(), torch.autocast("cpu", dtype=torch.bfloat16):
            fused = fused_conv_norm_act(x, conv, norm, nn.ReLU())
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), expected, rtol=3e-2, atol=3e-2)


def test_a_conv_shared_by_levels_keeps_one_folded_weight_per_norm(monkeypatch):
    from detector.layers import fused_conv

    conv, norm_a, x = _case("frozen", seed=0)
    norm_b = _case("frozen", seed=1)[1]
    folds = []
    real_fold = fused_conv.fold_norm_into_conv
    monkeypatch.setattr(fused_conv, "fold_norm_into_conv",
                        lambda *args: folds.append(1) or real_fold(*args))
    with torch.no_grad(), conv_norm_fusion():
        for _ in range(3):
            for norm in (norm_a, norm_b):
                torch.testing.assert_close(fused_conv_norm_act(x, conv, norm, None),
                                           _eager(conv, norm, None, x), rtol=1e-4, atol=1e-4)
    assert len(folds) == 2  # folded once per norm, then reused
