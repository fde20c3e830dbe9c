"""Detection AutoAugment: the learned policies v0-v3 of Zoph et al. 2019, "Learning Data
Augmentation Strategies for Object Detection" (arXiv:1906.11172).

The policy tables, the level -> argument mapping and the constants are those of the paper's
reference implementation (tensorflow/tpu, models/official/detection/utils/autoaugment_utils.py);
the operations are written here as fvcore transforms on numpy images:

- colour operations (AutoContrast, Equalize, Posterize, Solarize, SolarizeAdd, Color, Contrast,
  Brightness, Sharpness) and Cutout change pixels only: boxes and masks stay;
- geometric operations (Rotate_BBox, ShearX/Y_BBox, TranslateX/Y_BBox) move the pixels, the
  boxes (the enclosing box of the moved corners, as the reference) and the masks (polygons
  exactly, bitmaps by the same nearest-neighbour warp as the image);
- box operations apply inside ground-truth boxes only: BBox_Cutout (a cutout in one random box)
  and the ``*_Only_BBoxes`` variants (the operation on each box region with probability
  ``prob / 3``, in a random order); they change pixels but neither boxes nor masks.

Uncovered pixels are filled with grey 128, geometric warps sample the nearest pixel, as in the
reference. Pixel magnitudes (translations up to 250 px, cutouts up to 200 px) are absolute, as
in the reference, which applied the policies to COCO images (about 640 x 480): they are meant
for images of that size. Every random draw comes from the generator the mapper passes in."""
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from fvcore.transforms import HFlipTransform, NoOpTransform, Transform, TransformList
from PIL import Image, ImageEnhance, ImageOps

from .transforms import Augmentation

__all__ = ["AutoAugment", "POLICIES", "OPERATIONS", "PixelTransform", "CutoutTransform",
           "AffineTransform", "RegionTransform", "make_operation", "rotation_matrix",
           "shear_matrix", "translation_matrix"]

