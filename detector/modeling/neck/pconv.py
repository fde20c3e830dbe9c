"""Pyramid convolution (SEPC, Wang et al. 2020) in the simplified form the object_detection2
TensorFlow framework trained: no deformable convs, no integrated BN.

As in the original, PConv takes the place of the FPN: it is a neck on the backbone features, not
a stage after an FPN. Each input level ``c<k>`` first gets a 1x1 projection to ``out_channels``
(with bias, no norm, no activation). Then ``num_convs`` repeats each replace every level by a
sum of three branches, each a 1x1 conv + norm + ReLU::

    p<k> <- avgpool2x2(finer(p<k-1>)) + same(p<k>) + up(coarser(p<k+1>))

(the branches whose neighbour level does not exist are left out); ``avgpool2x2`` is a 2x2
stride-2 average pool (odd sizes round up and average the valid pixels, as TF's "SAME"), ``up``
nearest upsampling. Within a repeat the three convs, and their norm layers, are shared by all
levels (the original reused the same variables at every level).

Differences from the original: its "finer" 1x1 conv was declared with dilation 2, which does
nothing for a 1x1 kernel and is left out. Levels above 5 were left to backbone hooks there; here
they are inputs made from ``c5`` as RetinaNet makes P6/P7 (see
:class:`detector.modeling.neck.pyramid_inputs.ExtraInputLevels`), so every level takes part in the
pyramid convolution as in SEPC's P3-P7.
"""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from detector.layers import ConvNormAct, NormSpec, ShapeSpec, as_norm_spec, glorot_uniform_

from .build import NECK_REGISTRY, neck_options
from .pyramid_inputs import PyramidInputs, check_same_size

__all__ = ["PConvNeck", "PConv", "PyramidConv"]


class PyramidConv(nn.Module):
    """One repeat: three 1x1 conv + norm + ReLU branches shared by all levels."""

    def __init__(self, channels: int, *, norm: NormSpec, min_level: int = 0):
        super().__init__()
        self.min_level = min_level  # names levels in errors

        def branch():
            return ConvNormAct(channels, channels, 1, norm=norm, activation=nn.ReLU,
                               weight_init=glorot_uniform_)

        self.finer, self.same, self.coarser = branch(), branch(), branch()

    def forward(self, levels: list) -> list:
        outputs = []
        for i, x in enumerate(levels):
            parts = []
            if i > 0:
                pooled = F.avg_pool2d(self.finer(levels[i - 1]), kernel_size=2, stride=2,
                                      ceil_mode=True)
                level = self.min_level + i
                parts.append(check_same_size(pooled, x, f"PConv p{level - 1} -> p{level}"))
            parts.append(self.same(x))
            if i + 1 < len(levels):
                parts.append(F.interpolate(self.coarser(levels[i + 1]), size=x.shape[-2:],
                                           mode="nearest"))
            out = parts[0]
            for part in parts[1:]:
                out = out + part
            outputs.append(out)
        return outputs


class PConvNeck(nn.Module):
    """Args:
        input_shape: backbone output shapes; needs ``c<min_level>``..``c<min(5, max_level)>``
            (and ``c5`` when ``max_level`` > 5).
        out_channels: channels of every output level.
        min_level, max_level: output levels ``p<min_level>``..``p<max_level>``.
        num_convs: stacked pyramid convolutions (0 leaves the projections alone).
        norm: norm of the pyramid convolutions' branches, a :class:`detector.layers.NormSpec`
            or a name ("" none); the projections have none.
    """

    def __init__(self, *, input_shape: Dict[str, ShapeSpec], out_channels: int = 256,
                 min_level: int = 3, max_level: int = 7, num_convs: int = 4, norm=""):
        super().__init__()
        if out_channels <= 0 or num_convs < 0:
            raise ValueError(f"MODEL.NECK.OUT_CHANNELS={out_channels} must be positive and "
                             f"MODEL.PCONV.NUM_CONVS={num_convs} non-negative")
        self.inputs = PyramidInputs(input_shape=input_shape, out_channels=out_channels,
                                    min_level=min_level, max_level=max_level, neck="PConv")
        self.out_channels = out_channels
        self.levels = list(range(min_level, max_level + 1))
        spec = as_norm_spec(norm, "MODEL.NECK.NORM")
        in_channels = self.inputs.channels
        self.projections = nn.ModuleDict({
            f"p{k}": ConvNormAct(in_channels[k], out_channels, 1, norm="", activation=None,
                                 weight_init=glorot_uniform_)
            for k in self.levels})
        self.pyramid_convs = nn.ModuleList(PyramidConv(out_channels, norm=spec, min_level=min_level)
                                           for _ in range(num_convs))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {f"p{k}": ShapeSpec(channels=self.out_channels, stride=2 ** k)
                for k in self.levels}

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        inputs = self.inputs(features)
        x = [self.projections[f"p{k}"](inputs[k]) for k in self.levels]
        for pyramid_conv in self.pyramid_convs:
            x = pyramid_conv(x)
        return {f"p{k}": t for k, t in zip(self.levels, x)}

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> dict:
        return {"input_shape": input_shape, "num_convs": cfg.MODEL.PCONV.NUM_CONVS,
                **neck_options(cfg)}


@NECK_REGISTRY.register()
def PConv(cfg, input_shape: Dict[str, ShapeSpec]) -> PConvNeck:
    """PConv from ``MODEL.NECK`` (channels, norm, levels) and ``MODEL.PCONV.NUM_CONVS`` on top
    of the backbone features described by ``input_shape``."""
    return PConvNeck(**PConvNeck.from_config(cfg, input_shape))
