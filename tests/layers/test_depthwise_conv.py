import pytest
import torch
from torch import nn

from detector.layers import (
    DepthwiseConv2d,
    depthwise_conv2d,
    depthwise_weight_grad,
    split_depthwise_weight_gradients,
)


def _reference_weight_grad(grad_output, x, weight, stride, padding):
    return torch.ops.aten.convolution_backward(
        grad_output, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0],
        x.shape[1], [False, True, False])[1]


@pytest.mark.parametrize("kernel_size,stride,padding", [
    ((5, 5), (1, 1), (2, 2)), ((5, 5), (2, 2), (2, 2)), ((7, 7), (1, 1), (3, 3)),
    ((4, 6), (1, 2), (1, 0)), ((3, 5), (2, 1), (0, 2)), ((5, 5), (1, 1), (0, 0))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_grad_equals_direct_gradient(kernel_size, stride, padding, channels_last):
    torch.manual_seed(0)
    channels = 6
    x = torch.randn(3, channels, 13, 17)
    weight = torch.randn(channels, 1, *kernel_size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    y = nn.functional.conv2d(x, weight, None, stride, padding, 1, channels)
    grad_output = torch.randn_like(y)
    expected = _reference_weight_grad(grad_output, x, weight, stride, padding)
    got = depthwise_weight_grad(grad_output, x, kernel_size, stride, padding)
    assert got.shape == expected.shape
    # sums of ~600 products in another order: float32 rounding relative to the largest entry
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def _run(module, x, grad_output):
    x = x.detach().requires_grad_(True)
    y = module(x)
    y.backward(grad_output)
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return y.detach(), grads


@pytest.mark.parametrize("bias", [False, True])
def test_module_matches_nn_conv(bias):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=bias)
    fast = DepthwiseConv2d.from_conv(conv)
    assert fast.weight is conv.weight and list(fast.state_dict()) == list(conv.state_dict())
    x = torch.randn(2, 8, 16, 12).contiguous(memory_format=torch.channels_last)
    grad_output = torch.randn(2, 8, 16, 12)
    y_ref, grads_ref = _run(conv, x, grad_output)
    y, grads = _run(fast, x, grad_output)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert len(grads) == len(grads_ref) == (3 if bias else 2)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_module_under_bf16_autocast_matches_nn_conv():
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=True)
    fast = DepthwiseConv2d.from_conv(conv)
    x = torch.randn(2, 8, 16, 16)
    grad_output = torch.randn(2, 8, 16, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, grads_ref = _run(conv, x, grad_output)
        y, grads = _run(fast, x, grad_output)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == g_ref.dtype
        torch.testing.assert_close(g.float(), g_ref.float(), rtol=2e-2, atol=2e-2)


def test_without_gradients_it_is_a_plain_conv():
    torch.manual_seed(3)
    x, weight = torch.randn(1, 4, 9, 9), torch.randn(4, 1, 5, 5, requires_grad=True)
    with torch.no_grad():
        y = depthwise_conv2d(x, weight, None, (1, 1), (2, 2))
        assert torch.equal(y, nn.functional.conv2d(x, weight, None, 1, 2, 1, 4))


def test_double_backward_is_refused():
    x = torch.randn(1, 4, 9, 9, requires_grad=True)
    weight = torch.randn(4, 1, 5, 5, requires_grad=True)
    y = depthwise_conv2d(x, weight, None, (1, 1), (2, 2))
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 8, 5, groups=4), nn.Conv2d(4, 4, 5, dilation=2,
                                                                          groups=4),
                                  nn.Conv2d(4, 4, 5, padding="same", groups=4)])
def test_from_conv_refuses_other_convs(conv):
    assert not DepthwiseConv2d.convertible(conv)
    with pytest.raises(ValueError, match="DepthwiseConv2d.from_conv"):
        DepthwiseConv2d.from_conv(conv)


def test_split_depthwise_weight_gradients_converts_only_large_depthwise_convs():
    model = nn.Sequential(nn.Conv2d(4, 4, 5, padding=2, groups=4, bias=False),  # converted
                          nn.Conv2d(4, 4, 5, stride=2, padding=2, groups=4),  # converted
                          nn.Conv2d(4, 4, 3, padding=1, groups=4),  # 3x3: kept
                          nn.Conv2d(4, 8, 5, padding=2, groups=4))  # not depthwise: kept
    keys = list(model.state_dict())
    first_weight = model[0].weight
    model = split_depthwise_weight_gradients(model)
    assert [type(m) for m in model] == [DepthwiseConv2d, DepthwiseConv2d, nn.Conv2d, nn.Conv2d]
    assert model[0].weight is first_weight and list(model.state_dict()) == keys
