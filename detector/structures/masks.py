"""Per-instance masks of one image: ``BitMasks`` (a boolean (N, H, W) tensor) and ``PolygonMasks``
(per instance a list of polygons in absolute pixel coordinates).

Both index like tensors (an int, a slice, a bool or int64 tensor) so ``Instances`` keeps them
aligned with the boxes. Polygons and RLEs are rasterised by pycocotools (C code, the rasteriser of
the COCO evaluation), never pixel by pixel in Python."""
from typing import Any, Iterable, List, Sequence, Tuple

import numpy as np
import torch
from pycocotools import mask as mask_util

from .boxes import Boxes

__all__ = ["BitMasks", "PolygonMasks", "decode_rles", "polygon_area", "polygons_to_rles"]


def polygon_area(polygon: np.ndarray) -> float:
    """Absolute shoelace area of one flat (2k,) polygon [x0, y0, x1, y1, ...]."""
    x, y = polygon[0::2], polygon[1::2]
    # sum of x_i * y_(i+1) - x_(i+1) * y_i around the closed ring
    twice = x[:-1] @ y[1:] - x[1:] @ y[:-1] + x[-1] * y[0] - x[0] * y[-1]
    return 0.5 * abs(float(twice))


def _as_polygon(polygon: Any) -> np.ndarray:
    array = np.asarray(polygon, dtype=np.float64).reshape(-1)
    if array.size < 6 or array.size % 2:
        raise ValueError(f"a polygon needs >= 3 (x, y) points as a flat list, got {array.size} "
                         f"values")
    if not np.isfinite(array).all():
        raise ValueError("a polygon has non-finite coordinates")
    return array


def _empty_rle(height: int, width: int) -> dict:
    # an uncompressed RLE of one run of zeros: no (H, W) buffer needed
    return mask_util.frPyObjects({"size": [height, width], "counts": [height * width]},
                                 height, width)


def polygons_to_rles(polygons_per_instance: Sequence[Sequence[np.ndarray]], height: int,
                     width: int) -> List[dict]:
    """One compressed RLE per instance (the union of its polygons) on a (height, width) canvas;
    parts outside the canvas are cut off, an instance without polygons gives an empty mask."""
    rles = []
    for polygons in polygons_per_instance:
        if len(polygons) == 0:
            rles.append(_empty_rle(height, width))
            continue
        # pycocotools takes a list of 4 numbers for a box: every polygon here has >= 6
        parts = mask_util.frPyObjects([np.asarray(p, dtype=np.float64) for p in polygons],
                                      height, width)
        rles.append(mask_util.merge(parts))
    return rles


