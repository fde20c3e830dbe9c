"""EfficientDet head: class and box branches of separable convs shared across pyramid levels, with
one norm per level and conv (the convs see every level, the statistics do not mix)."""
import math
from typing import List, Tuple

import torch
from timm.layers import drop_path
from torch import nn

from detector.layers import (
    NormSpec,
    SeparableConv2d,
    ShapeSpec,
    as_norm_spec,
    check_layer_norm,
    check_padding_mode,
    make_activation,
    variance_scaling_,
)

from .build import DENSE_HEAD_REGISTRY

__all__ = ["EfficientDetHead"]


@DENSE_HEAD_REGISTRY.register()
class EfficientDetHead(nn.Module):
    """Each branch is ``num_convs`` x (separable 3x3 conv -> per-level norm -> activation)
    followed by a separable 3x3 predictor.

    Args:
        in_channels: channels of every level. num_levels: pyramid levels fed to ``forward``.
        num_anchors: anchors per location A. num_classes: foreground classes K.
        norm: a :class:`detector.layers.NormSpec` (or a name: "BN", "SyncBN", "GN",
            "EvoNormS0"..., "" none); not "SN". act: "swish", "relu" or "" (e.g. with EvoNorm,
            which is its own activation).
        drop_path_rate: drop connect of TF EfficientDet's heads: convs 2..n become residual
            blocks whose branch is dropped per sample with this probability while training.
        redundant_bias: bias on the convs followed by a norm (TF models have it).
        prior_prob: initial probability of every class (sets the predictor bias).

    ``forward(features)`` returns per-level ``pred_logits`` (N, A*K, H, W) and
    ``pred_anchor_deltas`` (N, A*4, H, W), deltas per anchor ordered (dx, dy, dw, dh).
    """

    def __init__(self, *, in_channels: int, num_levels: int, num_anchors: int, num_classes: int,
                 num_convs: int = 3, norm="BN", act: str = "swish",
                 padding_mode: str = "same", redundant_bias: bool = True,
                 prior_prob: float = 0.01, drop_path_rate: float = 0.0):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"MODEL.EFFICIENTDET.NUM_CLASSES={num_classes} must be positive")
        if num_convs <= 0:
            raise ValueError(f"MODEL.EFFICIENTDET.NUM_HEAD_CONVS={num_convs} must be positive")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"MODEL.EFFICIENTDET.PRIOR_PROB={prior_prob} must be in (0, 1)")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"MODEL.EFFICIENTDET.HEAD_DROP_PATH_RATE={drop_path_rate} must be "
                             "in [0, 1)")
        check_padding_mode(padding_mode, "MODEL.EFFICIENTDET.PADDING")
        spec = check_layer_norm(as_norm_spec(norm, "MODEL.EFFICIENTDET.HEAD_NORM"))
        self.num_classes, self.num_anchors, self.num_levels = num_classes, num_anchors, num_levels
        self.drop_path_rate = drop_path_rate
        activation = make_activation(act, "MODEL.EFFICIENTDET.HEAD_ACT")
        # a norm-activation layer (EvoNorm) built for an activated block replaces norm + act
        probe = spec.layer(in_channels, activation=activation is not None)
        if probe is not None and getattr(probe, "applies_activation", False):
            activation = None
        conv_bias = redundant_bias or probe is None

        def branch():
            convs = nn.ModuleList([SeparableConv2d(in_channels, in_channels, bias=conv_bias,
                                                   padding_mode=padding_mode)
                                   for _ in range(num_convs)])
            norms = nn.ModuleList([
                nn.ModuleList([spec.layer(in_channels, activation=act != "") or nn.Identity()
                               for _ in range(num_levels)])
                for _ in range(num_convs)])
            return convs, norms

        self.cls_subnet, self.cls_norms = branch()
        self.bbox_subnet, self.bbox_norms = branch()
        self.cls_score = SeparableConv2d(in_channels, num_anchors * num_classes,
                                         padding_mode=padding_mode)
        self.bbox_pred = SeparableConv2d(in_channels, num_anchors * 4, padding_mode=padding_mode)
        self.act = activation or nn.Identity()

        for m in self.modules():
            if isinstance(m, SeparableConv2d):
                variance_scaling_(m.conv_dw.weight)
                variance_scaling_(m.conv_pw.weight)
                if m.conv_pw.bias is not None:
                    nn.init.zeros_(m.conv_pw.bias)
        # every class starts at probability prior_prob, so background dominates the early loss less
        nn.init.constant_(self.cls_score.conv_pw.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shapes: List[ShapeSpec], num_anchors: int) -> dict:
        """Sizes (``NUM_HEAD_CONVS``) must be resolved already: EfficientDet fills them from the
        compound coefficient (:mod:`detector.modeling.meta_arch.efficientdet_sizes`)."""
        channels = {s.channels for s in input_shapes}
        if len(channels) != 1:
            raise ValueError(f"EfficientDetHead is shared across levels and needs equal channels "
                             f"on every level, the neck gives {input_shapes}")
        e = cfg.MODEL.EFFICIENTDET
        if e.NUM_HEAD_CONVS <= 0:
            raise ValueError(f"MODEL.EFFICIENTDET.NUM_HEAD_CONVS={e.NUM_HEAD_CONVS} must be "
                             "positive (EfficientDet sets it from COMPOUND_COEF when 0)")
        return {
            "in_channels": channels.pop(),
            "num_levels": len(input_shapes),
            "num_anchors": num_anchors,
            "num_classes": e.NUM_CLASSES,
            "num_convs": e.NUM_HEAD_CONVS,
            "norm": NormSpec.from_config(cfg, e.HEAD_NORM, key="MODEL.EFFICIENTDET.HEAD_NORM"),
            "act": e.HEAD_ACT,
            "padding_mode": e.PADDING,
            "redundant_bias": e.REDUNDANT_BIAS,
            "prior_prob": e.PRIOR_PROB,
            "drop_path_rate": e.HEAD_DROP_PATH_RATE,
        }

    def _branch(self, x: torch.Tensor, level: int, convs: nn.ModuleList, norms: nn.ModuleList,
                predictor: nn.Module) -> torch.Tensor:
        for i, conv in enumerate(convs):
            residual = x
            x = conv(x, norms[i][level], self.act)
            if i > 0 and self.drop_path_rate > 0:
                x = drop_path(x, self.drop_path_rate, self.training) + residual
        return predictor(x)

    def forward(self, features: List[torch.Tensor]
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        if len(features) != self.num_levels:
            raise ValueError(f"EfficientDetHead was built for {self.num_levels} levels, got "
                             f"{len(features)}")
        pred_logits = [self._branch(x, level, self.cls_subnet, self.cls_norms, self.cls_score)
                       for level, x in enumerate(features)]
        pred_deltas = [self._branch(x, level, self.bbox_subnet, self.bbox_norms, self.bbox_pred)
                       for level, x in enumerate(features)]
        return pred_logits, pred_deltas