# Sub-policies of (operation, probability, level) from the reference implementation (see the
# module docstring); one sub-policy, drawn uniformly, is applied per image.
POLICIES: Dict[str, Tuple[Tuple[Tuple[str, float, int], ...], ...]] = {
    "v0": (
        (("TranslateX_BBox", 0.6, 4), ("Equalize", 0.8, 10)),
        (("TranslateY_Only_BBoxes", 0.2, 2), ("Cutout", 0.8, 8)),
        (("Sharpness", 0.0, 8), ("ShearX_BBox", 0.4, 0)),
        (("ShearY_BBox", 1.0, 2), ("TranslateY_Only_BBoxes", 0.6, 6)),
        (("Rotate_BBox", 0.6, 10), ("Color", 1.0, 6)),
    ),
    "v1": (
        (("TranslateX_BBox", 0.6, 4), ("Equalize", 0.8, 10)),
        (("TranslateY_Only_BBoxes", 0.2, 2), ("Cutout", 0.8, 8)),
        (("Sharpness", 0.0, 8), ("ShearX_BBox", 0.4, 0)),
        (("ShearY_BBox", 1.0, 2), ("TranslateY_Only_BBoxes", 0.6, 6)),
        (("Rotate_BBox", 0.6, 10), ("Color", 1.0, 6)),
        (("Color", 0.0, 0), ("ShearX_Only_BBoxes", 0.8, 4)),
        (("ShearY_Only_BBoxes", 0.8, 2), ("Flip_Only_BBoxes", 0.0, 10)),
        (("Equalize", 0.6, 10), ("TranslateX_BBox", 0.2, 2)),
        (("Color", 1.0, 10), ("TranslateY_Only_BBoxes", 0.4, 6)),
        (("Rotate_BBox", 0.8, 10), ("Contrast", 0.0, 10)),
        (("Cutout", 0.2, 2), ("Brightness", 0.8, 10)),
        (("Color", 1.0, 6), ("Equalize", 1.0, 2)),
        (("Cutout_Only_BBoxes", 0.4, 6), ("TranslateY_Only_BBoxes", 0.8, 2)),
        (("Color", 0.2, 8), ("Rotate_BBox", 0.8, 10)),
        (("Sharpness", 0.4, 4), ("TranslateY_Only_BBoxes", 0.0, 4)),
        (("Sharpness", 1.0, 4), ("SolarizeAdd", 0.4, 4)),
        (("Rotate_BBox", 1.0, 8), ("Sharpness", 0.2, 8)),
        (("ShearY_BBox", 0.6, 10), ("Equalize_Only_BBoxes", 0.6, 8)),
        (("ShearX_BBox", 0.2, 6), ("TranslateY_Only_BBoxes", 0.2, 10)),
        (("SolarizeAdd", 0.6, 8), ("Brightness", 0.8, 10)),
    ),
    "v2": (
        (("Color", 0.0, 6), ("Cutout", 0.6, 8), ("Sharpness", 0.4, 8)),
        (("Rotate_BBox", 0.4, 8), ("Sharpness", 0.4, 2), ("Rotate_BBox", 0.8, 10)),
        (("TranslateY_BBox", 1.0, 8), ("AutoContrast", 0.8, 2)),
        (("AutoContrast", 0.4, 6), ("ShearX_BBox", 0.8, 8), ("Brightness", 0.0, 10)),
        (("SolarizeAdd", 0.2, 6), ("Contrast", 0.0, 10), ("AutoContrast", 0.6, 0)),
        (("Cutout", 0.2, 0), ("Solarize", 0.8, 8), ("Color", 1.0, 4)),
        (("TranslateY_BBox", 0.0, 4), ("Equalize", 0.6, 8), ("Solarize", 0.0, 10)),
        (("TranslateY_BBox", 0.2, 2), ("ShearY_BBox", 0.8, 8), ("Rotate_BBox", 0.8, 8)),
        (("Cutout", 0.8, 8), ("Brightness", 0.8, 8), ("Cutout", 0.2, 2)),
        (("Color", 0.8, 4), ("TranslateY_BBox", 1.0, 6), ("Rotate_BBox", 0.6, 6)),
        (("Rotate_BBox", 0.6, 10), ("BBox_Cutout", 1.0, 4), ("Cutout", 0.2, 8)),
        (("Rotate_BBox", 0.0, 0), ("Equalize", 0.6, 6), ("ShearY_BBox", 0.6, 8)),
        (("Brightness", 0.8, 8), ("AutoContrast", 0.4, 2), ("Brightness", 0.2, 2)),
        (("TranslateY_BBox", 0.4, 8), ("Solarize", 0.4, 6), ("SolarizeAdd", 0.2, 10)),
        (("Contrast", 1.0, 10), ("SolarizeAdd", 0.2, 8), ("Equalize", 0.2, 4)),
    ),
    "v3": (
        (("Posterize", 0.8, 2), ("TranslateX_BBox", 1.0, 8)),
        (("BBox_Cutout", 0.2, 10), ("Sharpness", 1.0, 8)),
        (("Rotate_BBox", 0.6, 8), ("Rotate_BBox", 0.8, 10)),
        (("Equalize", 0.8, 10), ("AutoContrast", 0.2, 10)),
        (("SolarizeAdd", 0.2, 2), ("TranslateY_BBox", 0.2, 8)),
        (("Sharpness", 0.0, 2), ("Color", 0.4, 8)),
        (("Equalize", 1.0, 8), ("TranslateY_BBox", 1.0, 8)),
        (("Posterize", 0.6, 2), ("Rotate_BBox", 0.0, 10)),
        (("AutoContrast", 0.6, 0), ("Rotate_BBox", 1.0, 6)),
        (("Equalize", 0.0, 4), ("Cutout", 0.8, 10)),
        (("Brightness", 1.0, 2), ("TranslateY_BBox", 1.0, 6)),
        (("Contrast", 0.0, 2), ("ShearY_BBox", 0.8, 0)),
        (("AutoContrast", 0.8, 10), ("Contrast", 0.2, 10)),
        (("Rotate_BBox", 1.0, 10), ("Cutout", 1.0, 10)),
        (("SolarizeAdd", 0.8, 6), ("Equalize", 0.8, 8)),
    ),
}