def decode_rles(rles: Sequence[dict], height: int, width: int) -> np.ndarray:
    """Decode COCO RLEs (compressed, or uncompressed with a list of counts) of images of
    (height, width) into a bool (height, width, N) array, the channel-last stack that the
    transforms' ``apply_segmentation`` takes. Raises ValueError when an RLE's size differs."""
    if len(rles) == 0:
        return np.zeros((height, width, 0), dtype=bool)
    compressed = []
    for i, rle in enumerate(rles):
        if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
            raise ValueError(f"RLE {i} is not a dict with 'size' and 'counts'")
        size = [int(s) for s in rle["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE {i} has size (h, w) {tuple(size)} but the image is "
                             f"{(height, width)}")
        if isinstance(rle["counts"], list):
            rle = mask_util.frPyObjects(rle, height, width)
        compressed.append(rle)
    return mask_util.decode(compressed).astype(bool, copy=False)


def _index_list(item: Any, length: int) -> List[int]:
    """Positions selected by a bool/int tensor or array, or a list of ints."""
    index = torch.as_tensor(item)
    if index.dtype == torch.bool:
        if index.shape != (length,):
            raise IndexError(f"bool index of shape {tuple(index.shape)} for {length} masks")
        return index.nonzero().flatten().tolist()
    if index.dtype.is_floating_point or index.dim() > 1:
        raise IndexError(f"masks are indexed by an int, a slice or a 1-d bool/int tensor, got "
                         f"{index.dtype} of shape {tuple(index.shape)}")
    positions = index.flatten().tolist()
    for p in positions:
        if not -length <= p < length:
            raise IndexError(f"mask index {p} out of range for {length} masks")
    return positions


class BitMasks:
    """Instance masks as a bool tensor (N, H, W) at the image size (H, W)."""

    def __init__(self, tensor: Any):
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(np.asarray(tensor))
        if tensor.dim() != 3:
            raise ValueError(f"BitMasks expects an (N, H, W) tensor, got shape "
                             f"{tuple(tensor.shape)}")
        self.tensor = tensor if tensor.dtype == torch.bool else tensor != 0

    @property
    def image_size(self) -> Tuple[int, int]:
        return int(self.tensor.shape[1]), int(self.tensor.shape[2])

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def to(self, device) -> "BitMasks":
        return BitMasks(self.tensor.to(device))

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    def __getitem__(self, item) -> "BitMasks":
        if isinstance(item, int):
            return BitMasks(self.tensor[item].unsqueeze(0))
        return BitMasks(self.tensor[item])

    def __iter__(self):
        yield from self.tensor

    def area(self) -> torch.Tensor:
        """Number of pixels of each mask, int64 (N,)."""
        return self.tensor.flatten(1).sum(dim=1)

    def nonempty(self) -> torch.Tensor:
        """Bool (N,): masks with at least one pixel."""
        return self.tensor.flatten(1).any(dim=1)

    def get_bounding_boxes(self) -> Boxes:
        """Tight XYXY boxes: pixel i spans [i, i + 1), so a box ends one past its last pixel;
        all zeros for an empty mask."""
        n, h, w = self.tensor.shape
        boxes = torch.zeros(n, 4, dtype=torch.float32, device=self.device)
        if n == 0:
            return Boxes(boxes)
        cols, rows = self.tensor.any(dim=1), self.tensor.any(dim=2)
        present = cols.any(dim=1)
        # argmax of a bool row gives its first True
        boxes[:, 0] = cols.int().argmax(dim=1).float()
        boxes[:, 1] = rows.int().argmax(dim=1).float()
        boxes[:, 2] = (w - cols.flip(1).int().argmax(dim=1)).float()
        boxes[:, 3] = (h - rows.flip(1).int().argmax(dim=1)).float()
        boxes[~present] = 0
        return Boxes(boxes)

    @classmethod
    def from_rles(cls, rles: Sequence[dict], height: int, width: int) -> "BitMasks":
        """Decode COCO RLEs of a (height, width) image (see ``decode_rles``)."""
        stack = decode_rles(rles, height, width)
        return cls(torch.from_numpy(np.ascontiguousarray(stack.transpose(2, 0, 1))))

    @classmethod
    def cat(cls, masks_list: Sequence["BitMasks"]) -> "BitMasks":
        sizes = {m.image_size for m in masks_list}
        if len(sizes) != 1:
            raise ValueError(f"BitMasks.cat needs masks of one image size, got {sorted(sizes)}")
        return cls(torch.cat([m.tensor for m in masks_list], dim=0))

    def __repr__(self) -> str:
        return f"BitMasks(num_instances={len(self)}, image_size={self.image_size})"


class PolygonMasks:
    """Instance masks as polygons: ``polygons[i]`` is the list of flat (2k,) float64 arrays
    [x0, y0, x1, y1, ...] (absolute pixels, k >= 3) whose union is instance i's mask. An instance
    may have no polygon (an empty mask).

    The polygons stay numpy arrays on the CPU; ``to(device)`` is accepted for ``Instances.to`` and
    changes nothing. ``to_bitmasks(height, width)`` rasterises them, ``.to(device)`` moves those."""

    def __init__(self, polygons: Iterable[Iterable[Any]]):
        self.polygons: List[List[np.ndarray]] = []
        for i, instance in enumerate(polygons):
            if isinstance(instance, np.ndarray) or not isinstance(instance, (list, tuple)):
                raise ValueError(f"PolygonMasks: instance {i} must be a list of polygons, got "
                                 f"{type(instance).__name__}")
            try:
                self.polygons.append([_as_polygon(p) for p in instance])
            except ValueError as e:
                raise ValueError(f"PolygonMasks: instance {i}: {e}") from None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device) -> "PolygonMasks":
        return self

    def __len__(self) -> int:
        return len(self.polygons)

    def __getitem__(self, item) -> "PolygonMasks":
        if isinstance(item, int):
            selected = [self.polygons[item]]
        elif isinstance(item, slice):
            selected = self.polygons[item]
        else:
            selected = [self.polygons[i] for i in _index_list(item, len(self))]
        out = PolygonMasks([])
        out.polygons = list(selected)  # already validated
        return out

    def __iter__(self):
        yield from self.polygons

    def area(self) -> torch.Tensor:
        """Sum of the polygons' shoelace areas per instance, float64 (N,) (overlapping polygons
        of one instance count twice; rasterise for pixel counts)."""
        return torch.tensor([sum(polygon_area(p) for p in polys) for polys in self.polygons],
                            dtype=torch.float64)

    def nonempty(self) -> torch.Tensor:
        """Bool (N,): instances with at least one polygon."""
        return torch.tensor([len(polys) > 0 for polys in self.polygons], dtype=torch.bool)

    def get_bounding_boxes(self) -> Boxes:
        """XYXY extent of each instance's polygon points; zeros for an instance without one."""
        boxes = torch.zeros(len(self), 4, dtype=torch.float32)
        for i, polys in enumerate(self.polygons):
            if polys:
                xy = np.concatenate(polys).reshape(-1, 2)
                boxes[i] = torch.from_numpy(np.concatenate([xy.min(0), xy.max(0)]))
        return Boxes(boxes)

    def to_rles(self, height: int, width: int) -> List[dict]:
        """One compressed COCO RLE per instance on a (height, width) canvas."""
        return polygons_to_rles(self.polygons, height, width)

    def to_bitmasks(self, height: int, width: int) -> BitMasks:
        """Rasterise every instance onto a (height, width) canvas (pycocotools; parts outside
        the canvas are cut off)."""
        return BitMasks.from_rles(self.to_rles(height, width), height, width)

    @classmethod
    def cat(cls, masks_list: Sequence["PolygonMasks"]) -> "PolygonMasks":
        out = cls([])
        out.polygons = [polys for m in masks_list for polys in m.polygons]
        return out

    def __repr__(self) -> str:
        return f"PolygonMasks(num_instances={len(self)})"
