import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detector.layers import (
    ReusableBuffers,
    pointwise_conv_norm_act,
    pointwise_conv_norm_act_applies,
)

ACTIVATION_FUNCTIONS = {"silu": F.silu, "relu": F.relu, "identity": lambda t: t}


def _parameters(in_channels=5, out_channels=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv_weight": torch.randn(out_channels, in_channels, 1, 1, generator=g),
        "norm_weight": torch.rand(out_channels, generator=g) + 0.5,
        "norm_bias": torch.randn(out_channels, generator=g),
    }


def _input(seed=1, shape=(2, 5, 9, 10)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)


def _run(fn, x, params, grad_seed=2):
    """Output, running stats and gradients of one training step of ``fn``."""
    x = x.clone().requires_grad_(True)
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    channels = params["norm_weight"].shape[0]
    running_mean = torch.zeros(channels, dtype=x.dtype)
    running_var = torch.ones(channels, dtype=x.dtype)
    y = fn(x, params, running_mean, running_var)
    g = torch.Generator().manual_seed(grad_seed)
    y.backward(torch.randn(y.shape, generator=g, dtype=y.dtype))
    grads = {"x": x.grad, **{k: v.grad for k, v in params.items()}}
    return y.detach().clone(), running_mean, running_var, grads


def _reference(activation, padding, with_conv=True):
    def fn(x, p, running_mean, running_var):
        y = F.conv2d(x, p["conv_weight"]) if with_conv else x
        y = F.batch_norm(y, running_mean, running_var,
                         p["norm_weight"], p["norm_bias"], True, 0.1, 1e-3)
        y = ACTIVATION_FUNCTIONS[activation](y)
        top, bottom, left, right = padding
        return F.pad(y, (left, right, top, bottom))
    return fn


def _pooled(activation, padding, buffers, key="site", with_conv=True):
    def fn(x, p, running_mean, running_var):
        conv_weight = p["conv_weight"] if with_conv else None
        return pointwise_conv_norm_act(x, conv_weight, p["norm_weight"], p["norm_bias"],
                                       running_mean, running_var, 0.1, 1e-3, activation, buffers,
                                       key, padding)
    return fn


