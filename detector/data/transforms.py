"""Geometric transforms for detection: an ``Augmentation`` samples a deterministic transform from an
image and a random generator; the transform then moves the image, its boxes and its masks.

Transforms are fvcore's (``fvcore.transforms``): flips, crops, no-op and ``TransformList`` come from
there, with their ``apply_image`` / ``apply_box`` / ``apply_coords`` / ``apply_segmentation`` /
``apply_polygons``. Ours are the resize (see ``ResizeTransform``) and the crop's polygon clipping
(see ``CropTransform``).

Images are uint8 numpy arrays (H, W, C); boxes are float (N, 4) absolute XYXY arrays; polygons are
float (k, 2) arrays of (x, y); segmentations are (H, W) label maps or (H, W, N) stacks of masks."""
from abc import ABC, abstractmethod
from typing import List, Optional, Sequence, Tuple

import numpy as np
from fvcore.transforms import CropTransform as _FvcoreCropTransform
from fvcore.transforms import (
    HFlipTransform,
    NoOpTransform,
    Transform,
    TransformList,
    VFlipTransform,
)
from PIL import Image

from detector.structures import polygon_area

__all__ = [
    "Transform", "NoOpTransform", "ResizeTransform", "CropTransform", "HFlipTransform",
    "VFlipTransform", "TransformList", "clip_polygon",
    "Augmentation", "ResizeShortestEdge", "ScaleJitterCrop", "RandomFlip", "apply_augmentations",
    "build_augmentation",
]


def _nearest_source_indices(size: int, new_size: int) -> np.ndarray:
    """Source index of each output pixel whose centre maps into it (nearest neighbour)."""
    centres = (np.arange(new_size, dtype=np.float64) + 0.5) * (size / new_size)
    return np.minimum(centres.astype(np.int64), size - 1)


class ResizeTransform(Transform):
    """Resize an image of (h, w) to (new_h, new_w): bilinear for images, nearest neighbour for
    segmentations (labels and masks must stay labels), exact scaling for coordinates.

    Hand-written because fvcore's ``ScaleTransform`` resizes with torch's ``interpolate``, which
    does not antialias when shrinking; PIL's bilinear resize does, and training and evaluation
    must see the same resampling."""

    def __init__(self, h: int, w: int, new_h: int, new_w: int):
        super().__init__()
        self._set_attributes(locals())

    def _resize(self, array: np.ndarray, resample) -> np.ndarray:
        if array.shape[:2] != (self.h, self.w):
            raise ValueError(f"ResizeTransform made for (h, w) {(self.h, self.w)}, "
                             f"got an array of {array.shape[:2]}")
        if (self.new_h, self.new_w) == (self.h, self.w):
            return array
        return np.asarray(Image.fromarray(array).resize((self.new_w, self.new_h), resample))

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return self._resize(img, Image.BILINEAR)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        """A (h, w) label map or an (h, w, N) stack of masks, any dtype: nearest neighbour by
        indexing, so all N masks move in one step."""
        if segmentation.shape[:2] != (self.h, self.w):
            raise ValueError(f"ResizeTransform made for (h, w) {(self.h, self.w)}, "
                             f"got a segmentation of {segmentation.shape[:2]}")
        if (self.new_h, self.new_w) == (self.h, self.w):
            return segmentation
        rows = _nearest_source_indices(self.h, self.new_h)
        cols = _nearest_source_indices(self.w, self.new_w)
        return segmentation[rows[:, None], cols]

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        # float64 out whatever comes in: integer coordinates would be truncated in place
        scaled = np.array(coords, dtype=np.float64)
        scaled[:, 0] *= self.new_w / self.w
        scaled[:, 1] *= self.new_h / self.h
        return scaled

    def inverse(self) -> "ResizeTransform":
        return ResizeTransform(self.new_h, self.new_w, self.h, self.w)