# Constants of the reference's level -> argument mapping
_MAX_LEVEL = 10.0
_CUTOUT_CONST = 100  # Cutout: half side in pixels at level 10
_TRANSLATE_CONST = 250  # TranslateX/Y_BBox: pixels at level 10
_CUTOUT_BBOX_CONST = 50  # Cutout_Only_BBoxes: half side in pixels at level 10
_TRANSLATE_BBOX_CONST = 120  # TranslateX/Y_Only_BBoxes: pixels at level 10
_CUTOUT_MAX_PAD_FRACTION = 0.75  # BBox_Cutout: half side as a fraction of half the box
_BBOX_ONLY_PROB_DIVISOR = 3.0  # *_Only_BBoxes apply to each box with probability prob / 3
_FILL = 128  # grey for pixels a warp or a cutout leaves uncovered


# ---------------------------------------------------------------------------------------------
# Pixel operations on uint8 (H, W, C) arrays


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(image))


def _posterize(image: np.ndarray, bits: int) -> np.ndarray:
    # TF clamps a shift to 7 for uint8, so the reference's "0 bits" keeps the top bit
    shift = min(8 - int(bits), 7)
    return (image >> shift) << shift


def _solarize(image: np.ndarray, threshold: int) -> np.ndarray:
    return np.where(image < threshold, image, 255 - image).astype(np.uint8)


def _solarize_add(image: np.ndarray, addition: int, threshold: int = 128) -> np.ndarray:
    added = np.clip(image.astype(np.int16) + int(addition), 0, 255).astype(np.uint8)
    return np.where(image < threshold, added, image)


def _enhance(kind) -> Callable[[np.ndarray, float], np.ndarray]:
    # the reference re-implements PIL's ImageEnhance in TF; PIL is the original
    return lambda image, factor: np.asarray(kind(_pil(image)).enhance(factor))


_PIXEL_OPS: Dict[str, Callable[[np.ndarray, object], np.ndarray]] = {
    "AutoContrast": lambda image, _: np.asarray(ImageOps.autocontrast(_pil(image))),
    "Equalize": lambda image, _: np.asarray(ImageOps.equalize(_pil(image))),
    "Posterize": _posterize,
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
}


class PixelTransform(Transform):
    """A colour operation of ``_PIXEL_OPS`` with its argument: pixels change, no coordinate or
    mask does."""

    def __init__(self, op: str, arg=None):
        super().__init__()
        if op not in _PIXEL_OPS:
            raise ValueError(f"Unknown pixel operation {op!r}; known: {sorted(_PIXEL_OPS)}")
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.size == 0:
            return img
        return _PIXEL_OPS[self.op](img, self.arg)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


class CutoutTransform(Transform):
    """Fill the window [x0, x1) x [y0, y1) with ``fill``; coordinates and masks stay."""

    def __init__(self, x0: int, y0: int, x1: int, y1: int, fill: int = _FILL):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        out = img.copy()
        out[self.y0:self.y1, self.x0:self.x1] = self.fill
        return out

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


