"""ResNet-18/34/50/101 backbone (torchvision's architecture, v1.5: stride on the 3x3 conv).

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``, ``downsample.0/1``),
so a torchvision ImageNet checkpoint loads after prefixing ``backbone.`` and dropping ``fc``.
The blocks are built with :func:`detector.layers.conv_norm_act`, so every norm option applies:
with EvoNorm the norm-activation layers replace norm + ReLU (the ReLU after the residual sum
stays), with "SN" every conv is spectral-normalized and ``bn*`` are identities.
"""
from functools import partial
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from detector.layers import (
    NormSpec,
    as_norm_spec,
    conv_norm_act,
    convert_frozen_batchnorm,
    fused_conv_norm_act,
    fusion_enabled,
)

from .base import Backbone, check_out_features
from .build import BACKBONE_REGISTRY

__all__ = ["ResNetBackbone", "ResNet", "BasicBlock", "Bottleneck", "freeze_module"]

# torchvision's init of every conv (norm layers keep weight 1, bias 0)
kaiming_fan_out_ = partial(nn.init.kaiming_normal_, mode="fan_out", nonlinearity="relu")


def _parts(in_channels, out_channels, kernel_size, stride, norm, activation=True):
    """(conv, norm or Identity, activation or Identity) of one conv block of a ResNet."""
    conv, norm_layer, act = conv_norm_act(
        in_channels, out_channels, kernel_size, stride=stride, norm=norm,
        activation=partial(nn.ReLU, inplace=True) if activation else None,
        weight_init=kaiming_fan_out_)
    return conv, norm_layer or nn.Identity(), act or nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm(-ReLU) with a residual, then ReLU (ResNet-18/34, TinyNet)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, *, stride: int = 1, norm: NormSpec,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1, self.bn1, self.act1 = _parts(in_channels, channels, 3, stride, norm)
        self.conv2, self.bn2, _ = _parts(channels, channels, 3, 1, norm, activation=False)
        self.downsample = downsample
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fusion_enabled():
            fused = _fused_block(x, self.downsample, [(self.conv1, self.bn1, self.act1),
                                                      (self.conv2, self.bn2, self.relu)])
            if fused is not None:
                return fused
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place: saves a feature-map allocation per block
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4) with a residual, then ReLU (ResNet-50/101).
    ``stride_in_1x1`` moves the stride to the first 1x1 conv (MSRA/caffe ResNets)."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, *, stride: int = 1, norm: NormSpec,
                 downsample: Optional[nn.Module] = None, stride_in_1x1: bool = False):
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1, self.bn1, self.act1 = _parts(in_channels, channels, 1, stride_1x1, norm)
        self.conv2, self.bn2, self.act2 = _parts(channels, channels, 3, stride_3x3, norm)
        self.conv3, self.bn3, _ = _parts(channels, channels * 4, 1, 1, norm, activation=False)
        self.downsample = downsample
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fusion_enabled():
            fused = _fused_block(x, self.downsample, [(self.conv1, self.bn1, self.act1),
                                                      (self.conv2, self.bn2, self.act2),
                                                      (self.conv3, self.bn3, self.relu)])
            if fused is not None:
                return fused
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def _fused_block(x: torch.Tensor, downsample: Optional[nn.Module], layers):
    """A residual block as fused convs (see :mod:`detector.layers.fused_conv`): ``layers`` are
    its (conv, norm, activation) in order, the last one's activation applied after the residual
    add. None when any conv cannot be fused; nothing has then been computed in vain but the
    shortcut."""
    identity = x
    if downsample is not None:
        identity = fused_conv_norm_act(x, downsample[0], downsample[1] if len(downsample) > 1
                                       else None)
        if identity is None:
            return None
    out = x
    for k, (conv, norm, act) in enumerate(layers):
        last = k == len(layers) - 1
        out = fused_conv_norm_act(out, conv, norm, act, residual=identity if last else None)
        if out is None:
            return None
    return out


def downsample_block(in_channels: int, out_channels: int, stride: int,
                     norm: NormSpec) -> nn.Sequential:
    """The shortcut projection: 1x1 strided conv + norm as ``Sequential`` (keys ``0``, ``1``)."""
    conv, norm_layer, _ = conv_norm_act(in_channels, out_channels, 1, stride=stride, norm=norm,
                                        activation=None, weight_init=kaiming_fan_out_)
    return nn.Sequential(conv, norm_layer) if norm_layer is not None else nn.Sequential(conv)


