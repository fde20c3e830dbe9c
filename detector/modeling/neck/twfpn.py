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
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from detector.layers import (
    ConvNormAct,
    NormalizedFusion,
    SeparableConvNormAct,
    ShapeSpec,
    as_norm_spec,
    check_layer_norm,
    glorot_uniform_,
)

from .build import NECK_REGISTRY, neck_options
from .pyramid_inputs import PyramidInputs, check_same_size

__all__ = ["TwoWayFPNNeck", "TwoWayFPN"]


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
        self.inputs = PyramidInputs(input_shape=input_shape, out_channels=out_channels,
                                    min_level=min_level, max_level=max_level, neck="TwoWayFPN")
        self.out_channels = out_channels
        self.levels = list(range(min_level, max_level + 1))
        spec = check_layer_norm(as_norm_spec(norm, "MODEL.NECK.NORM"))
        in_channels = self.inputs.channels

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
        inputs = self.inputs(features)
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
        return {"input_shape": input_shape, **neck_options(cfg)}


@NECK_REGISTRY.register()
def TwoWayFPN(cfg, input_shape: Dict[str, ShapeSpec]) -> TwoWayFPNNeck:
    """Two-way FPN from ``MODEL.NECK`` (channels, norm, levels) on top of the backbone
    features described by ``input_shape``."""
    return TwoWayFPNNeck(**TwoWayFPNNeck.from_config(cfg, input_shape))