def _nearest_sources(inverse: np.ndarray, height: int, width: int):
    """For each output pixel (v, u) of a (height, width) image, the input pixel under
    ``inverse`` applied to its centre (u + 0.5, v + 0.5): (flat source index, inside mask)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    src_x = np.floor(inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]).astype(np.int64)
    src_y = np.floor(inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]).astype(np.int64)
    inside = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
    return (src_y * width + src_x)[inside], inside


def _warp_nearest(array: np.ndarray, sources, fill) -> np.ndarray:
    """``array`` (H, W, ...) resampled at the nearest pixels ``sources`` (see
    ``_nearest_sources``), ``fill`` where nothing maps. Hand-written because PIL warps only
    images of 1, 3 or 4 channels, and masks come as (H, W, N) stacks that must move exactly as
    the image does."""
    flat_sources, inside = sources
    out = np.full_like(array, fill)
    out[inside] = array.reshape(-1, *array.shape[2:])[flat_sources]
    return out


class AffineTransform(Transform):
    """The affine map ``matrix`` (2, 3) of continuous pixel coordinates (pixel i spans
    [i, i + 1)) on an image of (height, width), keeping the size. Images are resampled by the
    nearest pixel with ``fill`` where nothing maps, masks alike with 0; coordinates map
    exactly, so a box becomes the enclosing box of its moved corners."""

    def __init__(self, matrix: np.ndarray, height: int, width: int, fill: int = _FILL):
        super().__init__()
        matrix = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
        full = np.vstack([matrix, [0.0, 0.0, 1.0]])
        self._set_attributes({"matrix": matrix, "height": int(height), "width": int(width),
                              "fill": fill, "inverse": np.linalg.inv(full)[:2]})
        self._cached_sources = None

    def _sources(self, array: np.ndarray):
        if array.shape[:2] != (self.height, self.width):
            raise ValueError(f"AffineTransform made for (h, w) {(self.height, self.width)}, "
                             f"got an array of {array.shape[:2]}")
        if self._cached_sources is None:  # the image and its masks share one sampling
            self._cached_sources = _nearest_sources(self.inverse, self.height, self.width)
        return self._cached_sources

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return _warp_nearest(img, self._sources(img), self.fill)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return _warp_nearest(segmentation, self._sources(segmentation), 0)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords = np.asarray(coords, dtype=np.float64)
        return coords @ self.matrix[:, :2].T + self.matrix[:, 2]


def rotation_matrix(degrees: float, height: int, width: int) -> np.ndarray:
    """Rotation by ``degrees`` counter-clockwise on screen (y points down) about the centre."""
    rad = math.radians(degrees)
    c, s = math.cos(rad), math.sin(rad)
    cx, cy = width / 2.0, height / 2.0
    return np.array([[c, s, cx - c * cx - s * cy], [-s, c, cy + s * cx - c * cy]])


def shear_matrix(level: float, horizontal: bool) -> np.ndarray:
    """The reference's shear about the top-left corner: x' = x - level * y (horizontal) or
    y' = y - level * x."""
    if horizontal:
        return np.array([[1.0, -level, 0.0], [0.0, 1.0, 0.0]])
    return np.array([[1.0, 0.0, 0.0], [-level, 1.0, 0.0]])


def translation_matrix(pixels: float, horizontal: bool) -> np.ndarray:
    """The reference's translation: the content moves by -pixels along x (or y)."""
    return np.array([[1.0, 0.0, -pixels if horizontal else 0.0],
                     [0.0, 1.0, 0.0 if horizontal else -pixels]])


class RegionTransform(Transform):
    """``inner`` (a transform made for a (y1 - y0, x1 - x0) image) applied to the pixels of the
    window [x0, x1) x [y0, y1) only; coordinates and masks stay, as in the reference's box-only
    operations."""

    def __init__(self, x0: int, y0: int, x1: int, y1: int, inner: Transform):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        out = img.copy()
        out[self.y0:self.y1, self.x0:self.x1] = self.inner.apply_image(
            img[self.y0:self.y1, self.x0:self.x1])
        return out

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


# ---------------------------------------------------------------------------------------------
# Level -> argument (the reference's level_to_arg) and operation builders


def _signed(value: float, rng: np.random.Generator) -> float:
    """``value`` negated with probability 1/2 (the reference's _randomly_negate_tensor)."""
    return value if rng.random() < 0.5 else -value


def _enhance_factor(level: float) -> float:
    return level / _MAX_LEVEL * 1.8 + 0.1


_PIXEL_LEVEL_TO_ARG: Dict[str, Callable[[float], object]] = {
    "AutoContrast": lambda level: None,
    "Equalize": lambda level: None,
    "Posterize": lambda level: int(level / _MAX_LEVEL * 4),
    "Solarize": lambda level: int(level / _MAX_LEVEL * 256),
    "SolarizeAdd": lambda level: int(level / _MAX_LEVEL * 110),
    "Color": _enhance_factor,
    "Contrast": _enhance_factor,
    "Brightness": _enhance_factor,
    "Sharpness": _enhance_factor,
}


