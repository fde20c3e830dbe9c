"""Box <-> delta encoding of R-CNN / RetinaNet (same arithmetic as torchvision's BoxCoder)."""
import math
from typing import Sequence

import torch

__all__ = ["BoxCoder"]


class BoxCoder:
    """Encodes XYXY ``boxes`` relative to XYXY ``anchors`` as weighted (dx, dy, dw, dh):
    ``dx = wx * (cx - cx_a) / w_a``, ``dw = ww * log(w / w_a)`` (same for y/h).

    Args:
        weights: (wx, wy, ww, wh).
        scale_clamp: upper bound of dw/dh before ``exp`` when decoding, so huge deltas stay finite.
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = math.log(1000.0 / 16)):
        if len(weights) != 4 or min(weights) <= 0:
            raise ValueError(f"MODEL.RETINANET.BBOX_REG_WEIGHTS={list(weights)} must be 4 positive "
                             "numbers")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(R, 4) deltas that turn ``anchors`` (R, 4) into ``boxes`` (R, 4)."""
        anchors = anchors.to(boxes.dtype)
        wx, wy, ww, wh = self.weights
        anchor_widths = anchors[:, 2] - anchors[:, 0]
        anchor_heights = anchors[:, 3] - anchors[:, 1]
        anchor_ctr_x = anchors[:, 0] + 0.5 * anchor_widths
        anchor_ctr_y = anchors[:, 1] + 0.5 * anchor_heights
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        dx = wx * (ctr_x - anchor_ctr_x) / anchor_widths
        dy = wy * (ctr_y - anchor_ctr_y) / anchor_heights
        dw = ww * torch.log(widths / anchor_widths)
        dh = wh * torch.log(heights / anchor_heights)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(R, 4) XYXY boxes from ``deltas`` (R, 4) applied to ``anchors`` (R, 4)."""
        anchors = anchors.to(deltas.dtype)
        widths = anchors[:, 2] - anchors[:, 0]
        heights = anchors[:, 3] - anchors[:, 1]
        ctr_x = anchors[:, 0] + 0.5 * widths
        ctr_y = anchors[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0] / wx
        dy = deltas[:, 1] / wy
        dw = torch.clamp(deltas[:, 2] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3] / wh, max=self.scale_clamp)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths)
        half_h = 0.5 * (torch.exp(dh) * heights)
        return torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h,
                            pred_ctr_x + half_w, pred_ctr_y + half_h), dim=1)
