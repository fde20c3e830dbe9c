"""The inputs of the necks that run every pyramid level through the same blocks (TwoWayFPN,
PConv): backbone features ``c<k>`` up to level 5, and levels above made from ``c5`` as RetinaNet
makes P6/P7."""
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from detector.layers import ShapeSpec, glorot_uniform_

__all__ = ["PyramidInputs", "ExtraInputLevels", "backbone_levels_for", "check_same_size"]


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


class PyramidInputs(nn.Module):
    """The input of every output level ``min_level..max_level``: ``c<k>`` from the backbone up to
    level 5, :class:`ExtraInputLevels` above. ``channels[k]`` is level k's input channels;
    ``forward(features)`` returns ``{k: tensor}``. ``neck`` names the neck in errors."""

    def __init__(self, *, input_shape: Dict[str, ShapeSpec], out_channels: int, min_level: int,
                 max_level: int, neck: str):
        super().__init__()
        self.backbone_levels = backbone_levels_for(input_shape, min_level, max_level, neck)
        self.max_level = max_level
        self.extra = (ExtraInputLevels(c5_channels=input_shape["c5"].channels,
                                       out_channels=out_channels, max_level=max_level)
                      if max_level > 5 else None)
        self.channels = {k: input_shape[f"c{k}"].channels for k in self.backbone_levels}
        self.channels.update({k: out_channels for k in range(6, max_level + 1)})

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[int, torch.Tensor]:
        inputs = {k: features[f"c{k}"] for k in self.backbone_levels}
        if self.extra is not None:
            inputs.update(zip(range(6, self.max_level + 1), self.extra(features["c5"])))
        return inputs
