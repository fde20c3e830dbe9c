import pytest
import torch
import torch.nn.functional as F

from detector.layers import squeeze_excite, squeeze_excite_applies


def _reference(x, reduce_weight, reduce_bias, expand_weight, expand_bias):
    gate = torch.sigmoid(F.linear(F.silu(F.linear(x.mean((2, 3)), reduce_weight, reduce_bias)),
                                  expand_weight, expand_bias))
    return x * gate[:, :, None, None]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squeeze_excite_equals_autograd(channels_last, dtype):
    """Output and the gradients of the map and of all four MLP parameters equal those of the
    same ops through autograd."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 7, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = [torch.randn(3, 6, generator=g, dtype=dtype), torch.randn(3, generator=g, dtype=dtype),
              torch.randn(6, 3, generator=g, dtype=dtype), torch.randn(6, generator=g, dtype=dtype)]
    grad = torch.randn(x.shape, generator=g, dtype=dtype)
    results = []
    for fn in (_reference, squeeze_excite):
        inputs = [t.detach().clone().requires_grad_(True) for t in [x] + params]
        y = fn(*inputs)
        y.backward(grad)
        results.append([y.detach()] + [t.grad for t in inputs])
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    for name, actual, expected in zip(["output", "x", "reduce_weight", "reduce_bias",
                                       "expand_weight", "expand_bias"], *results[::-1]):
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{name}: {m}", **tolerance)


def test_squeeze_excite_applies_to_cpu_fp32_training_only():
    x = torch.randn(2, 4, 3, 3)
    assert squeeze_excite_applies(x)
    assert not squeeze_excite_applies(x.half())
    with torch.no_grad():
        assert not squeeze_excite_applies(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not squeeze_excite_applies(x)
