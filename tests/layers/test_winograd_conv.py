"""Winograd F(2x2, 3x3) convolution: outputs and gradients of F.conv2d (+ ReLU) within the float
rounding of the direct convolution, where it applies and where it does not."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpu_kernel_switch import use_cpu_kernel
from detector.layers import fused_conv, winograd_conv
from detector.layers import (
    ConvNormAct,
    conv_norm_fusion,
    fused_conv_norm_act,
    winograd_applies,
    winograd_conv3x3,
    winograd_convolution,
)

KERNEL = "winograd_f2x3"


@pytest.fixture
def kernel(monkeypatch):
    use_cpu_kernel(monkeypatch, KERNEL, True)


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def _case(n, c, k, h, w, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(k, c, 3, 3, generator=g, dtype=torch.float64) / (3 * c ** 0.5)
    b = torch.randn(k, generator=g, dtype=torch.float64) if bias else None
    return x, weight, b


def _run(fn, x, weight, bias, relu, grad_y):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    bias = None if bias is None else bias.clone().requires_grad_()
    y = fn(x, weight, bias, relu)
    y.backward(grad_y.to(y.dtype))
    grads = [x.grad, weight.grad] + ([] if bias is None else [bias.grad])
    return [y.detach()] + grads


def _direct(x, weight, bias, relu):
    y = F.conv2d(x, weight, bias, padding=1)
    return F.relu(y) if relu else y


def _winograd(x, weight, bias, relu):
    return winograd_conv3x3(x, weight, bias, relu)


# odd sizes (partial tiles), 1x1 maps, batches, biasless convs, and several tile-row blocks
@pytest.mark.parametrize("n,c,k,h,w,bias,relu,block_bytes", [
    (2, 8, 5, 7, 9, True, True, None),
    (1, 3, 4, 1, 1, False, False, None),
    (3, 16, 24, 6, 11, True, False, 1),
    (2, 64, 64, 13, 10, True, True, 20000),
    (1, 5, 7, 2, 3, False, True, None),
])
def test_matches_direct_convolution_within_its_rounding(n, c, k, h, w, bias, relu, block_bytes,
                                                        kernel, monkeypatch):
    if block_bytes is not None:
        monkeypatch.setattr(winograd_conv, "_BLOCK_BYTES", block_bytes)
    x, weight, b = _case(n, c, k, h, w, bias=bias)
    grad_y = torch.randn(n, k, h, w, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    exact = _run(_direct, x, weight, b, relu, grad_y)
    as_float = [_channels_last(x.float()), weight.float(), None if b is None else b.float()]
    direct = _run(_direct, *as_float, relu, grad_y)
    ours = _run(_winograd, *as_float, relu, grad_y)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    for name, e, d, o in zip(["output", "grad x", "grad weight", "grad bias"], exact, direct,
                             ours):
        assert o.shape == e.shape and o.dtype == torch.float32, name
        scale = e.abs().max().item()
        direct_error = (d.double() - e).abs().max().item()
        our_error = (o.double() - e).abs().max().item()
        # Winograd adds a few roundings per sum: the same order as the direct conv's
        assert our_error <= max(4 * direct_error, 1e-6 * scale), (name, our_error, direct_error)


def test_relu_passes_nan_and_its_gradient_as_pytorch(kernel):
    x, weight, b = _case(1, 4, 4, 4, 4)
    x[0, :, 1, 1] = float("nan")
    as_float = [_channels_last(x.float()), weight.float(), b.float()]
    grad_y = torch.ones(1, 4, 4, 4)
    direct = _run(_direct, *as_float, True, grad_y)
    ours = _run(_winograd, *as_float, True, grad_y)
    assert torch.equal(ours[0].isnan(), direct[0].isnan()) and ours[0].isnan().any()
    # F.relu's backward passes the gradient where its output is NaN
    assert torch.equal(ours[1].isnan(), direct[1].isnan())


def test_weight_changes_are_seen(kernel):
    x, weight, b = _case(1, 8, 8, 6, 6)
    x, weight, b = _channels_last(x.float()), weight.float(), b.float()
    first = winograd_conv3x3(x, weight, b)
    with torch.no_grad():
        weight.mul_(2)  # an optimizer step: the cached transform must not be reused
    second = winograd_conv3x3(x, weight, b)
    torch.testing.assert_close(second - b.view(1, -1, 1, 1), 2 * (first - b.view(1, -1, 1, 1)))


def test_applies_only_where_it_pays(kernel):
    conv = nn.Conv2d(64, 64, 3, padding=1)
    big = _channels_last(torch.randn(2, 64, 64, 32))  # 2 x 32 x 16 = 1024 tiles
    assert not winograd_applies(big, conv)  # outside winograd_convolution
    with winograd_convolution():
        assert winograd_applies(big, conv)
        assert not winograd_applies(big.contiguous(), conv)  # NCHW
        assert not winograd_applies(big.double(), conv.double())
        assert not winograd_applies(big[:, :, :16, :16], conv)  # 128 tiles: direct
        assert not winograd_applies(_channels_last(torch.randn(2, 32, 64, 32)),
                                    nn.Conv2d(32, 64, 3, padding=1))
        for other in (nn.Conv2d(64, 64, 3, padding=1, stride=2),
                      nn.Conv2d(64, 64, 3, padding=2, dilation=2),
                      nn.Conv2d(64, 64, 3, padding=1, groups=2),
                      nn.Conv2d(64, 64, 1), nn.Conv2d(64, 64, 3, padding=1,
                                                      padding_mode="reflect")):
            assert not winograd_applies(big, other)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not winograd_applies(big, conv)
        with winograd_convolution(False):
            assert not winograd_applies(big, conv)


def test_not_without_the_kernel(monkeypatch):
    use_cpu_kernel(monkeypatch, KERNEL, False)
    with winograd_convolution():
        assert not winograd_applies(_channels_last(torch.randn(2, 64, 64, 32)),
                                    nn.Conv2d(64, 64, 3, padding=1))


@pytest.mark.parametrize("grad", [False, True])
def test_fused_block_runs_it_for_a_frozen_norm(grad, kernel, monkeypatch):
    calls = []
    monkeypatch.setattr(fused_conv, "winograd_conv3x3",
                        lambda *a, **k: calls.append(1) or winograd_conv3x3(*a, **k))
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    norm = nn.BatchNorm2d(64).eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    x = _channels_last(torch.randn(2, 64, 40, 40)).requires_grad_(grad)
    expected = torch.relu(norm(conv(x)))
    with conv_norm_fusion(), winograd_convolution():
        y = fused_conv_norm_act(x, conv, norm, nn.ReLU())
    assert calls == [1]
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    if grad:
        g = torch.randn_like(expected)
        expected_grads = torch.autograd.grad(expected, (x, conv.weight), g)
        for ours, ref in zip(torch.autograd.grad(y, (x, conv.weight), g), expected_grads):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["GN", "BN", ""])
def test_conv_norm_act_blocks_run_it_before_their_norm(norm, kernel, monkeypatch):
    """Blocks whose norm is not folded (GN, BN in training) and blocks without a norm."""
    calls = []
    monkeypatch.setattr(winograd_conv, "winograd_conv3x3",
                        lambda *a, **k: calls.append(1) or winograd_conv3x3(*a, **k))
    torch.manual_seed(0)
    block = ConvNormAct(64, 64, 3, norm=norm).train().to(memory_format=torch.channels_last)
    x = _channels_last(torch.randn(2, 64, 40, 40)).requires_grad_()
    g = torch.randn(2, 64, 40, 40)
    results = []
    for enabled in (False, True):
        with winograd_convolution(enabled):
            y = block(x)
        results.append((y, *torch.autograd.grad(y, (x, block.conv.weight), g)))
    assert calls == [1]
    for ours, direct in zip(results[1], results[0]):
        # a batch norm's backward amplifies rounding where a channel's spread is small
        torch.testing.assert_close(ours, direct, rtol=1e-3, atol=1e-5 * direct.abs().max().item())
    hook = block.conv.register_forward_hook(lambda *args: None)
    with winograd_convolution():
        block(x)
    assert calls == [1]  # a hook on the conv gets its call
    hook.remove()


def test_refuses_what_it_cannot_compute(kernel):
    x = _channels_last(torch.randn(1, 4, 6, 6))
    with pytest.raises(ValueError, match="float32 CPU"):
        winograd_conv3x3(x.double(), torch.randn(4, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(K, C, 3, 3\) weight"):
        winograd_conv3x3(x, torch.randn(4, 4, 5, 5))
    weight = torch.randn(4, 4, 3, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(winograd_conv3x3(x, weight).sum(), weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()
