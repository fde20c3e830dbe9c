"""TinyNet: a light five-stage backbone for CPU demos and tests (about 0.5 M parameters).

Two kinds of stage (``MODEL.TINYNET.BLOCK``), each halving the resolution; stage k outputs ``c<k>``:

- "basic": stage 1 is a stride-2 3x3 conv-norm-ReLU; stages 2..5 are each one ResNet ``BasicBlock``
  (two 3x3 conv-norm with a residual) whose first conv has stride 2.
- "plain": every stage is two 3x3 conv-norm-ReLU, the first with stride 2, without residual (the
  VGG-like tiny backbone of the calibration reference for the Mask R-CNN demo). Its stage 1 has
  two convs, so its c2 has seen four, which helps RoI heads that pool small objects from P2.
"""
from typing import Dict, List, Sequence

import torch
from torch import nn

from detector.layers import ConvNormAct, NormSpec, as_norm_spec

from .base import Backbone, check_out_features
from .build import BACKBONE_REGISTRY
from .resnet import BasicBlock, downsample_block, freeze_module, kaiming_fan_out_

__all__ = ["TinyNetBackbone", "TinyNet"]


class TinyNetBackbone(Backbone):
    """Args:
        channels: output channels of the five stages c1..c5.
        norm: a :class:`detector.layers.NormSpec` (or a name, see
            :func:`detector.layers.available_norms`).
        out_features: subset of ``c1``..``c5`` to return; stages above the highest are not built.
        freeze_at: freeze the first ``freeze_at`` stages (0 = train everything).
        block: "basic" (residual stages) or "plain" (two conv-norm-ReLU per stage).
    """

    def __init__(self, *, channels: Sequence[int] = (16, 32, 64, 96, 128), norm="BN",
                 out_features: List[str] = ("c3", "c4", "c5"), freeze_at: int = 0,
                 in_channels: int = 3, block: str = "basic"):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 5 or min(channels) <= 0:
            raise ValueError(f"MODEL.TINYNET.CHANNELS={channels} must list 5 positive channel "
                             "counts")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT={freeze_at} must be in [0, 5]")
        self.out_features = check_out_features(out_features, [f"c{k}" for k in range(1, 6)])
        spec = as_norm_spec(norm, "MODEL.BACKBONE.NORM")

        if block not in ("basic", "plain"):
            raise ValueError(f"MODEL.TINYNET.BLOCK={block!r} must be 'basic' or 'plain'")
        top_level = int(self.out_features[-1][1:])
        if block == "plain":
            stage_inputs = [in_channels] + channels[:top_level - 1]
            stages = [nn.Sequential(
                ConvNormAct(c_in, c_out, 3, stride=2, norm=spec, weight_init=kaiming_fan_out_),
                ConvNormAct(c_out, c_out, 3, norm=spec, weight_init=kaiming_fan_out_))
                for c_in, c_out in zip(stage_inputs, channels)]
        else:
            stages = [ConvNormAct(in_channels, channels[0], 3, stride=2, norm=spec,
                                  weight_init=kaiming_fan_out_)]
            for k in range(1, top_level):
                c_in, c_out = channels[k - 1], channels[k]
                stages.append(BasicBlock(c_in, c_out, stride=2, norm=spec,
                                         downsample=downsample_block(c_in, c_out, 2, spec)))
        self.stages = nn.ModuleList(stages)
        for k in range(1, top_level + 1):
            self._out_feature_channels[f"c{k}"] = channels[k - 1]
            self._out_feature_strides[f"c{k}"] = 2 ** k
        for k in range(min(freeze_at, top_level)):
            self.stages[k] = freeze_module(self.stages[k])

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
            "norm": NormSpec.from_config(cfg, cfg.MODEL.BACKBONE.NORM, key="MODEL.BACKBONE.NORM"),
            "out_features": list(cfg.MODEL.BACKBONE.OUT_FEATURES),
            "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
            "in_channels": len(cfg.MODEL.PIXEL_MEAN),
            "block": cfg.MODEL.TINYNET.BLOCK,
        }


@BACKBONE_REGISTRY.register()
def TinyNet(cfg) -> TinyNetBackbone:
    """TinyNet backbone from ``MODEL.TINYNET`` and ``MODEL.BACKBONE``."""
    return TinyNetBackbone(**TinyNetBackbone.from_config(cfg))
