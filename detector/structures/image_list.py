"""A batch of differently sized images padded into one tensor."""
from typing import List, Tuple

import torch
import torch.nn.functional as F

__all__ = ["ImageList"]


class ImageList:
    """``tensor`` is (N, C, H, W) padded; ``image_sizes[i]`` is the (h, w) of image i before padding."""

    def __init__(self, tensor: torch.Tensor, image_sizes: List[Tuple[int, int]]):
        self.tensor = tensor
        self.image_sizes = image_sizes

    def __len__(self) -> int:
        return len(self.image_sizes)

    def __getitem__(self, idx) -> torch.Tensor:
        h, w = self.image_sizes[idx]
        return self.tensor[idx, ..., :h, :w]

    def to(self, device) -> "ImageList":
        return ImageList(self.tensor.to(device), self.image_sizes)

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @staticmethod
    def from_tensors(
        tensors: List[torch.Tensor], size_divisibility: int = 0, pad_value: float = 0.0
    ) -> "ImageList":
        """Pad (C, H, W) tensors at the bottom/right to a common size that is a multiple of
        ``size_divisibility`` (when > 1)."""
        if len(tensors) == 0:
            raise ValueError("ImageList.from_tensors needs at least one image")
        for t in tensors:
            if t.dim() != 3 or t.shape[0] != tensors[0].shape[0]:
                raise ValueError(f"Expected (C, H, W) images with equal C, got {tuple(t.shape)}")
        image_sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        max_h = max(s[0] for s in image_sizes)
        max_w = max(s[1] for s in image_sizes)
        if size_divisibility > 1:
            d = size_divisibility
            max_h = (max_h + d - 1) // d * d
            max_w = (max_w + d - 1) // d * d
        if len(tensors) == 1:
            h, w = image_sizes[0]
            batched = F.pad(tensors[0], (0, max_w - w, 0, max_h - h), value=pad_value)[None]
        else:
            batched = tensors[0].new_full((len(tensors), tensors[0].shape[0], max_h, max_w), pad_value)
            for img, pad_img in zip(tensors, batched):
                pad_img[..., : img.shape[-2], : img.shape[-1]].copy_(img)
        return ImageList(batched.contiguous(), image_sizes)
