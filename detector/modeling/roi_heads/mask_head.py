"""Mask branch of the RoI heads: convs on pooled features, a 2x transposed conv and per-class
mask logits, and the test-time choice of the predicted class's mask.

Class layout: K mask channels, class c at channel c (torchvision's predictor has K + 1 with
background at 0; its channel 0 is dropped when converting).
"""
from functools import partial
from typing import List, Sequence

import torch
from torch import nn

from detector.layers import ConvNormAct, NormSpec
from detector.structures import Instances

from .build import ROI_MASK_HEAD_REGISTRY

__all__ = ["MaskRCNNConvUpsampleHead", "mask_rcnn_inference"]

_msra_fill = partial(nn.init.kaiming_normal_, mode="fan_out", nonlinearity="relu")


@ROI_MASK_HEAD_REGISTRY.register()
class MaskRCNNConvUpsampleHead(nn.Module):
    """``mask_fcn1..n``: 3x3 conv-norm-ReLU blocks, ``deconv``: 2x2 stride-2 transposed conv +
    ReLU, ``predictor``: 1x1 conv to K per-class (or 1 class-agnostic) mask logits, so an S x S
    pooled feature gives 2S x 2S masks (14 -> 28).

    Args:
        in_channels: C of the pooled features.
        conv_dims: channels of each 3x3 conv, then of the transposed conv (last entry).
        norm: norm of the 3x3 convs.
    """

    def __init__(self, *, in_channels: int, num_classes: int,
                 conv_dims: Sequence[int] = (256, 256, 256, 256, 256),
                 norm: NormSpec = NormSpec(), cls_agnostic_mask: bool = False):
        super().__init__()
        if len(conv_dims) < 1:
            raise ValueError("MaskRCNNConvUpsampleHead needs at least the transposed conv's "
                             "channels in conv_dims")
        channels = in_channels
        self.num_convs = len(conv_dims) - 1
        for i, dim in enumerate(conv_dims[:-1], start=1):
            self.add_module(f"mask_fcn{i}", ConvNormAct(channels, dim, 3, norm=norm,
                                                        weight_init=_msra_fill))
            channels = dim
        self.deconv = nn.ConvTranspose2d(channels, conv_dims[-1], kernel_size=2, stride=2)
        self.predictor = nn.Conv2d(conv_dims[-1], 1 if cls_agnostic_mask else num_classes, 1)
        _msra_fill(self.deconv.weight)
        nn.init.zeros_(self.deconv.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_config(cls, cfg, in_channels: int, num_classes: int) -> dict:
        h = cfg.MODEL.ROI_MASK_HEAD
        if h.NUM_CONV < 0:
            raise ValueError(f"MODEL.ROI_MASK_HEAD.NUM_CONV={h.NUM_CONV} must be >= 0")
        return {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "conv_dims": [h.CONV_DIM] * (h.NUM_CONV + 1),
            "norm": NormSpec.from_config(cfg, h.NORM, key="MODEL.ROI_MASK_HEAD.NORM"),
            "cls_agnostic_mask": h.CLS_AGNOSTIC_MASK,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, K or 1, 2S, 2S) mask logits (channels-last strides) of (R, C, S, S) features."""
        # oneDNN's channels-last kernels run these many-RoI 3x3 convs and above all the
        # transposed conv markedly faster on CPU; the head has no strided 1x1 conv, whose
        # channels-last weight gradient torch's CPU kernels get wrong
        x = x.contiguous(memory_format=torch.channels_last)
        for i in range(1, self.num_convs + 1):
            x = getattr(self, f"mask_fcn{i}")(x)
        x = torch.relu(self.deconv(x))
        return self.predictor(x)


def mask_rcnn_inference(mask_logits: torch.Tensor, detections: List[Instances]) -> None:
    """Sets ``pred_masks`` (R_i, 1, M, M) probabilities of each image's detections: the sigmoid
    of the mask logits of the predicted class. ``mask_logits`` are those of the concatenated
    detections' boxes."""
    if mask_logits.shape[1] == 1:
        chosen = mask_logits
    else:
        classes = torch.cat([d.pred_classes for d in detections])
        rows = torch.arange(mask_logits.shape[0], device=mask_logits.device)
        chosen = mask_logits[rows, classes][:, None]
    probs = chosen.sigmoid()
    for d, masks in zip(detections, probs.split([len(d) for d in detections])):
        d.pred_masks = masks
