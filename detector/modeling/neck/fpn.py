"""Feature Pyramid Network (Lin et al. 2017) with RetinaNet's extra P6/P7 or Mask R-CNN's P6.

Levels ``min_level``..5 come from the backbone's ``c<k>`` through a 1x1 lateral conv, the top-down
path (nearest upsampling to the lateral's size, then add) and a 3x3 output conv. Levels above 5 come
from the top block. "conv" (RetinaNet): P6 is a 3x3 stride-2 conv on ``p5`` (torchvision v1) or
``c5`` (paper, detectron2), each further level is ReLU then a 3x3 stride-2 conv on the previous
one. "maxpool" (Mask R-CNN): P6 alone, ``p5`` subsampled by a kernel-1 stride-2 max-pool, as
torchvision's ``LastLevelMaxPool`` and detectron2's ``LastLevelMaxPool``.

The lateral and output convs take the neck's norm through :class:`detector.layers.ConvNormAct`
(no activation follows them, so EvoNorm is used without its nonlinearity); the top block has none.
"""
from functools import partial
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from detector.layers import ConvNormAct, ShapeSpec, as_norm_spec, fused_conv_norm_act

from .build import NECK_REGISTRY, neck_options

__all__ = ["FeaturePyramidNetwork", "FPN", "TOP_BLOCKS"]

TOP_BLOCKS = ("conv", "maxpool")


class FeaturePyramidNetwork(nn.Module):
    """Args:
        input_shape: backbone output shapes; must contain ``c<min_level>``..``c<min(5, max_level)>``
            (and ``c5`` when ``top_block_in`` is "c5" and ``max_level`` > 5).
        out_channels: channels of every output level.
        min_level, max_level: output levels ``p<min_level>``..``p<max_level>``.
        top_block: "conv" (stride-2 convs for every level above 5) or "maxpool" (P6 only, a
            parameter-free subsampling of P5; ``max_level`` must be 6).
        top_block_in: "p5" or "c5", the input of P6 (only "p5" with the "maxpool" block).
        norm: norm of the lateral and output convs, a :class:`detector.layers.NormSpec` or a
            name ("" for none); the top block has none.
    """

    def __init__(self, *, input_shape: Dict[str, ShapeSpec], out_channels: int = 256,
                 min_level: int = 3, max_level: int = 7, top_block: str = "conv",
                 top_block_in: str = "p5", norm=""):
        super().__init__()
        if not 1 <= min_level <= 5 or max_level < min_level:
            raise ValueError(f"MODEL.NECK.MIN_LEVEL={min_level}, MAX_LEVEL={max_level}: need "
                             "1 <= MIN_LEVEL <= 5 and MAX_LEVEL >= MIN_LEVEL")
        if top_block_in not in ("p5", "c5"):
            raise ValueError(f"MODEL.NECK.TOP_BLOCK_IN='{top_block_in}' must be 'p5' or 'c5'")
        if top_block not in TOP_BLOCKS:
            raise ValueError(f"MODEL.NECK.TOP_BLOCK='{top_block}' must be one of "
                             f"{list(TOP_BLOCKS)}")
        if top_block == "maxpool" and (max_level != 6 or top_block_in != "p5"):
            raise ValueError(f"MODEL.NECK.TOP_BLOCK='maxpool' makes P6 alone from P5: needs "
                             f"MAX_LEVEL=6 (got {max_level}) and TOP_BLOCK_IN='p5' "
                             f"(got '{top_block_in}')")
        backbone_levels = list(range(min_level, min(5, max_level) + 1))
        needed = [f"c{k}" for k in backbone_levels]
        if max_level > 5 and top_block_in == "c5":
            needed.append("c5")
        missing = sorted(set(needed) - set(input_shape))
        if missing:
            raise ValueError(
                f"FPN levels P{min_level}-P{max_level} (MODEL.NECK.MIN_LEVEL/MAX_LEVEL, "
                f"TOP_BLOCK_IN={top_block_in}) need backbone features {missing}; add them to "
                f"MODEL.BACKBONE.OUT_FEATURES (has {sorted(input_shape)})"
            )
        for k in backbone_levels:
            if input_shape[f"c{k}"].stride != 2 ** k:
                raise ValueError(f"Backbone feature c{k} has stride {input_shape[f'c{k}'].stride}, "
                                 f"expected {2 ** k}")
        self.min_level, self.max_level = min_level, max_level
        self.backbone_levels = backbone_levels
        self.top_block_name = top_block
        self.top_block_in = top_block_in
        self.out_channels = out_channels

        conv = partial(ConvNormAct, norm=as_norm_spec(norm, "MODEL.NECK.NORM"), activation=None,
                       weight_init=_init_weight_)
        self.lateral_convs = nn.ModuleDict()
        self.output_convs = nn.ModuleDict()
        for k in backbone_levels:
            self.lateral_convs[f"p{k}"] = conv(input_shape[f"c{k}"].channels, out_channels, 1)
            self.output_convs[f"p{k}"] = conv(out_channels, out_channels, 3)
        self.top_block = nn.ModuleDict()  # stays empty for "maxpool", which has no parameters
        conv_levels = range(6, max_level + 1) if top_block == "conv" else ()
        for k in conv_levels:
            from_c5 = k == 6 and top_block_in == "c5"
            in_ch = input_shape["c5"].channels if from_c5 else out_channels
            self.top_block[f"p{k}"] = nn.Conv2d(in_ch, out_channels, kernel_size=3, stride=2,
                                                padding=1)
            _init_weight_(self.top_block[f"p{k}"].weight)
            nn.init.zeros_(self.top_block[f"p{k}"].bias)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {f"p{k}": ShapeSpec(channels=self.out_channels, stride=2 ** k)
                for k in range(self.min_level, self.max_level + 1)}

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        results = {}
        top_down = None
        for k in reversed(self.backbone_levels):
            lateral = self.lateral_convs[f"p{k}"](features[f"c{k}"])
            if top_down is not None:
                lateral = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            top_down = lateral
            results[f"p{k}"] = self.output_convs[f"p{k}"](lateral)
        if self.top_block_name == "maxpool":
            # kernel 1, stride 2: every other row and column of P5, size ceil(P5 / 2)
            results["p6"] = F.max_pool2d(results["p5"], kernel_size=1, stride=2, padding=0)
        previous = None
        for k in self.top_block:
            if k == "p6":
                x = features["c5"] if self.top_block_in == "c5" else results["p5"]
            else:
                x = F.relu(previous)
            conv = self.top_block[k]
            previous = fused_conv_norm_act(x, conv)
            previous = conv(x) if previous is None else previous
            results[k] = previous
        return {f"p{k}": results[f"p{k}"] for k in range(self.min_level, self.max_level + 1)}

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> dict:
        return {"input_shape": input_shape, "top_block": cfg.MODEL.NECK.TOP_BLOCK,
                "top_block_in": cfg.MODEL.NECK.TOP_BLOCK_IN, **neck_options(cfg)}


def _init_weight_(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=1)


@NECK_REGISTRY.register()
def FPN(cfg, input_shape: Dict[str, ShapeSpec]) -> FeaturePyramidNetwork:
    """FPN from ``MODEL.NECK`` on top of the backbone features described by ``input_shape``."""
    return FeaturePyramidNetwork(**FeaturePyramidNetwork.from_config(cfg, input_shape))