def _pixel_region(box: np.ndarray, height: int, width: int) -> Tuple[int, int, int, int]:
    """The pixels a box touches, as a window [x0, x1) x [y0, y1) inside the image."""
    x0 = int(np.clip(np.floor(box[0]), 0, width))
    y0 = int(np.clip(np.floor(box[1]), 0, height))
    x1 = int(np.clip(np.ceil(box[2]), 0, width))
    y1 = int(np.clip(np.ceil(box[3]), 0, height))
    return x0, y0, max(x0, x1), max(y0, y1)


def _cutout_window(cy: int, cx: int, half_h: int, half_w: int, height: int, width: int):
    return (max(0, cx - half_w), max(0, cy - half_h),
            min(width, cx + half_w), min(height, cy + half_h))


def _geometric(name: str, level: float, rng, height: int, width: int,
               translate_const: float) -> Transform:
    """Rotate / Shear / Translate with the reference's magnitudes, for an image of that size."""
    if name == "Rotate":
        matrix = rotation_matrix(_signed(level / _MAX_LEVEL * 30.0, rng), height, width)
    elif name in ("ShearX", "ShearY"):
        matrix = shear_matrix(_signed(level / _MAX_LEVEL * 0.3, rng), name == "ShearX")
    elif name in ("TranslateX", "TranslateY"):
        pixels = _signed(level / _MAX_LEVEL * float(translate_const), rng)
        matrix = translation_matrix(pixels, name == "TranslateX")
    else:
        raise ValueError(f"Unknown geometric operation {name!r}")
    return AffineTransform(matrix, height, width)


def _region_op(base: str, level: float, rng: np.random.Generator) -> Callable:
    """A builder of the box-only operation ``base`` for a window of (h, w); the random sign of
    a geometric operation is drawn once for all boxes, as in the reference."""
    if base in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
        sign = 1.0 if rng.random() < 0.5 else -1.0

        def geometric(h: int, w: int) -> Transform:
            if base == "Rotate":
                return AffineTransform(rotation_matrix(sign * level / _MAX_LEVEL * 30.0, h, w),
                                       h, w)
            if base in ("ShearX", "ShearY"):
                return AffineTransform(shear_matrix(sign * level / _MAX_LEVEL * 0.3,
                                                    base == "ShearX"), h, w)
            pixels = sign * level / _MAX_LEVEL * _TRANSLATE_BBOX_CONST
            return AffineTransform(translation_matrix(pixels, base == "TranslateX"), h, w)
        return geometric
    if base == "Flip":
        return lambda h, w: HFlipTransform(w)
    if base == "Solarize":
        return lambda h, w: PixelTransform("Solarize", int(level / _MAX_LEVEL * 256))
    if base == "Equalize":
        return lambda h, w: PixelTransform("Equalize")
    if base == "Cutout":
        half = int(level / _MAX_LEVEL * _CUTOUT_BBOX_CONST)

        def cutout(h: int, w: int) -> Transform:
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            return CutoutTransform(*_cutout_window(cy, cx, half, half, h, w))
        return cutout
    raise ValueError(f"Unknown box-only operation {base!r}_Only_BBoxes")


OPERATIONS = (tuple(_PIXEL_OPS) + ("Cutout", "BBox_Cutout")
              + tuple(f"{op}_BBox" for op in ("Rotate", "ShearX", "ShearY", "TranslateX",
                                               "TranslateY"))
              + tuple(f"{op}_Only_BBoxes" for op in ("Rotate", "ShearX", "ShearY", "TranslateX",
                                                     "TranslateY", "Flip", "Solarize",
                                                     "Equalize", "Cutout")))