def make_stage(block, in_channels: int, channels: int, num_blocks: int, stride: int,
               norm: NormSpec, **block_kwargs) -> nn.Sequential:
    """``num_blocks`` blocks; the first one strides and projects the shortcut when needed."""
    out_channels = channels * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = downsample_block(in_channels, out_channels, stride, norm)
    blocks = [block(in_channels, channels, stride=stride, norm=norm, downsample=downsample,
                    **block_kwargs)]
    blocks += [block(out_channels, channels, norm=norm, **block_kwargs)
               for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def freeze_module(module: nn.Module) -> nn.Module:
    """Stop gradients to ``module``; its BatchNorms become FrozenBatchNorm2d, its EvoNormB0
    layers use their running variance and its spectral norms stop their power iteration, so the
    module's function stops changing in training mode too."""
    for p in module.parameters():
        p.requires_grad_(False)
    for m in module.modules():
        if parametrize.is_parametrized(m, "weight"):
            for parametrization in m.parametrizations.weight:
                if hasattr(parametrization, "n_power_iterations"):
                    parametrization.n_power_iterations = 0
    return convert_frozen_batchnorm(module)


_DEPTHS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
           50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3])}
# stage name per output level: c2 = layer1 (stride 4) ... c5 = layer4 (stride 32)
_STAGE_OF_LEVEL = {2: "layer1", 3: "layer2", 4: "layer3", 5: "layer4"}


class ResNetBackbone(Backbone):
    """ResNet trunk (no avgpool/fc) returning ``c2``..``c5``.

    Args:
        depth: 18, 34, 50 or 101.
        norm: norm of every conv, a :class:`detector.layers.NormSpec` (or a name, see
            :func:`detector.layers.available_norms`).
        out_features: subset of ``c2``..``c5`` to return; stages above the highest are not built.
        freeze_at: 0 trains everything, 1 freezes the stem, k freezes the stem and ``c2``..``c<k>``.
        stride_in_1x1: bottlenecks stride in their first 1x1 conv (MSRA/caffe weights, e.g.
            detectron2's R-50.pkl) instead of the 3x3 (torchvision).
    """

    def __init__(self, *, depth: int = 50, norm="FrozenBN",
                 out_features: List[str] = ("c3", "c4", "c5"), freeze_at: int = 0,
                 stride_in_1x1: bool = False):
        super().__init__()
        if depth not in _DEPTHS:
            raise ValueError(f"MODEL.RESNETS.DEPTH={depth} is not supported; choose from "
                             f"{sorted(_DEPTHS)}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT={freeze_at} must be in [0, 5]")
        self.out_features = check_out_features(out_features, ["c2", "c3", "c4", "c5"])
        spec = as_norm_spec(norm, "MODEL.BACKBONE.NORM")
        block, num_blocks = _DEPTHS[depth]
        if stride_in_1x1 and block is not Bottleneck:
            raise ValueError(f"MODEL.RESNETS.STRIDE_IN_1X1 needs bottleneck blocks (depth >= 50), "
                             f"got depth {depth}")
        block_kwargs = {"stride_in_1x1": True} if stride_in_1x1 else {}

        self.conv1, self.bn1, self.relu = _parts(3, 64, 7, 2, spec)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        top_level = int(self.out_features[-1][1:])
        self.stage_names = [_STAGE_OF_LEVEL[k] for k in range(2, top_level + 1)]
        in_channels = 64
        for i, (level, name) in enumerate(zip(range(2, top_level + 1), self.stage_names)):
            channels = 64 * 2 ** i
            self.add_module(name, make_stage(block, in_channels, channels, num_blocks[i],
                                             stride=1 if i == 0 else 2, norm=spec,
                                             **block_kwargs))
            in_channels = channels * block.expansion
            self._out_feature_channels[f"c{level}"] = in_channels
            self._out_feature_strides[f"c{level}"] = 2 ** level
        self._freeze(freeze_at)

    def _freeze(self, freeze_at: int) -> None:
        if freeze_at >= 1:
            self.conv1 = freeze_module(self.conv1)
            self.bn1 = freeze_module(self.bn1)
        for level in range(2, freeze_at + 1):
            name = _STAGE_OF_LEVEL[level]
            if name in self.stage_names:
                setattr(self, name, freeze_module(getattr(self, name)))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        stem = fused_conv_norm_act(x, self.conv1, self.bn1, self.relu)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))) if stem is None else stem)
        outputs = {}
        for level, name in zip(range(2, 6), self.stage_names):
            x = getattr(self, name)(x)
            if f"c{level}" in self.out_features:
                outputs[f"c{level}"] = x
        return outputs

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {
            "depth": cfg.MODEL.RESNETS.DEPTH,
            "norm": NormSpec.from_config(cfg, cfg.MODEL.BACKBONE.NORM, key="MODEL.BACKBONE.NORM"),
            "out_features": list(cfg.MODEL.BACKBONE.OUT_FEATURES),
            "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
            "stride_in_1x1": cfg.MODEL.RESNETS.STRIDE_IN_1X1,
        }


@BACKBONE_REGISTRY.register()
def ResNet(cfg) -> ResNetBackbone:
    """ResNet backbone from ``MODEL.RESNETS`` and ``MODEL.BACKBONE``."""
    return ResNetBackbone(**ResNetBackbone.from_config(cfg))
