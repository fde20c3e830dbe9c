"""Parameter groups, optimizer choice and gradient clipping from the SOLVER config."""
import pytest
import torch
from torch import nn

from detector.config import get_cfg
from detector.layers import FrozenBatchNorm2d
from detector.solver import build_gradient_clipper, build_optimizer, get_default_optimizer_params


class EvoNormLike(nn.Module):
    """A norm class unknown to the solver; recognised by "Norm" in its class name."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.v = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x * self.weight[:, None, None] * torch.sigmoid(self.v[:, None, None] * x)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.evo = EvoNormLike(4)
        self.frozen = FrozenBatchNorm2d(4)
        self.frozen_conv = nn.Conv2d(4, 4, 1)
        self.frozen_conv.requires_grad_(False)
        self.head = nn.Linear(4, 2)
        self.tied = self.head  # same module under two names: shared parameters


def _cfg(**solver):
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 0.1
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_BIAS = 1e-5
    cfg.SOLVER.BIAS_LR_FACTOR = 2.0
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def _group_of(groups, param):
    hits = [g for g in groups if any(p is param for p in g["params"])]
    assert len(hits) == 1, "every parameter must be in exactly one group"
    return hits[0]


def test_norm_bias_and_weight_groups():
    model = TinyNet()
    groups = get_default_optimizer_params(
        model, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0, weight_decay_bias=1e-5,
        bias_lr_factor=2.0,
    )
    for norm in (model.bn, model.gn, model.ln):
        for p in (norm.weight, norm.bias):
            g = _group_of(groups, p)
            assert (g["lr"], g["weight_decay"]) == (0.1, 0.0)
    for p in (model.evo.weight, model.evo.v):
        assert _group_of(groups, p)["weight_decay"] == 0.0
    for bias in (model.conv.bias, model.head.bias):
        g = _group_of(groups, bias)
        assert (g["lr"], g["weight_decay"]) == (0.2, 1e-5)
    for weight in (model.conv.weight, model.head.weight):
        g = _group_of(groups, weight)
        assert (g["lr"], g["weight_decay"]) == (0.1, 1e-4)
    # equal hyper-parameters are merged: norm / bias / weight
    assert len(groups) == 3


def test_frozen_excluded_and_shared_deduplicated():
    model = TinyNet()
    groups = get_default_optimizer_params(
        model, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0, weight_decay_bias=0.0,
    )
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed})
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in listed} == trainable
    listed_ids = {id(p) for p in listed}
    assert not any(id(p) in listed_ids for p in model.frozen_conv.parameters())
    assert not list(model.frozen.parameters())  # FrozenBN only has buffers


def test_build_sgd_and_adamw():
    model = TinyNet()
    sgd = build_optimizer(_cfg(MOMENTUM=0.8, NESTEROV=True), model)
    assert isinstance(sgd, torch.optim.SGD)
    assert all(g["momentum"] == 0.8 and g["nesterov"] for g in sgd.param_groups)
    assert sorted({g["weight_decay"] for g in sgd.param_groups}) == [0.0, 1e-5, 1e-4]
    adamw = build_optimizer(_cfg(OPTIMIZER="AdamW"), model)
    assert isinstance(adamw, torch.optim.AdamW)
    assert {g["lr"] for g in adamw.param_groups} == {0.1, 0.2}


def test_unknown_optimizer_is_one_line_error():
    with pytest.raises(ValueError) as err:
        build_optimizer(_cfg(OPTIMIZER="Adam"), TinyNet())
    msg = str(err.value)
    assert "\n" not in msg and "SOLVER.OPTIMIZER" in msg and "SGD" in msg and "AdamW" in msg


def _linear_with_grad(value):
    layer = nn.Linear(4, 1, bias=False)
    layer.weight.grad = torch.full_like(layer.weight, value)
    return layer


def test_gradient_clipping_norm_and_value():
    cfg = get_cfg()
    assert build_gradient_clipper(cfg) is None
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    clip = build_gradient_clipper(cfg)
    layer = _linear_with_grad(3.0)  # grad norm sqrt(4 * 9) = 6
    total = clip(layer.parameters())
    assert float(total) == pytest.approx(6.0)
    assert float(layer.weight.grad.norm()) == pytest.approx(1.0, rel=1e-4)

    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    clip = build_gradient_clipper(cfg)
    layer = _linear_with_grad(-3.0)
    clip(layer.parameters())
    assert torch.equal(layer.weight.grad, torch.full_like(layer.weight, -0.5))

    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    with pytest.raises(ValueError, match="CLIP_TYPE 'full_model'"):
        build_gradient_clipper(cfg)
