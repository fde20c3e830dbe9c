"""BiFPN (Tan et al. 2020): repeated top-down + bottom-up cells with weighted fusion.

Levels ``p<min>``..``p5`` start from the backbone's ``c<k>``; each level above 5 comes from the one
below by a 1x1 conv + norm (only where the channels change, i.e. on ``c5``) and a 3x3 stride-2
max-pool. A cell over levels L = min..max has one node per level and direction, like effdet::

    top-down   p<k>_td  = conv(fuse(p<k>_in, up(p<k+1>_td)))          k = max-1 .. min+1
               p<min>_out = conv(fuse(p<min>_in, up(p<min+1>_td)))
    bottom-up  p<k>_out = conv(fuse(p<k>_in, p<k>_td, down(p<k-1>_out)))   k = min+1 .. max-1
               p<max>_out = conv(fuse(p<max>_in, down(p<max-1>_out)))

where conv is activation -> depthwise-separable 3x3 conv -> norm, ``up`` nearest upsampling and
``down`` the padded max-pool. In the first cell a backbone input whose channels differ from the
BiFPN width gets its own 1x1 conv + norm inside every node that reads it. Fusion is "fast"
(ReLU weights normalised by their sum + 1e-4), "attn" (softmax weights) or "sum".
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detector.layers import (
    FUSION_METHODS,
    MaxPool2dPadded,
    NormalizedFusion,
    NormSpec,
    SeparableConv2d,
    ShapeSpec,
    as_norm_spec,
    check_layer_norm,
    check_padding_mode,
    glorot_uniform_,
    make_activation,
)

from .build import NECK_REGISTRY

__all__ = ["BiFPNNeck", "BiFPN", "NormalizedFusion", "bifpn_graph", "FUSION_METHODS"]


def bifpn_graph(min_level: int, max_level: int) -> List[Tuple[str, int, List[str]]]:
    """The nodes of one cell in execution order: (name, level, input names). Cell inputs are
    named ``p<k>_in``; a level's output is its last node."""
    last = {k: f"p{k}_in" for k in range(min_level, max_level + 1)}
    every = {k: [f"p{k}_in"] for k in range(min_level, max_level + 1)}
    nodes = []
    for k in range(max_level - 1, min_level - 1, -1):
        name = f"p{k}_td" if k > min_level else f"p{k}_out"
        nodes.append((name, k, [last[k], last[k + 1]]))
        last[k] = name
        every[k].append(name)
    for k in range(min_level + 1, max_level + 1):
        name = f"p{k}_out"
        nodes.append((name, k, every[k] + [last[k - 1]]))
        last[k] = name
        every[k].append(name)
    return nodes


class Conv1x1Norm(nn.Sequential):
    """1x1 conv (+ norm) changing the channels of a backbone feature."""

    def __init__(self, in_channels: int, out_channels: int, *, norm, bias: bool):
        super().__init__()
        layer = norm.layer(out_channels)
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, 1,
                                          bias=bias or layer is None))
        if layer is not None:
            self.add_module("norm", layer)


