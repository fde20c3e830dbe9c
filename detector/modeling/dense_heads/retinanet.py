"""RetinaNet head: a classification and a box subnet, shared across pyramid levels."""
import math
from functools import partial
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from detector.layers import (
    ConvNormAct,
    NormSpec,
    ShapeSpec,
    as_norm_spec,
    conv_forward,
    fused_conv_norm_act,
    has_batch_statistics,
)

from .build import DENSE_HEAD_REGISTRY

__all__ = ["RetinaNetHead"]


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # the fused oneDNN kernel also spares small levels PyTorch's slow batch-1 conv path
    fused = fused_conv_norm_act(x, conv)
    return conv_forward(conv, x) if fused is None else fused


@DENSE_HEAD_REGISTRY.register()
class RetinaNetHead(nn.Module):
    """Each subnet is ``num_convs`` x (3x3 conv [+ norm] + ReLU) followed by a 3x3 predictor.

    Args:
        in_channels: channels of every pyramid level.
        num_anchors: anchors per location A.
        num_classes: foreground classes K.
        num_convs: convs per subnet before the predictor.
        norm: norm of the subnet convs (a :class:`detector.layers.NormSpec`, or a name). The convs
            are shared across levels. Norms with batch statistics (BN, SyncBN, FrozenBN,
            EvoNormB0) are kept per level, as EfficientDet does, because feature statistics differ
            between levels: ``cls_norms[level][conv]`` / ``bbox_norms[level][conv]``. Per-sample
            norms (GN, EvoNormS0) are shared like the convs, as in the RetinaNet/GN papers
            (``cls_subnet[conv][1]``). "SN" spectral-normalizes the subnet convs (not the
            predictors). EvoNorm layers include the activation, so the ReLU is dropped.
        prior_prob: initial foreground probability of every class (sets the classifier bias).
        num_levels: number of pyramid levels fed to ``forward``; required by per-level norms.

    ``forward(features)`` returns raw per-level lists ``pred_logits`` (N, A*K, H, W) and
    ``pred_anchor_deltas`` (N, A*4, H, W).
    """

    def __init__(self, *, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 norm="", prior_prob: float = 0.01, num_levels: Optional[int] = None):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"MODEL.RETINANET.NUM_CLASSES={num_classes} must be positive")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"MODEL.RETINANET.PRIOR_PROB={prior_prob} must be in (0, 1)")
        spec = as_norm_spec(norm, "MODEL.RETINANET.NORM")
        probe = spec.layer(in_channels, activation=True)
        self.norm_per_level = probe is not None and has_batch_statistics(probe)
        if self.norm_per_level and (num_levels is None or num_levels <= 0):
            raise ValueError(f"{spec.key}='{spec.name}' keeps statistics per pyramid level: "
                             f"RetinaNetHead needs num_levels (got {num_levels})")
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_anchors = num_anchors

        conv = partial(ConvNormAct, in_channels, in_channels, 3, norm=spec,
                       weight_init=partial(nn.init.normal_, std=0.01),
                       build_norm=not self.norm_per_level)
        self.cls_subnet = nn.ModuleList([conv() for _ in range(num_convs)])
        self.bbox_subnet = nn.ModuleList([conv() for _ in range(num_convs)])
        if self.norm_per_level:
            self.cls_norms = self._norms_per_level(self.cls_subnet, num_levels)
            self.bbox_norms = self._norms_per_level(self.bbox_subnet, num_levels)
        else:
            self.cls_norms = self.bbox_norms = None
        self.cls_score = nn.Conv2d(in_channels, num_anchors * num_classes, kernel_size=3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=3, padding=1)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        # every class starts at probability prior_prob, so background dominates the early loss less
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shapes: List[ShapeSpec], num_anchors: int) -> dict:
        channels = {s.channels for s in input_shapes}
        if len(channels) != 1:
            raise ValueError(f"RetinaNetHead is shared across levels and needs equal channels on "
                             f"every level, the neck gives {input_shapes}")
        r = cfg.MODEL.RETINANET
        return {
            "in_channels": channels.pop(),
            "num_anchors": num_anchors,
            "num_classes": r.NUM_CLASSES,
            "num_convs": r.NUM_CONVS,
            "norm": NormSpec.from_config(cfg, r.NORM, key="MODEL.RETINANET.NORM"),
            "prior_prob": r.PRIOR_PROB,
            "num_levels": len(input_shapes),
        }

    @staticmethod
    def _norms_per_level(subnet: nn.ModuleList, num_levels: int) -> nn.ModuleList:
        return nn.ModuleList([
            nn.ModuleList([block.make_norm() for block in subnet]) for _ in range(num_levels)])

    @staticmethod
    def _run_subnet(x: torch.Tensor, subnet: nn.ModuleList,
                    norms: Optional[nn.ModuleList]) -> torch.Tensor:
        for i, block in enumerate(subnet):
            x = block(x) if norms is None else block(x, norms[i])
        return x

    def forward(self, features: List[torch.Tensor]
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        if self.norm_per_level and len(features) != self.num_levels:
            raise ValueError(f"RetinaNetHead has per-level norms for {self.num_levels} levels "
                             f"(MODEL.RETINANET.NORM), got {len(features)} feature maps")
        pred_logits, pred_anchor_deltas = [], []
        # spectral-normalized weights are computed once per forward, not once per level
        with parametrize.cached():
            for level, x in enumerate(features):
                cls_norms = self.cls_norms[level] if self.norm_per_level else None
                bbox_norms = self.bbox_norms[level] if self.norm_per_level else None
                pred_logits.append(_conv(self.cls_score,
                                         self._run_subnet(x, self.cls_subnet, cls_norms)))
                pred_anchor_deltas.append(
                    _conv(self.bbox_pred, self._run_subnet(x, self.bbox_subnet, bbox_norms)))
        return pred_logits, pred_anchor_deltas
