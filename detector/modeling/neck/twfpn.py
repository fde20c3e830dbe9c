"""Two-way FPN (EfficientPS, Mohan and Valada 2020), as the object_detection2 TensorFlow framework
built it: two FPN paths run in parallel on the backbone features and are summed per level.

For input levels L = min..max (``c<k>`` from the backbone)::

    top-down   td<max> = lat_td<max>(c<max>)
               td<k>   = fuse(up(td<k+1>), lat_td<k>(c<k>))      nearest upsampling
    bottom-up  bu<min> = lat_bu<min>(c<min>)
               bu<k>   = fuse(down(bu<k-1>), lat_bu<k>(c<k>))     2x2 stride-2 max-pool
    output     p<k>    = sepconv3x3(td<k> + bu<k>)

Each path has its own 1x1 lateral conv per level (conv + norm + ReLU); ``fuse`` is the fast
normalized fusion ``(relu(w0) a + relu(w1) b) / (relu(w0) + relu(w1) + 1e-4)`` with one pair of
learnable scalars per node, starting at 1; the output conv is a depthwise 3x3 + pointwise conv
with the neck's norm and ReLU.

Differences from the original: its output conv had 256 channels whatever the neck's width (here
``out_channels``, the same at the default width), and its levels above the backbone's came from
separate backbone hooks. Here levels above 5 are neck inputs made from ``c5`` as RetinaNet makes
P6/P7 (a 3x3 stride-2 conv, then ReLU + 3x3 stride-2 conv for each further level), so every
output level goes through both paths. The original's L2 weight decay on the laterals is the
optimizer's weight decay here.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from detector.layers import (
    ConvNormAct,
    NormalizedFusion,
    NormSpec,
    SeparableConvNormAct,
    ShapeSpec,
    as_norm_spec,
    check_layer_norm,
    glorot_uniform_,
)

from .build import NECK_REGISTRY

__all__ = ["TwoWayFPNNeck", "TwoWayFPN", "ExtraInputLevels", "backbone_levels_for",
           "check_same_size"]


def backbone_levels_for(input_shape: Dict[str, ShapeSpec], min_level: int, max_level: int,
                        neck: str) -> List[int]:
    """The levels ``min_level..min(5, max_level)`` read from the backbone's ``c<k>``, after
    checking the level range, that they exist and their strides."""
    if not 1 <= min_level <= 5 or max_level < min_level:
        raise ValueError(f"MODEL.NECK.MIN_LEVEL={min_level}, MAX_LEVEL={max_level}: {neck} needs "
                         "1 <= MIN_LEVEL <= 5 and MAX_LEVEL >= MIN_LEVEL")
    levels = list(range(min_level, min(5, max_level) + 1))
    needed = [f"c{k}" for k in levels] + (["c5"] if max_level > 5 else [])
    missing = sorted(set(needed) - set(input_shape))
    if missing:
        raise ValueError(f"{neck} levels P{min_level}-P{max_level} (MODEL.NECK.MIN_LEVEL/"
                         f"MAX_LEVEL) need backbone features {missing}; add them to "
                         f"MODEL.BACKBONE.OUT_FEATURES (has {sorted(input_shape)})")
    for k in levels:
        if input_shape[f"c{k}"].stride != 2 ** k:
            raise ValueError(f"Backbone feature c{k} has stride {input_shape[f'c{k}'].stride}, "
                             f"expected {2 ** k}")
    return levels


def check_same_size(x: torch.Tensor, reference: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` if its spatial size is ``reference``'s, else a one-line error naming ``what``."""
    if x.shape[-2:] != reference.shape[-2:]:
        raise ValueError(f"{what}: resampled to {tuple(x.shape[-2:])} but the level is "
                         f"{tuple(reference.shape[-2:])}; backbone levels must halve (rounding "
                         "up) from one level to the next")
    return x


class ExtraInputLevels(nn.Module):
    """Inputs for the levels 6..max_level: a 3x3 stride-2 conv on ``c5``, then ReLU + a 3x3
    stride-2 conv on the previous one (RetinaNet's P6/P7 block, without a norm)."""

    def __init__(self, *, c5_channels: int, out_channels: int, max_level: int):
        super().__init__()
        self.convs = nn.ModuleDict()
        in_channels = c5_channels
        for k in range(6, max_level + 1):
            conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
            glorot_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.convs[f"p{k}"] = conv
            in_channels = out_channels

    def forward(self, c5: torch.Tensor) -> List[torch.Tensor]:
        outputs, x = [], c5
        for i, conv in enumerate(self.convs.values()):
            x = conv(x if i == 0 else F.relu(x))
            outputs.append(x)
        return outputs


