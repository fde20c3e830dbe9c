"""ConvNormAct / conv_norm_act: bias, SN, EvoNorm activation skipping, caller-owned norms."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from detector.layers import (
    ConvNormAct,
    EvoNormB0,
    EvoNormS0,
    NormSpec,
    SyncBatchNorm2d,
    conv_norm_act,
)


def _x(seed=0, shape=(2, 4, 6, 6)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,norm_type,has_bias", [
    ("", None, True), ("SN", None, True), ("BN", nn.BatchNorm2d, False),
    ("GN", nn.GroupNorm, False), ("SyncBN", SyncBatchNorm2d, False),
])
def test_layout_and_bias(name, norm_type, has_bias):
    block = ConvNormAct(4, 8, 3, norm=NormSpec(name, gn_groups=4))
    assert (block.conv.bias is not None) == has_bias
    if norm_type is None:
        assert block.norm is None and len(block) == 2
    else:
        assert isinstance(block[1], norm_type) and block.norm is block[1] and len(block) == 3
    assert isinstance(block[-1], nn.ReLU)
    assert block(_x()).shape == (2, 8, 6, 6)  # "same" padding by default
    assert parametrize.is_parametrized(block.conv, "weight") == (name == "SN")


def test_spectral_norm_is_applied_after_the_weight_init():
    # a weight whose top singular value (4) stands far above the next (1): the power iteration
    # converges within the iterations spectral_norm runs at registration, from any start
    g = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    right, _ = torch.linalg.qr(torch.randn(36, 8, generator=g))
    singular_values = torch.tensor([4.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    target = (left * singular_values @ right.T).reshape(8, 4, 3, 3)
    block = ConvNormAct(4, 8, 3, norm="SN", activation=None,
                        weight_init=lambda w: w.data.copy_(target))
    original = block.conv.parametrizations.weight.original
    torch.testing.assert_close(original, target)
    assert torch.count_nonzero(block.conv.bias) == 0  # weight_init also zeroes the bias
    torch.testing.assert_close(torch.linalg.matrix_norm(target.reshape(8, -1), ord=2),
                               torch.tensor(4.0))
    torch.testing.assert_close(block.conv.weight, target / 4.0, rtol=1e-4, atol=1e-5)
    block(_x()).sum().backward()
    assert original.grad is not None and original.grad.abs().sum() > 0


@pytest.mark.parametrize("name,layer_type", [("EvoNormS0", EvoNormS0), ("EvoNormB0", EvoNormB0)])
def test_evonorm_replaces_norm_and_activation(name, layer_type):
    spec = NormSpec(name, evonorm_groups=2)
    with_act = ConvNormAct(4, 8, 3, norm=spec)
    assert len(with_act) == 2 and isinstance(with_act[1], layer_type)
    assert with_act[1].applies_activation and not any(isinstance(m, nn.ReLU) for m in with_act)
    x = _x()
    torch.testing.assert_close(with_act(x), with_act[1](with_act.conv(x)))
    # negative outputs survive: no ReLU after the EvoNorm
    assert (with_act(x) < 0).any()

    no_act = ConvNormAct(4, 8, 3, norm=spec, activation=None)
    assert len(no_act) == 2 and not no_act[1].applies_activation and no_act[1].v is None

    conv, norm, act = conv_norm_act(4, 8, 1, norm=spec, activation=nn.SiLU)
    assert act is None and norm.applies_activation and conv.bias is None


def test_caller_owned_norms():
    block = ConvNormAct(4, 8, 3, norm=NormSpec("BN"), build_norm=False)
    assert block.norm is None and block.conv.bias is None and len(block) == 2
    norms = [block.make_norm() for _ in range(2)]
    assert norms[0] is not norms[1] and all(isinstance(n, nn.BatchNorm2d) for n in norms)
    x = _x()
    torch.testing.assert_close(block(x, norms[1]), torch.relu(norms[1](block.conv(x))))
    with pytest.raises(ValueError, match="pass the caller-owned norm"):
        block(x)
    with pytest.raises(ValueError, match="holds its own norm layer"):
        ConvNormAct(4, 8, 3, norm="BN")(x, norms[0])
