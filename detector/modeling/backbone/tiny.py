"""TinyNet: a light five-stage backbone for CPU demos and tests (about 0.5 M parameters).

Stage 1 is a stride-2 3x3 conv-norm-ReLU; stages 2..5 are each one torchvision ``BasicBlock``
(two 3x3 conv-norm with a residual) whose first conv has stride 2. Stage k outputs ``c<k>``.
"""
from typing import Dict, List, Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import Conv2dNormActivation

from ..common import norm_factory
from .base import Backbone, check_out_features
from .build import BACKBONE_REGISTRY
from .resnet import freeze_module

__all__ = ["TinyNetBackbone", "TinyNet"]


class TinyNetBackbone(Backbone):
    """Args:
        channels: output channels of the five stages c1..c5.
        norm: norm name ("BN", "GN", "FrozenBN" or "").
        out_features: subset of ``c1``..``c5`` to return; stages above the highest are not built.
        freeze_at: freeze the first ``freeze_at`` stages (0 = train everything).
    """

    def __init__(self, *, channels: Sequence[int] = (16, 32, 64, 96, 128), norm: str = "BN",
                 out_features: List[str] = ("c3", "c4", "c5"), freeze_at: int = 0,
                 in_channels: int = 3, gn_groups: int = 32, bn_momentum: float = 0.1,
                 bn_eps: float = 1e-5):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 5 or min(channels) <= 0:
            raise ValueError(f"MODEL.TINYNET.CHANNELS={channels} must list 5 positive channel "
                             "counts")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT={freeze_at} must be in [0, 5]")
        self.out_features = check_out_features(out_features, [f"c{k}" for k in range(1, 6)])
        make_norm = norm_factory(norm, gn_groups=gn_groups, bn_momentum=bn_momentum,
                                 bn_eps=bn_eps, key="MODEL.BACKBONE.NORM")
        block_norm = make_norm or (lambda c: nn.Identity())

        top_level = int(self.out_features[-1][1:])
        stages = [Conv2dNormActivation(in_channels, channels[0], kernel_size=3, stride=2,
                                       norm_layer=make_norm)]
        for k in range(1, top_level):
            c_in, c_out = channels[k - 1], channels[k]
            downsample = Conv2dNormActivation(c_in, c_out, kernel_size=1, stride=2, padding=0,
                                              norm_layer=make_norm, activation_layer=None)
            stages.append(BasicBlock(c_in, c_out, stride=2, downsample=downsample,
                                     norm_layer=block_norm))
        self.stages = nn.ModuleList(stages)
        for k in range(1, top_level + 1):
            self._out_feature_channels[f"c{k}"] = channels[k - 1]
            self._out_feature_strides[f"c{k}"] = 2 ** k
        self._init_weights()
        for k in range(min(freeze_at, top_level)):
            self.stages[k] = freeze_module(self.stages[k], convert_bn=norm == "BN")

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs = {}
        for k, stage in enumerate(self.stages, start=1):
            x = stage(x)
            if f"c{k}" in self.out_features:
                outputs[f"c{k}"] = x
        return outputs

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {
            "channels": list(cfg.MODEL.TINYNET.CHANNELS),
            "norm": cfg.MODEL.BACKBONE.NORM,
            "out_features": list(cfg.MODEL.BACKBONE.OUT_FEATURES),
            "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
            "in_channels": len(cfg.MODEL.PIXEL_MEAN),
            "gn_groups": cfg.MODEL.GN.NUM_GROUPS,
            "bn_momentum": cfg.MODEL.BN.MOMENTUM,
            "bn_eps": cfg.MODEL.BN.EPS,
        }


@BACKBONE_REGISTRY.register()
def TinyNet(cfg) -> TinyNetBackbone:
    """TinyNet backbone from ``MODEL.TINYNET`` and ``MODEL.BACKBONE``."""
    return TinyNetBackbone(**TinyNetBackbone.from_config(cfg))
