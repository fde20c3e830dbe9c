"""MobileNetV3-Large / -Small backbone built from torchvision's ``mobilenet_v3_large/small``.

The network is torchvision's ``features`` trunk (the pooling and classifier are dropped), so the
parameter names are torchvision's (``features.0.0.weight``, ``features.4.block.2.fc1.weight``, ...)
and a torchvision ImageNet state dict loads through ``MODEL.BACKBONE.WEIGHTS`` as is. The
activations (ReLU / hard-swish) and squeeze-excitation placement are fixed by the variant.

Levels: ``c<k>`` is the output of the LAST module of ``features`` whose output has stride
``2**k``, so every level is the most processed map of its resolution:

========  ==================================  ==================================
 level     large (width 1.0)                   small (width 1.0)
========  ==================================  ==================================
 c1        features[1], 16 ch                  features[0] (stem), 16 ch
 c2        features[3], 24 ch                  features[1], 16 ch
 c3        features[6], 40 ch                  features[3], 24 ch
 c4        features[12], 112 ch                features[8], 48 ch
 c5        features[16] (1x1 conv), 960 ch     features[12] (1x1 conv), 576 ch
========  ==================================  ==================================

c5 includes the final 1x1 expansion conv, which torchvision's FPN extractor also returns.
torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` instead pairs it with features[13] (the first
stride-32 block), i.e. two stride-32 maps; here every level has its own stride as the necks expect.

Norms: any option that adds a layer after the conv ("FrozenBN", "BN", "SyncBN", "GN",
"EvoNormS0", "EvoNormB0") is passed to torchvision as its ``norm_layer``. As in the ResNet, an
EvoNorm after a conv that has an activation is built as the norm-activation layer and replaces
that activation. "" and "SN" are refused: torchvision's convs drop their bias whenever a norm
layer is requested, so they would lose it. torchvision's ImageNet weights were trained with
BatchNorm eps 1e-3 and momentum 0.01 (``MODEL.BN.EPS`` / ``MODEL.BN.MOMENTUM``).
"""
from typing import Dict, Sequence

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small
from torchvision.ops.misc import Conv2dNormActivation

from detector.layers import NormSpec, as_norm_spec

from .base import Backbone, check_out_features
from .build import BACKBONE_REGISTRY
from .resnet import freeze_module

__all__ = ["MobileNetV3Backbone", "MobileNetV3", "MOBILENET_VARIANTS"]

MOBILENET_VARIANTS = {"large": mobilenet_v3_large, "small": mobilenet_v3_small}
_ACTIVATIONS = (nn.ReLU, nn.Hardswish)


def _module_stride(module: nn.Module) -> int:
    """Resolution reduction of one ``features`` module (product of its conv strides)."""
    stride = 1
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            stride *= m.stride[0]
    return stride


def _fuse_norm_activation(features: nn.Module, spec: NormSpec) -> None:
    """Replace norm + activation by the norm-activation variant of ``spec`` (EvoNorm) in every
    conv block that has an activation; a no-op for norms without such a variant."""
    for block in features.modules():
        if not (isinstance(block, Conv2dNormActivation) and len(block) == 3
                and isinstance(block[2], _ACTIVATIONS)):
            continue
        fused = spec.layer(block[0].out_channels, activation=True)
        if not getattr(fused, "applies_activation", False):
            return
        block[1] = fused
        del block[2]


class MobileNetV3Backbone(Backbone):
    """torchvision's MobileNetV3 trunk returning ``c1``..``c5`` (see the module docstring).

    Args:
        variant: "large" or "small".
        width_mult: channel multiplier of every layer (rounded to multiples of 8, as torchvision).
        norm: a :class:`detector.layers.NormSpec` (or name) that adds a layer after the conv.
        out_features: subset of ``c1``..``c5``; modules above the highest are not kept.
        freeze_at: 0 trains everything, 1 freezes the stem conv, k > 1 freezes everything up to
            and including ``c<k>``; frozen BatchNorms become FrozenBatchNorm2d.
        in_channels: input channels (the stem conv is rebuilt when not 3).

    Attributes:
        level_index: ``{k: index in features of the module whose output is c<k>}`` for k = 1..5.
    """

    def __init__(self, *, variant: str = "large", width_mult: float = 1.0, norm="FrozenBN",
                 out_features: Sequence[str] = ("c3", "c4", "c5"), freeze_at: int = 0,
                 in_channels: int = 3):
        super().__init__()
        if variant not in MOBILENET_VARIANTS:
            raise ValueError(f"MODEL.MOBILENET.VARIANT='{variant}' is not one of "
                             f"{sorted(MOBILENET_VARIANTS)}")
        if not width_mult > 0:
            raise ValueError(f"MODEL.MOBILENET.WIDTH_MULT={width_mult} must be positive")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT={freeze_at} must be in [0, 5]")
        spec = as_norm_spec(norm, "MODEL.BACKBONE.NORM")
        if not spec.adds_layer:
            raise ValueError(f"{spec.key}='{spec.name}' is not supported by the MobileNetV3 "
                             "backbone (its convs have no bias); choose a norm layer such as "
                             "FrozenBN, BN, SyncBN, GN, EvoNormS0 or EvoNormB0")
        self.out_features = check_out_features(out_features, [f"c{k}" for k in range(1, 6)])
        self.variant, self.width_mult = variant, float(width_mult)

        features = MOBILENET_VARIANTS[variant](weights=None, width_mult=width_mult,
                                               norm_layer=spec).features
        # the last module at each stride 2**k gives c<k>
        self.level_index: Dict[int, int] = {}
        stride = 1
        for index, module in enumerate(features):
            stride *= _module_stride(module)
            self.level_index[stride.bit_length() - 1] = index
        top_level = int(self.out_features[-1][1:])
        self.features = features[:self.level_index[top_level] + 1]
        for level in range(1, top_level + 1):
            self._out_feature_channels[f"c{level}"] = \
                self.features[self.level_index[level]].out_channels
            self._out_feature_strides[f"c{level}"] = 2 ** level
        self._output_index = {self.level_index[int(f[1:])]: f for f in self.out_features}

        if in_channels != 3:
            stem = self.features[0][0]
            self.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=2,
                                            padding=1, bias=False)
            nn.init.kaiming_normal_(self.features[0][0].weight, mode="fan_out")
        _fuse_norm_activation(self.features, spec)
        self._freeze(freeze_at)

    def _freeze(self, freeze_at: int) -> None:
        if freeze_at == 0:
            return
        last = 0 if freeze_at == 1 else min(self.level_index[freeze_at],
                                            len(self.features) - 1)
        for index in range(last + 1):
            self.features[index] = freeze_module(self.features[index])

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self._output_index:
                outputs[self._output_index[index]] = x
        return outputs

    @classmethod
    def from_config(cls, cfg) -> dict:
        m = cfg.MODEL.MOBILENET
        return {
            "variant": m.VARIANT,
            "width_mult": m.WIDTH_MULT,
            "norm": NormSpec.from_config(cfg, cfg.MODEL.BACKBONE.NORM, key="MODEL.BACKBONE.NORM"),
            "out_features": list(cfg.MODEL.BACKBONE.OUT_FEATURES),
            "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
            "in_channels": len(cfg.MODEL.PIXEL_MEAN),
        }


@BACKBONE_REGISTRY.register()
def MobileNetV3(cfg) -> MobileNetV3Backbone:
    """MobileNetV3 backbone from ``MODEL.MOBILENET`` and ``MODEL.BACKBONE``."""
    return MobileNetV3Backbone(**MobileNetV3Backbone.from_config(cfg))
