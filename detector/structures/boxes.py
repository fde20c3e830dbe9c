"""Axis-aligned boxes in absolute XYXY pixel coordinates."""
from typing import List, Tuple

import torch
from torchvision.ops import box_iou

__all__ = ["Boxes", "pairwise_iou", "xywh_to_xyxy", "xyxy_to_xywh"]


def xywh_to_xyxy(boxes_xywh: torch.Tensor) -> torch.Tensor:
    x, y, w, h = boxes_xywh.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def xyxy_to_xywh(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes_xyxy.unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=-1)


class Boxes:
    """An (N, 4) float tensor of XYXY boxes with the operations detection needs."""

    def __init__(self, tensor: torch.Tensor):
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(tensor, dtype=torch.float32)
        if tensor.numel() == 0:
            tensor = tensor.reshape(0, 4).to(dtype=torch.float32)
        if tensor.dim() != 2 or tensor.size(-1) != 4:
            raise ValueError(f"Boxes expects an (N, 4) tensor, got shape {tuple(tensor.shape)}")
        self.tensor = tensor

    def clone(self) -> "Boxes":
        return Boxes(self.tensor.clone())

    def to(self, device) -> "Boxes":
        return Boxes(self.tensor.to(device))

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def area(self) -> torch.Tensor:
        b = self.tensor
        return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)

    def clip(self, image_size: Tuple[int, int]) -> None:
        """Clip in place to an image of (height, width)."""
        h, w = image_size
        x1 = self.tensor[:, 0].clamp(min=0, max=w)
        y1 = self.tensor[:, 1].clamp(min=0, max=h)
        x2 = self.tensor[:, 2].clamp(min=0, max=w)
        y2 = self.tensor[:, 3].clamp(min=0, max=h)
        self.tensor = torch.stack((x1, y1, x2, y2), dim=-1)

    def nonempty(self, threshold: float = 0.0) -> torch.Tensor:
        """Mask of boxes wider and taller than ``threshold``."""
        b = self.tensor
        return ((b[:, 2] - b[:, 0]) > threshold) & ((b[:, 3] - b[:, 1]) > threshold)

    def is_finite(self) -> torch.Tensor:
        return torch.isfinite(self.tensor).all(dim=1)

    def scale(self, scale_x: float, scale_y: float) -> None:
        self.tensor[:, 0::2] *= scale_x
        self.tensor[:, 1::2] *= scale_y

    def get_centers(self) -> torch.Tensor:
        return (self.tensor[:, :2] + self.tensor[:, 2:]) / 2

    def __getitem__(self, item) -> "Boxes":
        if isinstance(item, int):
            return Boxes(self.tensor[item].view(1, -1))
        b = self.tensor[item]
        return Boxes(b.view(-1, 4))

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __repr__(self) -> str:
        return f"Boxes({self.tensor})"

    def __iter__(self):
        yield from self.tensor

    @classmethod
    def cat(cls, boxes_list: List["Boxes"]) -> "Boxes":
        if len(boxes_list) == 0:
            return cls(torch.empty(0, 4))
        return cls(torch.cat([b.tensor for b in boxes_list], dim=0))


def pairwise_iou(boxes1: Boxes, boxes2: Boxes) -> torch.Tensor:
    """(N, M) IoU matrix between two sets of boxes; 0 where a box has no area."""
    if len(boxes1) == 0 or len(boxes2) == 0:
        return boxes1.tensor.new_zeros(len(boxes1), len(boxes2))
    iou = box_iou(boxes1.tensor, boxes2.tensor)
    return torch.nan_to_num(iou, nan=0.0)


def pairwise_ioa(boxes1: Boxes, boxes2: Boxes) -> torch.Tensor:
    """(N, M) intersection over the area of each box of ``boxes1`` ("intersection over anchor"):
    the fraction of ``boxes1[i]`` that ``boxes2[j]`` covers; 0 where ``boxes1[i]`` has no area.
    torchvision.ops has IoU variants but no IoA."""
    a, b = boxes1.tensor, boxes2.tensor
    if len(a) == 0 or len(b) == 0:
        return a.new_zeros(len(a), len(b))
    width = (torch.min(a[:, None, 2], b[None, :, 2]) - torch.max(a[:, None, 0], b[None, :, 0]))
    height = (torch.min(a[:, None, 3], b[None, :, 3]) - torch.max(a[:, None, 1], b[None, :, 1]))
    intersection = width.clamp(min=0) * height.clamp(min=0)
    area = boxes1.area()[:, None]
    return torch.where(area > 0, intersection / area.clamp(min=1e-12), torch.zeros_like(intersection))
