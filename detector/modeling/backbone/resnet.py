"""ResNet-18/34/50/101 backbone assembled from torchvision's ResNet modules.

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``), so a torchvision
ImageNet checkpoint loads after prefixing ``backbone.`` and dropping ``fc``.
"""
import logging
from typing import Dict, List

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from detector.layers import convert_frozen_batchnorm

from ..common import norm_factory
from .base import Backbone, check_out_features
from .build import BACKBONE_REGISTRY

__all__ = ["ResNetBackbone", "ResNet"]

logger = logging.getLogger(__name__)

_DEPTHS = {18: tv_resnet.resnet18, 34: tv_resnet.resnet34, 50: tv_resnet.resnet50,
           101: tv_resnet.resnet101}
# stage name per output level: c2 = layer1 (stride 4) ... c5 = layer4 (stride 32)
_STAGE_OF_LEVEL = {2: "layer1", 3: "layer2", 4: "layer3", 5: "layer4"}


def freeze_module(module: nn.Module, convert_bn: bool) -> nn.Module:
    """Stop gradients to ``module``; with ``convert_bn`` its BatchNorms also stop updating
    statistics."""
    for p in module.parameters():
        p.requires_grad_(False)
    return convert_frozen_batchnorm(module) if convert_bn else module


class ResNetBackbone(Backbone):
    """torchvision ResNet trunk (no avgpool/fc) returning ``c2``..``c5``.

    Args:
        depth: 18, 34, 50 or 101.
        norm: norm name for every conv ("FrozenBN", "BN", "GN" or "" for none).
        out_features: subset of ``c2``..``c5`` to return; stages above the highest are not built.
        freeze_at: 0 trains everything, 1 freezes the stem, k freezes the stem and ``c2``..``c<k>``.
    """

    def __init__(self, *, depth: int = 50, norm: str = "FrozenBN",
                 out_features: List[str] = ("c3", "c4", "c5"), freeze_at: int = 0,
                 gn_groups: int = 32, bn_momentum: float = 0.1, bn_eps: float = 1e-5):
        super().__init__()
        if depth not in _DEPTHS:
            raise ValueError(f"MODEL.RESNETS.DEPTH={depth} is not supported; choose from "
                             f"{sorted(_DEPTHS)}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT={freeze_at} must be in [0, 5]")
        self.out_features = check_out_features(out_features, ["c2", "c3", "c4", "c5"])
        make_norm = norm_factory(norm, gn_groups=gn_groups, bn_momentum=bn_momentum,
                                 bn_eps=bn_eps, key="MODEL.BACKBONE.NORM")
        if make_norm is None:
            logger.warning("ResNet built without norm layers; its convs have no bias")
            make_norm = _identity_norm
        net = _DEPTHS[depth](weights=None, norm_layer=make_norm)

        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        top_level = int(self.out_features[-1][1:])
        self.stage_names = [_STAGE_OF_LEVEL[k] for k in range(2, top_level + 1)]
        expansion = 4 if depth >= 50 else 1
        for level, name in zip(range(2, top_level + 1), self.stage_names):
            self.add_module(name, getattr(net, name))
            self._out_feature_channels[f"c{level}"] = 64 * 2 ** (level - 2) * expansion
            self._out_feature_strides[f"c{level}"] = 2 ** level
        self._freeze(freeze_at, convert_bn=norm == "BN")

    def _freeze(self, freeze_at: int, convert_bn: bool) -> None:
        if freeze_at >= 1:
            freeze_module(self.conv1, convert_bn)
            self.bn1 = freeze_module(self.bn1, convert_bn)
        for level in range(2, freeze_at + 1):
            name = _STAGE_OF_LEVEL[level]
            if name in self.stage_names:
                setattr(self, name, freeze_module(getattr(self, name), convert_bn))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
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
            "norm": cfg.MODEL.BACKBONE.NORM,
            "out_features": list(cfg.MODEL.BACKBONE.OUT_FEATURES),
            "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
            "gn_groups": cfg.MODEL.GN.NUM_GROUPS,
            "bn_momentum": cfg.MODEL.BN.MOMENTUM,
            "bn_eps": cfg.MODEL.BN.EPS,
        }


def _identity_norm(channels: int) -> nn.Module:
    return nn.Identity()


@BACKBONE_REGISTRY.register()
def ResNet(cfg) -> ResNetBackbone:
    """ResNet backbone from ``MODEL.RESNETS`` and ``MODEL.BACKBONE``."""
    return ResNetBackbone(**ResNetBackbone.from_config(cfg))
