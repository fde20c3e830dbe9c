"""The RPN head of Faster / Mask R-CNN: shared 3x3 conv(s) + ReLU, then 1x1 objectness and box
delta predictors, applied to every pyramid level with the same weights."""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detector.layers import ShapeSpec

from .build import DENSE_HEAD_REGISTRY

__all__ = ["StandardRPNHead"]


@DENSE_HEAD_REGISTRY.register()
class StandardRPNHead(nn.Module):
    """Args:
        in_channels: channels of every pyramid level.
        num_anchors: anchors per location A.
        conv_dims: output channels of each hidden 3x3 conv (+ ReLU); -1 = ``in_channels``.
            ``[-1]`` is the single conv of detectron2's and torchvision's head; an empty list
            puts the predictors directly on the features.

    ``forward(features)`` returns per-level ``pred_logits`` (N, A, H, W) (one objectness logit
    per anchor, so ``num_classes`` is 1) and ``pred_anchor_deltas`` (N, A*4, H, W).
    Parameters: ``convs.<i>``, ``objectness_logits``, ``anchor_deltas``.
    """

    num_classes = 1

    def __init__(self, *, in_channels: int, num_anchors: int, conv_dims: Sequence[int] = (-1,)):
        super().__init__()
        if num_anchors <= 0:
            raise ValueError(f"StandardRPNHead needs a positive number of anchors per location, "
                             f"got {num_anchors}")
        dims = [in_channels if d == -1 else int(d) for d in conv_dims]
        if any(d <= 0 for d in dims):
            raise ValueError(f"MODEL.RPN.CONV_DIMS={list(conv_dims)} must be positive or -1")
        self.num_anchors = num_anchors
        self.convs = nn.ModuleList()
        channels = in_channels
        for dim in dims:
            self.convs.append(nn.Conv2d(channels, dim, kernel_size=3, padding=1))
            channels = dim
        self.objectness_logits = nn.Conv2d(channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(channels, num_anchors * 4, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, cfg, input_shapes: List[ShapeSpec], num_anchors: int) -> dict:
        channels = {s.channels for s in input_shapes}
        if len(channels) != 1:
            raise ValueError(f"StandardRPNHead is shared across levels and needs equal channels "
                             f"on every level of MODEL.RPN.IN_FEATURES, got {input_shapes}")
        return {
            "in_channels": channels.pop(),
            "num_anchors": num_anchors,
            "conv_dims": list(cfg.MODEL.RPN.CONV_DIMS),
        }

    def forward(self, features: List[torch.Tensor]
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        pred_logits, pred_anchor_deltas = [], []
        for x in features:
            for conv in self.convs:
                x = F.relu(conv(x))
            pred_logits.append(self.objectness_logits(x))
            pred_anchor_deltas.append(self.anchor_deltas(x))
        return pred_logits, pred_anchor_deltas
