"""RetinaNet head: a classification and a box subnet, shared across pyramid levels."""
import math
from typing import List, Tuple

import torch
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from .common import norm_factory

__all__ = ["RetinaNetHead"]


class RetinaNetHead(nn.Module):
    """Each subnet is ``num_convs`` x (3x3 conv [+ norm] + ReLU) followed by a 3x3 predictor.

    Args:
        in_channels: channels of every pyramid level.
        num_anchors: anchors per location A.
        num_classes: foreground classes K.
        num_convs: convs per subnet before the predictor.
        norm: norm of the subnet convs ("" none, "GN", ...). Norm layers are shared across
            levels like the convs.
        prior_prob: initial foreground probability of every class (sets the classifier bias).

    ``forward(features)`` returns raw per-level lists ``pred_logits`` (N, A*K, H, W) and
    ``pred_anchor_deltas`` (N, A*4, H, W).
    """

    def __init__(self, *, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 norm: str = "", prior_prob: float = 0.01, gn_groups: int = 32,
                 bn_momentum: float = 0.1, bn_eps: float = 1e-5):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"MODEL.RETINANET.NUM_CLASSES={num_classes} must be positive")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"MODEL.RETINANET.PRIOR_PROB={prior_prob} must be in (0, 1)")
        make_norm = norm_factory(norm, gn_groups=gn_groups, bn_momentum=bn_momentum,
                                 bn_eps=bn_eps, key="MODEL.RETINANET.NORM")
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.cls_subnet = nn.Sequential(*[
            Conv2dNormActivation(in_channels, in_channels, kernel_size=3, norm_layer=make_norm)
            for _ in range(num_convs)])
        self.bbox_subnet = nn.Sequential(*[
            Conv2dNormActivation(in_channels, in_channels, kernel_size=3, norm_layer=make_norm)
            for _ in range(num_convs)])
        self.cls_score = nn.Conv2d(in_channels, num_anchors * num_classes, kernel_size=3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=3, padding=1)

        for module in [self.cls_subnet, self.bbox_subnet, self.cls_score, self.bbox_pred]:
            for layer in module.modules():
                if isinstance(layer, nn.Conv2d):
                    nn.init.normal_(layer.weight, std=0.01)
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)
        # every class starts at probability prior_prob, so background dominates the early loss less
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: List[torch.Tensor]
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        pred_logits = [self.cls_score(self.cls_subnet(x)) for x in features]
        pred_anchor_deltas = [self.bbox_pred(self.bbox_subnet(x)) for x in features]
        return pred_logits, pred_anchor_deltas
