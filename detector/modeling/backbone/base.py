"""Base class of every backbone: a bottom-up network returning named feature maps c<k>."""
from abc import ABCMeta, abstractmethod
from typing import Dict

import torch
from torch import nn

from detector.layers import ShapeSpec

__all__ = ["Backbone"]


class Backbone(nn.Module, metaclass=ABCMeta):
    """``forward(x)`` maps an (N, 3, H, W) batch to ``{"c<k>": (N, C_k, H / 2**k, W / 2**k)}``
    for the names in ``self.out_features``; ``output_shape()`` describes those maps without
    running them."""

    def __init__(self):
        super().__init__()
        self.out_features = []
        self._out_feature_channels: Dict[str, int] = {}
        self._out_feature_strides: Dict[str, int] = {}

    @abstractmethod
    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        pass

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name],
                            stride=self._out_feature_strides[name])
            for name in self.out_features
        }


def check_out_features(out_features, valid, key="MODEL.BACKBONE.OUT_FEATURES"):
    """One-line error unless ``out_features`` is a non-empty subset of ``valid`` without repeats."""
    out_features = list(out_features)
    bad = [f for f in out_features if f not in valid]
    if not out_features or bad or len(set(out_features)) != len(out_features):
        raise ValueError(
            f"{key}={out_features} is invalid: choose distinct names from {list(valid)}"
        )
    return sorted(out_features, key=lambda f: int(f[1:]))