def make_operation(name: str, prob: float, level: float, rng: np.random.Generator,
                   height: int, width: int, boxes: np.ndarray) -> Transform:
    """The transform of operation ``name`` at ``level`` for an image of (height, width) with
    ``boxes`` (N, 4) XYXY, drawing its randomness (sign, position, boxes chosen) from ``rng``.
    ``prob`` matters only for ``*_Only_BBoxes`` (each box with probability prob / 3); the
    caller decides whether the other operations apply."""
    if name in _PIXEL_OPS:
        return PixelTransform(name, _PIXEL_LEVEL_TO_ARG[name](level))
    if name == "Cutout":
        half = int(level / _MAX_LEVEL * _CUTOUT_CONST)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        return CutoutTransform(*_cutout_window(cy, cx, half, half, height, width))
    if name == "BBox_Cutout":
        regions = [r for r in (_pixel_region(b, height, width) for b in boxes)
                   if r[2] > r[0] and r[3] > r[1]]
        if not regions:
            return NoOpTransform()
        x0, y0, x1, y1 = regions[int(rng.integers(len(regions)))]
        fraction = level / _MAX_LEVEL * _CUTOUT_MAX_PAD_FRACTION
        half_h, half_w = int(fraction * (y1 - y0) / 2), int(fraction * (x1 - x0) / 2)
        cy, cx = int(rng.integers(y0, y1)), int(rng.integers(x0, x1))
        return CutoutTransform(*_cutout_window(cy, cx, half_h, half_w, height, width))
    if name.endswith("_BBox"):
        return _geometric(name[:-len("_BBox")], level, rng, height, width, _TRANSLATE_CONST)
    if name.endswith("_Only_BBoxes"):
        make_inner = _region_op(name[:-len("_Only_BBoxes")], level, rng)
        regions = []
        for i in rng.permutation(len(boxes)):
            if rng.random() < prob / _BBOX_ONLY_PROB_DIVISOR:
                x0, y0, x1, y1 = _pixel_region(boxes[i], height, width)
                if x1 > x0 and y1 > y0:
                    regions.append(RegionTransform(x0, y0, x1, y1, make_inner(y1 - y0, x1 - x0)))
        return TransformList(regions) if regions else NoOpTransform()
    raise ValueError(f"Unknown AutoAugment operation {name!r}; known: {list(OPERATIONS)}")


def _clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out


class AutoAugment(Augmentation):
    """One sub-policy of a detection AutoAugment policy, drawn uniformly, applied to an image:
    each of its (operation, probability, level) applies with its probability, in order, each
    seeing the boxes as the previous ones left them.

    ``policy`` is "v0" (the paper's), "v1", "v2", "v3", or a table of sub-policies in the same
    form as ``POLICIES``. It needs the image's boxes: ``apply_augmentations`` passes them."""

    needs_boxes = True

    def __init__(self, policy: Union[str, Sequence[Sequence[Tuple[str, float, float]]]]):
        if isinstance(policy, str):
            if policy not in POLICIES:
                raise ValueError(f"INPUT.AUTOAUGMENT.POLICY must be '' or one of "
                                 f"{sorted(POLICIES)}, got {policy!r}")
            table = POLICIES[policy]
        else:
            table = tuple(tuple((str(n), float(p), float(lv)) for n, p, lv in sub)
                          for sub in policy)
        for sub in table:
            for name, prob, level in sub:
                if name not in OPERATIONS or not 0.0 <= prob <= 1.0 or not 0 <= level <= 10:
                    raise ValueError(f"Bad AutoAugment operation {(name, prob, level)}: the "
                                     f"name must be one of {list(OPERATIONS)}, 0 <= prob <= 1, "
                                     f"0 <= level <= 10")
        if not table or not all(table):
            raise ValueError("An AutoAugment policy needs at least one non-empty sub-policy")
        self.policy = table

    def get_transform(self, image: np.ndarray, rng: np.random.Generator,
                      boxes: Optional[np.ndarray] = None) -> Transform:
        if boxes is None:
            raise ValueError("AutoAugment needs the image's boxes (apply_augmentations(..., "
                             "boxes=...))")
        height, width = image.shape[:2]
        boxes = _clip_boxes(boxes, height, width)
        transforms: List[Transform] = []
        for name, prob, level in self.policy[int(rng.integers(len(self.policy)))]:
            # box-only operations draw per box; the others apply with their probability
            if not name.endswith("_Only_BBoxes") and not rng.random() < prob:
                continue
            t = make_operation(name, prob, level, rng, height, width, boxes)
            transforms.append(t)
            boxes = _clip_boxes(t.apply_box(boxes), height, width)
        return TransformList(transforms) if transforms else NoOpTransform()

    def __repr__(self) -> str:
        return f"AutoAugment({len(self.policy)} sub-policies)"