class TwoWayFPNNeck(nn.Module):
    """Args:
        input_shape: backbone output shapes; needs ``c<min_level>``..``c<min(5, max_level)>``
            (and ``c5`` when ``max_level`` > 5).
        out_channels: channels of every output level.
        min_level, max_level: output levels ``p<min_level>``..``p<max_level>``.
        norm: norm of the lateral and output convs, a :class:`detector.layers.NormSpec` or a
            name ("" none; not "SN", which separable convs cannot apply).
    """

    def __init__(self, *, input_shape: Dict[str, ShapeSpec], out_channels: int = 256,
                 min_level: int = 3, max_level: int = 7, norm=""):
        super().__init__()
        if out_channels <= 0:
            raise ValueError(f"MODEL.NECK.OUT_CHANNELS={out_channels} must be positive")
        self.backbone_levels = backbone_levels_for(input_shape, min_level, max_level, "TwoWayFPN")
        self.min_level, self.max_level, self.out_channels = min_level, max_level, out_channels
        self.levels = list(range(min_level, max_level + 1))
        spec = check_layer_norm(as_norm_spec(norm, "MODEL.NECK.NORM"))
        self.extra_inputs = (ExtraInputLevels(c5_channels=input_shape["c5"].channels,
                                              out_channels=out_channels, max_level=max_level)
                             if max_level > 5 else None)
        in_channels = {k: input_shape[f"c{k}"].channels for k in self.backbone_levels}
        in_channels.update({k: out_channels for k in range(6, max_level + 1)})

        def lateral(k):
            return ConvNormAct(in_channels[k], out_channels, 1, norm=spec,
                               activation=nn.ReLU, weight_init=glorot_uniform_)

        self.top_down_laterals = nn.ModuleDict({f"p{k}": lateral(k) for k in self.levels})
        self.bottom_up_laterals = nn.ModuleDict({f"p{k}": lateral(k) for k in self.levels})
        self.top_down_fusions = nn.ModuleDict(
            {f"p{k}": NormalizedFusion(2, "fast") for k in self.levels[:-1]})
        self.bottom_up_fusions = nn.ModuleDict(
            {f"p{k}": NormalizedFusion(2, "fast") for k in self.levels[1:]})
        self.output_convs = nn.ModuleDict({
            f"p{k}": SeparableConvNormAct(out_channels, out_channels, norm=spec,
                                          activation=nn.ReLU)
            for k in self.levels})
        for conv in self.output_convs.values():
            glorot_uniform_(conv.conv.conv_dw.weight, groups=out_channels)
            glorot_uniform_(conv.conv.conv_pw.weight)
            if conv.conv.conv_pw.bias is not None:
                nn.init.zeros_(conv.conv.conv_pw.bias)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {f"p{k}": ShapeSpec(channels=self.out_channels, stride=2 ** k)
                for k in self.levels}

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        inputs = {k: features[f"c{k}"] for k in self.backbone_levels}
        if self.extra_inputs is not None:
            inputs.update(zip(range(6, self.max_level + 1), self.extra_inputs(features["c5"])))

        top_down, previous = {}, None
        for k in reversed(self.levels):
            x = self.top_down_laterals[f"p{k}"](inputs[k])
            if previous is not None:
                upsampled = F.interpolate(previous, size=x.shape[-2:], mode="nearest")
                x = self.top_down_fusions[f"p{k}"]([upsampled, x])
            top_down[k] = previous = x

        results, previous = {}, None
        for k in self.levels:
            x = self.bottom_up_laterals[f"p{k}"](inputs[k])
            if previous is not None:
                # TF's 2x2 stride-2 "SAME" max-pool: odd sizes round up
                pooled = F.max_pool2d(previous, kernel_size=2, stride=2, ceil_mode=True)
                check_same_size(pooled, x, f"TwoWayFPN bottom-up p{k - 1} -> p{k}")
                x = self.bottom_up_fusions[f"p{k}"]([pooled, x])
            previous = x
            results[f"p{k}"] = self.output_convs[f"p{k}"](top_down[k] + x)
        return results

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> dict:
        return {
            "input_shape": input_shape,
            "out_channels": cfg.MODEL.NECK.OUT_CHANNELS,
            "min_level": cfg.MODEL.NECK.MIN_LEVEL,
            "max_level": cfg.MODEL.NECK.MAX_LEVEL,
            "norm": NormSpec.from_config(cfg, cfg.MODEL.NECK.NORM, key="MODEL.NECK.NORM"),
        }


@NECK_REGISTRY.register()
def TwoWayFPN(cfg, input_shape: Dict[str, ShapeSpec]) -> TwoWayFPNNeck:
    """Two-way FPN from ``MODEL.NECK`` (channels, norm, levels) on top of the backbone
    features described by ``input_shape``."""
    return TwoWayFPNNeck(**TwoWayFPNNeck.from_config(cfg, input_shape))