def _clip_half_plane(points: np.ndarray, axis: int, bound: float, keep_above: bool) -> np.ndarray:
    """One Sutherland-Hodgman step: the part of a closed polygon (k, 2) on one side of the line
    ``points[:, axis] == bound``, every edge at once."""
    if len(points) == 0:
        return points
    coord = points[:, axis]
    inside = coord >= bound if keep_above else coord <= bound
    prev = np.roll(points, 1, axis=0)  # edge j runs from prev[j] to points[j]
    crosses = inside != np.roll(inside, 1)
    step = coord - prev[:, axis]
    t = np.divide(bound - prev[:, axis], step, out=np.zeros_like(step), where=crosses)
    crossing = prev + t[:, None] * (points - prev)
    crossing[crosses, axis] = bound
    # per edge: its crossing with the line (if any), then its end point (if inside)
    return np.stack([crossing, points], axis=1)[np.stack([crosses, inside], axis=1)]


def clip_polygon(points: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """The part of the closed polygon ``points`` (k, 2) inside the box [x0, x1] x [y0, y1], as
    one polygon (Sutherland-Hodgman; exact for any polygon against a rectangle: a concave one
    cut in several pieces keeps zero-width bridges along the box border, which enclose no area).
    Fewer than 3 points when nothing is left."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    for axis, bound, keep_above in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        points = _clip_half_plane(points, axis, bound, keep_above)
    if len(points) > 1:  # a vertex on the border comes out twice
        points = points[np.any(points != np.roll(points, 1, axis=0), axis=1)]
    return points


class CropTransform(_FvcoreCropTransform):
    """fvcore's crop (image, boxes, segmentations, coordinates), with polygons clipped to the
    window by ``clip_polygon``: fvcore's ``apply_polygons`` needs shapely, which is not a
    dependency, and silently drops polygons shapely finds invalid (self-intersecting ones,
    common in COCO). Polygons with no area left in the window are dropped."""

    def apply_polygons(self, polygons: list) -> list:
        out = []
        for polygon in polygons:
            clipped = clip_polygon(polygon, self.x0, self.y0, self.x0 + self.w, self.y0 + self.h)
            if len(clipped) >= 3 and polygon_area(clipped.reshape(-1)) > 0:
                out.append(self.apply_coords(clipped))
        return out


class Augmentation(ABC):
    """Samples a ``Transform`` for an image; all randomness comes from the ``rng`` argument."""

    @abstractmethod
    def get_transform(self, image: np.ndarray, rng: np.random.Generator) -> Transform:
        """The transform for ``image``; draws only from ``rng``."""


def _scaled_shape(h: int, w: int, scale: float) -> Tuple[int, int]:
    """(h, w) times ``scale``, rounded, at least one pixel."""
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


class ResizeShortestEdge(Augmentation):
    """Scale so the shorter side is one of ``short_edge_length`` (picked at random) while the
    longer side stays <= ``max_size`` (0 = no cap); the aspect ratio is kept."""

    def __init__(self, short_edge_length: Sequence[int], max_size: int = 0):
        if isinstance(short_edge_length, int):
            short_edge_length = (short_edge_length,)
        self.short_edge_length = tuple(int(s) for s in short_edge_length)
        if not self.short_edge_length or min(self.short_edge_length) <= 0:
            raise ValueError(f"ResizeShortestEdge needs positive sizes, got {short_edge_length}")
        self.max_size = int(max_size)

    @staticmethod
    def get_output_shape(h: int, w: int, short_edge: int, max_size: int) -> Tuple[int, int]:
        scale = short_edge / min(h, w)
        if max_size > 0 and max(h, w) * scale > max_size:
            scale = max_size / max(h, w)
        return _scaled_shape(h, w, scale)

    def get_transform(self, image, rng):
        h, w = image.shape[:2]
        if len(self.short_edge_length) == 1:
            short = self.short_edge_length[0]
        else:
            short = self.short_edge_length[int(rng.integers(len(self.short_edge_length)))]
        new_h, new_w = self.get_output_shape(h, w, short, self.max_size)
        return ResizeTransform(h, w, new_h, new_w)


class ScaleJitterCrop(Augmentation):
    """EfficientDet's training resize (effdet's RandomResizePad, TF's scale jitter): draw
    r ~ U(min_scale, max_scale), scale the image to fit a square of side ``r * target_size``
    (aspect kept), then cut a random window of at most ``target_size`` x ``target_size``. The
    batch padding of the model fills smaller images up."""

    def __init__(self, target_size: int, scale_range: Sequence[float] = (0.1, 2.0)):
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"INPUT.SCALE_JITTER_RANGE must be (min, max) with 0 < min <= max, "
                             f"got {tuple(scale_range)}")
        if int(target_size) <= 0:
            raise ValueError(f"ScaleJitterCrop needs a positive target size, got {target_size}")
        self.target_size = int(target_size)
        self.min_scale, self.max_scale = float(scale_range[0]), float(scale_range[1])

    def get_transform(self, image, rng):
        h, w = image.shape[:2]
        side = self.target_size * rng.uniform(self.min_scale, self.max_scale)
        new_h, new_w = _scaled_shape(h, w, min(side / h, side / w))
        resize = ResizeTransform(h, w, new_h, new_w)
        crop_h, crop_w = min(new_h, self.target_size), min(new_w, self.target_size)
        if (crop_h, crop_w) == (new_h, new_w):
            return resize
        y0 = int(rng.integers(0, new_h - crop_h + 1))
        x0 = int(rng.integers(0, new_w - crop_w + 1))
        crop = CropTransform(x0, y0, crop_w, crop_h, orig_w=new_w, orig_h=new_h)  # invertible
        return TransformList([resize, crop])


class RandomFlip(Augmentation):
    """Flip with probability ``prob``, horizontally (default) or vertically."""

    def __init__(self, prob: float = 0.5, horizontal: bool = True):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"RandomFlip probability must be in [0, 1], got {prob}")
        self.prob, self.horizontal = prob, horizontal

    def get_transform(self, image, rng):
        h, w = image.shape[:2]
        if rng.random() < self.prob:
            return HFlipTransform(w) if self.horizontal else VFlipTransform(h)
        return NoOpTransform()


def apply_augmentations(
    augmentations: Sequence[Augmentation], image: np.ndarray, rng: np.random.Generator,
    boxes: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, TransformList]:
    """Sample and apply each augmentation in turn (each sees the previous one's output).

    An augmentation with ``needs_boxes = True`` (AutoAugment's box operations) is called as
    ``get_transform(image, rng, boxes=...)`` with ``boxes`` (N, 4) XYXY of the input image as
    the earlier transforms moved them, clipped to the image; without ``boxes`` it is an error."""
    transforms = []
    for aug in augmentations:
        if getattr(aug, "needs_boxes", False):
            if boxes is None:
                raise ValueError(f"{aug!r} needs the image's boxes: pass boxes= to "
                                 f"apply_augmentations")
            t = aug.get_transform(image, rng, boxes=boxes)
        else:
            t = aug.get_transform(image, rng)
        image = t.apply_image(image)
        if boxes is not None:
            boxes = t.apply_box(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
            h, w = image.shape[:2]
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        transforms.append(t)
    return image, TransformList(transforms)


def build_augmentation(cfg, is_train: bool) -> List[Augmentation]:
    """Training: INPUT.RESIZE_MODE_TRAIN resizing, then INPUT.RANDOM_FLIP, then the
    INPUT.AUTOAUGMENT.POLICY ("" = none). Test: INPUT.MIN_SIZE_TEST/MAX_SIZE_TEST resizing."""
    if is_train:
        mode = cfg.INPUT.RESIZE_MODE_TRAIN
        if mode == "shortest_edge":
            resize: Augmentation = ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN,
                                                      cfg.INPUT.MAX_SIZE_TRAIN)
        elif mode == "scale_jitter":
            resize = ScaleJitterCrop(cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.SCALE_JITTER_RANGE)
        else:
            raise ValueError(f"INPUT.RESIZE_MODE_TRAIN must be 'shortest_edge' or "
                             f"'scale_jitter', got {mode!r}")
        augs: List[Augmentation] = [resize]
        flip = cfg.INPUT.RANDOM_FLIP
        if flip == "horizontal":
            augs.append(RandomFlip(prob=0.5, horizontal=True))
        elif flip != "none":
            raise ValueError(f"INPUT.RANDOM_FLIP must be 'horizontal' or 'none', got {flip!r}")
        policy = cfg.INPUT.AUTOAUGMENT.POLICY
        if policy:
            from .autoaugment import AutoAugment  # autoaugment builds on this module

            augs.append(AutoAugment(policy))
        return augs
    return [ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