@pytest.mark.parametrize("activation", ["silu", "relu", "identity"])
@pytest.mark.parametrize("padding", [(0, 0, 0, 0), (0, 1, 0, 1), (1, 2, 2, 1)])
@pytest.mark.parametrize("in_channels", [5, 40, None])  # conv backward by oneDNN, by matmul; none
def test_equals_conv_batch_norm_activation(activation, padding, in_channels, bn_act_kernel):
    """Outputs (with a zero border), running statistics and all gradients equal those of
    conv2d (or none) + batch_norm + activation + pad, over two steps that reuse the pooled
    maps."""
    with_conv = in_channels is not None
    buffers = ReusableBuffers()
    params = _parameters(in_channels=in_channels or 6)
    x = _input(shape=(2, in_channels or 6, 9, 10))
    for step in range(2):
        expected = _run(_reference(activation, padding, with_conv), x, params, grad_seed=step)
        actual = _run(_pooled(activation, padding, buffers, with_conv=with_conv), x, params,
                      grad_seed=step)
        torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(actual[1], expected[1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(actual[2], expected[2], rtol=1e-6, atol=1e-6)
        for name in expected[3]:
            if expected[3][name] is None:  # the conv weight without a conv
                assert actual[3][name] is None
                continue
            torch.testing.assert_close(actual[3][name], expected[3][name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{name}: {m}")
    # the conv's map, the conv's input gradient with matmuls, the output map; the kernel adds
    # the norm's input gradient, PyTorch's ops the norm's output unless that is the output
    assert len(buffers) == with_conv + (in_channels == 40) + 1 + (
        True if bn_act_kernel == "fused" else activation != "identity" or any(padding))


@pytest.mark.parametrize("activation", ["silu", "relu", "identity"])
def test_constant_and_nan_channels_as_pytorch(activation, bn_act_kernel):
    """A constant channel (zero variance) and a NaN in another one give what PyTorch's modules
    give: the NaN spreads over its own channel only."""
    x = _input(shape=(2, 6, 9, 10))
    x[:, 1] = 3.0
    x[0, 2, 4, 5] = float("nan")
    params = _parameters(in_channels=6)
    expected = _run(_reference(activation, (0, 1, 0, 1), with_conv=False), x, params)
    actual = _run(_pooled(activation, (0, 1, 0, 1), ReusableBuffers(), with_conv=False), x,
                  params)
    assert actual[0][:, 2].isnan().any() and not actual[0][:, [0, 1, 3, 4, 5]].isnan().any()
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(actual[2], expected[2], rtol=1e-6, atol=1e-6, equal_nan=True)
    for name in ("x", "norm_weight", "norm_bias"):
        torch.testing.assert_close(actual[3][name], expected[3][name], rtol=1e-4, atol=1e-5,
                                   equal_nan=True, msg=lambda m: f"{name}: {m}")


def test_statistics_keep_their_digits_under_a_large_mean(bn_act_kernel):
    """Batch statistics of maps whose mean is 1000x their spread are as close to float64 ones
    as F.batch_norm's in float32."""
    x = _input(shape=(2, 6, 9, 10)) * 0.5 + 500.0
    params = _parameters(in_channels=6)
    ours = _run(_pooled("silu", (0, 0, 0, 0), ReusableBuffers(), with_conv=False), x, params)
    fp32 = _run(_reference("silu", (0, 0, 0, 0), with_conv=False), x, params)
    fp64 = _run(_reference("silu", (0, 0, 0, 0), with_conv=False), x.double(),
                {k: v.double() for k, v in params.items()})
    for i in range(3):  # output, running mean, running var
        ours_error = (ours[i].double() - fp64[i]).abs().max()
        fp32_error = (fp32[i].double() - fp64[i]).abs().max()
        assert ours_error <= 4 * fp32_error + 1e-6 * fp64[i].abs().max(), (i, ours_error,
                                                                          fp32_error)


def test_maps_reused_only_when_released(bn_act_kernel):
    """A released step's maps are reused; a graph still alive keeps its own, and both graphs
    then give the right gradients."""
    buffers = ReusableBuffers()
    params = {k: v.requires_grad_(True) for k, v in _parameters().items()}
    fn = _pooled("silu", (0, 1, 0, 1), buffers)
    stats = torch.zeros(6), torch.ones(6)

    y = fn(_input(), params, *stats)
    first_storage = y.untyped_storage().data_ptr()
    y.sum().backward()
    del y
    y = fn(_input(), params, *stats)
    assert y.untyped_storage().data_ptr() == first_storage

    # y's graph is alive: the next call must not write into its maps
    x_a, x_b = _input(seed=3).requires_grad_(True), _input(seed=4).requires_grad_(True)
    y_a = fn(x_a, params, *stats)
    y_b = fn(x_b, params, *stats)
    assert y_b.untyped_storage().data_ptr() != y_a.untyped_storage().data_ptr()
    (y_a * y_a).sum().backward()
    (y_b * y_b).sum().backward()
    for x_i, seed in ((x_a, 3), (x_b, 4)):
        x_ref = _input(seed=seed).requires_grad_(True)
        y_ref = _reference("silu", (0, 1, 0, 1))(x_ref, {k: v.detach() for k, v in params.items()},
                                                 torch.zeros(6), torch.ones(6))
        (y_ref * y_ref).sum().backward()
        torch.testing.assert_close(x_i.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


def test_buffers_start_empty_in_copies(bn_act_kernel):
    buffers = ReusableBuffers()
    params = _parameters()
    _pooled("relu", (0, 0, 0, 0), buffers)(_input(), params, None, None)
    # conv and output maps, and PyTorch's norm output
    assert len(buffers) == (2 if bn_act_kernel == "fused" else 3)
    assert len(copy.deepcopy(buffers)) == 0
    assert len(pickle.loads(pickle.dumps(buffers))) == 0
    buffers.clear()
    assert len(buffers) == 0


def test_applies_only_where_it_reproduces_the_modules():
    conv, norm, act = nn.Conv2d(5, 6, 1, bias=False), nn.BatchNorm2d(6).train(), nn.SiLU()
    x = _input()
    assert pointwise_conv_norm_act_applies(x, conv, norm, act)
    assert pointwise_conv_norm_act_applies(_input(shape=(2, 6, 9, 10)), None, norm, act)
    assert not pointwise_conv_norm_act_applies(x.contiguous(), conv, norm, act)
    assert not pointwise_conv_norm_act_applies(x.double(), conv, norm, act)
    assert not pointwise_conv_norm_act_applies(x, nn.Conv2d(5, 6, 1), norm, act)
    assert not pointwise_conv_norm_act_applies(x, nn.Conv2d(5, 6, 1, 2, bias=False), norm, act)
    assert not pointwise_conv_norm_act_applies(x, nn.Conv2d(5, 6, 3, bias=False), norm, act)
    assert not pointwise_conv_norm_act_applies(x, conv, copy.deepcopy(norm).eval(), act)
    assert not pointwise_conv_norm_act_applies(x, conv, nn.BatchNorm2d(6, affine=False), act)
    assert not pointwise_conv_norm_act_applies(x, conv, norm, nn.GELU())
    with torch.no_grad():
        assert not pointwise_conv_norm_act_applies(x, conv, norm, act)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not pointwise_conv_norm_act_applies(x, conv, norm, act)
    with pytest.raises(ValueError, match="activation 'gelu'"):
        pointwise_conv_norm_act(x, conv.weight, norm.weight, norm.bias, None, None, 0.1, 1e-5,
                                "gelu", ReusableBuffers(), "site")