class ExtraLevel(nn.Module):
    """A level above the backbone's: optional 1x1 conv + norm, then a 3x3 stride-2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int, *, norm, bias: bool,
                 padding_mode: str):
        super().__init__()
        self.proj = (Conv1x1Norm(in_channels, out_channels, norm=norm, bias=bias)
                     if in_channels != out_channels else None)
        self.pool = MaxPool2dPadded(3, 2, padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.proj(x) if self.proj is not None else x)


class BiFPNNode(nn.Module):
    """Resample the inputs to this level, fuse them, then activation + separable conv + norm."""

    def __init__(self, *, level: int, input_names: Sequence[str], input_levels: Sequence[int],
                 input_channels: Sequence[int], channels: int, fusion: str, norm, act: str,
                 padding_mode: str, redundant_bias: bool):
        super().__init__()
        self.input_names = list(input_names)
        # "" same level, "up" from the level above, "down" from the level below
        self.resize = []
        for name, in_level in zip(input_names, input_levels):
            if abs(in_level - level) > 1:
                raise ValueError(f"BiFPN node at level {level} cannot read {name} (level "
                                 f"{in_level}): only adjacent levels are resampled")
            self.resize.append("" if in_level == level else ("up" if in_level > level else "down"))
        if self.resize[0] != "":
            raise ValueError(f"BiFPN node at level {level}: its first input must be on its level")
        self.input_convs = nn.ModuleDict({
            name: Conv1x1Norm(c, channels, norm=norm, bias=redundant_bias)
            for name, c in zip(input_names, input_channels) if c != channels})
        self.pool = MaxPool2dPadded(3, 2, padding_mode)
        self.fusion = NormalizedFusion(len(self.input_names), fusion)
        self.act = make_activation(act, "MODEL.BIFPN.ACT")
        self.norm = norm.layer(channels)
        self.conv = SeparableConv2d(channels, channels, bias=redundant_bias or self.norm is None,
                                    padding_mode=padding_mode)

    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        size = inputs[0].shape[-2:]
        resampled = []
        for name, resize, x in zip(self.input_names, self.resize, inputs):
            if name in self.input_convs:
                x = self.input_convs[name](x)
            if resize == "up":
                x = F.interpolate(x, size=size, mode="nearest")
            elif resize == "down":
                x = self.pool(x)
            resampled.append(x)
        x = self.fusion(resampled)
        if self.act is not None:
            x = self.act(x)
        return self.conv(x, self.norm)


class BiFPNCell(nn.Module):
    """One top-down + bottom-up pass over levels min..max (see the module docstring)."""

    def __init__(self, *, min_level: int, max_level: int, in_channels: Sequence[int],
                 channels: int, **node_kwargs):
        super().__init__()
        self.levels = list(range(min_level, max_level + 1))
        self.input_names = [f"p{k}_in" for k in self.levels]
        level_of = {f"p{k}_in": k for k in self.levels}
        channels_of = dict(zip(self.input_names, in_channels))
        self.nodes = nn.ModuleDict()
        last = {}
        for name, level, inputs in bifpn_graph(min_level, max_level):
            self.nodes[name] = BiFPNNode(
                level=level, input_names=inputs, input_levels=[level_of[n] for n in inputs],
                input_channels=[channels_of[n] for n in inputs], channels=channels,
                **node_kwargs)
            level_of[name], channels_of[name] = level, channels
            last[level] = name
        self.output_names = [last[k] for k in self.levels]

    def forward(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        values: Dict[str, torch.Tensor] = dict(zip(self.input_names, inputs))
        for name, node in self.nodes.items():
            values[name] = node([values[n] for n in node.input_names])
        return [values[n] for n in self.output_names]


class BiFPNNeck(nn.Module):
    """Args:
        input_shape: backbone output shapes; needs ``c<min_level>``..``c5``.
        channels: width of every level. num_repeats: stacked cells.
        min_level, max_level: output levels ``p<min_level>``..``p<max_level>`` (max >= 5).
        fusion: "fast", "attn" or "sum". norm: a :class:`detector.layers.NormSpec` or a name
            ("" none; not "SN"). act: "swish", "relu", "".
        padding_mode: "same" or "symmetric" for the pools (and convs).
        redundant_bias: keep the TF models' bias on convs followed by a norm.
    """

    def __init__(self, *, input_shape: Dict[str, ShapeSpec], channels: int = 64,
                 num_repeats: int = 3, min_level: int = 3, max_level: int = 7,
                 fusion: str = "fast", norm="BN", act: str = "swish",
                 padding_mode: str = "same", redundant_bias: bool = True):
        super().__init__()
        if not 1 <= min_level <= 5 or max_level < 5:
            raise ValueError(f"MODEL.NECK.MIN_LEVEL={min_level}, MAX_LEVEL={max_level}: the BiFPN "
                             "needs 1 <= MIN_LEVEL <= 5 <= MAX_LEVEL")
        if channels <= 0 or num_repeats <= 0:
            raise ValueError(f"MODEL.BIFPN.CHANNELS={channels} and NUM_REPEATS={num_repeats} must "
                             "be positive")
        if fusion not in FUSION_METHODS:
            raise ValueError(f"MODEL.BIFPN.FUSION='{fusion}' is not one of {FUSION_METHODS}")
        check_padding_mode(padding_mode, "MODEL.BIFPN.PADDING")
        self.backbone_levels = list(range(min_level, 6))
        missing = [f"c{k}" for k in self.backbone_levels if f"c{k}" not in input_shape]
        if missing:
            raise ValueError(f"BiFPN levels P{min_level}-P{max_level} need backbone features "
                             f"{missing}; add them to MODEL.BACKBONE.OUT_FEATURES (has "
                             f"{sorted(input_shape)})")
        for k in self.backbone_levels:
            if input_shape[f"c{k}"].stride != 2 ** k:
                raise ValueError(f"Backbone feature c{k} has stride {input_shape[f'c{k}'].stride}, "
                                 f"expected {2 ** k}")
        self.min_level, self.max_level, self.channels = min_level, max_level, channels
        spec = check_layer_norm(as_norm_spec(norm, "MODEL.BIFPN.NORM"))
        in_channels = [input_shape[f"c{k}"].channels for k in self.backbone_levels]
        self.extra_levels = nn.ModuleDict()
        for k in range(6, max_level + 1):
            self.extra_levels[f"p{k}"] = ExtraLevel(in_channels[-1], channels, norm=spec,
                                                    bias=redundant_bias, padding_mode=padding_mode)
            in_channels.append(channels)
        self.cells = nn.ModuleList()
        for _ in range(num_repeats):
            self.cells.append(BiFPNCell(
                min_level=min_level, max_level=max_level, in_channels=in_channels,
                channels=channels, fusion=fusion, norm=spec, act=act,
                padding_mode=padding_mode, redundant_bias=redundant_bias))
            in_channels = [channels] * len(in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, SeparableConv2d):
                glorot_uniform_(m.conv_dw.weight, groups=m.conv_dw.groups)
                glorot_uniform_(m.conv_pw.weight)
            elif isinstance(m, Conv1x1Norm):
                glorot_uniform_(m.conv.weight)
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {f"p{k}": ShapeSpec(channels=self.channels, stride=2 ** k)
                for k in range(self.min_level, self.max_level + 1)}

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        x = [features[f"c{k}"] for k in self.backbone_levels]
        for extra in self.extra_levels.values():
            x.append(extra(x[-1]))
        for cell in self.cells:
            x = cell(x)
        return {f"p{k}": t for k, t in zip(range(self.min_level, self.max_level + 1), x)}

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> dict:
        b = cfg.MODEL.BIFPN
        unset = [f"MODEL.BIFPN.{k}" for k in ("CHANNELS", "NUM_REPEATS", "FUSION")
                 if b.get(k) in (0, "")]
        if unset:
            raise ValueError(f"{', '.join(unset)} unset: set them, or build the BiFPN through "
                             "EfficientDet, which fills them from MODEL.EFFICIENTDET.COMPOUND_COEF")
        return {
            "input_shape": input_shape,
            "channels": b.CHANNELS,
            "num_repeats": b.NUM_REPEATS,
            "min_level": cfg.MODEL.NECK.MIN_LEVEL,
            "max_level": cfg.MODEL.NECK.MAX_LEVEL,
            "fusion": b.FUSION,
            "norm": NormSpec.from_config(cfg, b.NORM, key="MODEL.BIFPN.NORM"),
            "act": b.ACT,
            "padding_mode": b.PADDING or "same",
            "redundant_bias": b.REDUNDANT_BIAS,
        }


@NECK_REGISTRY.register()
def BiFPN(cfg, input_shape: Dict[str, ShapeSpec]) -> BiFPNNeck:
    """BiFPN from ``MODEL.BIFPN`` on top of the backbone features described by ``input_shape``
    (EfficientDet fills its unset sizes from the compound coefficient first)."""
    return BiFPNNeck(**BiFPNNeck.from_config(cfg, input_shape))
