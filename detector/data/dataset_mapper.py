"""Dataset dict (docs/architecture.md) -> model input dict: read, check, augment, convert."""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_util

from detector.structures import (
    BitMasks,
    Boxes,
    Instances,
    PolygonMasks,
    decode_rles,
    polygons_to_rles,
)

from .transforms import Augmentation, TransformList, apply_augmentations, build_augmentation

__all__ = ["DatasetMapper", "ImageLoadError", "ImageSizeMismatchError", "MASK_SKIP_REASONS",
           "read_image"]

logger = logging.getLogger("detector.data")

# Why the mapper drops a training instance with MODEL.MASK_ON (counted in DatasetMapper.num_skipped)
MASK_SKIP_REASONS = ("no_segmentation", "mask_vanished")


class ImageLoadError(RuntimeError):
    """An image file that is missing or cannot be decoded; the message names the file."""


class ImageSizeMismatchError(ValueError):
    """An image whose decoded size differs from the height/width its annotations were made for."""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def read_image(file_name: str, image_format: str = "RGB") -> np.ndarray:
    """Decode ``file_name`` to a uint8 (H, W, 3) array in ``image_format`` ("RGB" or "BGR"),
    applying its EXIF orientation. Raises ``ImageLoadError`` naming the file on any failure."""
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {image_format!r}")
    try:
        with Image.open(file_name) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(f"Image file not found: {file_name}") from None
    except Exception as e:  # PIL raises many types for truncated or corrupt files
        raise ImageLoadError(
            f"Cannot decode image {file_name}: {type(e).__name__}: {_one_line(e)}"
        ) from None
    array = np.asarray(img, dtype=np.uint8)
    if image_format == "BGR":
        array = array[:, :, ::-1]
    return np.ascontiguousarray(array)


class DatasetMapper:
    """Reads the image of a dataset dict, checks it against the dict's height/width, applies the
    augmentations (resize, flip, crop) to image, boxes and masks, and returns the model input dict:
    ``image`` uint8 (C, H, W), original ``height``/``width``, ``image_id``, ``file_name`` and, when
    ``is_train``, ``instances`` with ``gt_boxes`` (Boxes) and ``gt_classes`` (int64), plus
    ``gt_masks`` with ``mask_on``.

    Crowd annotations become crowd regions (``gt_is_crowd`` True, class kept) with
    ``keep_crowd``, which the detectors use only to ignore anchors, and are dropped otherwise;
    boxes left empty after the transforms are dropped. Random choices come from the mapper's own
    generator (``seed``, or re-seeded per data-loader worker via ``reseed``), never from global
    state.

    Masks (``mask_on``), aligned with the boxes at the network input size:

    - ``mask_format="polygon"``: ``PolygonMasks``, the polygons moved by the same transforms as
      the boxes (a crop clips them, see ``transforms.CropTransform``). An image with a non-crowd
      RLE segmentation gets ``BitMasks`` for all its instances instead (polygons are rasterised
      after the transforms, at the output size).
    - ``mask_format="bitmask"``: always ``BitMasks``; RLEs are decoded at the original size and
      moved with ``apply_segmentation`` (nearest neighbour), polygons are rasterised after the
      transforms.
    - Crowd regions are not mask targets: their ``gt_masks`` entry is an empty placeholder
      (no polygon, or an all-False bitmap); ``gt_is_crowd`` marks them.
    - A non-crowd instance without a segmentation (none given, or none left by the loader's
      checks), or whose mask has no pixel left after the transforms (e.g. cut off by a crop while
      a sliver of its box remains), is dropped with its box: counted per reason in
      ``num_skipped`` (per process, keys ``MASK_SKIP_REASONS``) and logged when a count reaches
      a power of two. A malformed segmentation, or an RLE whose size is not the image's, is a
      one-line ValueError naming the image id."""

    def __init__(
        self,
        *,
        is_train: bool,
        augmentations: Sequence[Augmentation],
        image_format: str = "RGB",
        seed: Optional[int] = None,
        keep_crowd: bool = True,
        mask_on: bool = False,
        mask_format: str = "polygon",
    ):
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {image_format!r}")
        if mask_format not in ("polygon", "bitmask"):
            raise ValueError(f"INPUT.MASK_FORMAT must be 'polygon' or 'bitmask', got "
                             f"{mask_format!r}")
        self.is_train = is_train
        self.augmentations: List[Augmentation] = list(augmentations)
        self.image_format = image_format
        self.keep_crowd = keep_crowd
        self.mask_on = mask_on
        self.mask_format = mask_format
        self.num_skipped: Dict[str, int] = {k: 0 for k in MASK_SKIP_REASONS}
        self.reseed(seed)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        """Constructor kwargs from INPUT.*, MODEL.MASK_ON (and SEED when >= 0)."""
        return {
            "is_train": is_train,
            "augmentations": build_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "seed": cfg.SEED if cfg.SEED >= 0 else None,
            "keep_crowd": cfg.INPUT.KEEP_CROWD,
            "mask_on": cfg.MODEL.MASK_ON,
            "mask_format": cfg.INPUT.MASK_FORMAT,
        }

    def reseed(self, seed: Optional[int]) -> None:
        """Restart the augmentation generator (None = fresh OS entropy)."""
        self._rng = np.random.default_rng(seed)

    def _check_size(self, dataset_dict: dict, image: np.ndarray) -> None:
        expected = (dataset_dict.get("height"), dataset_dict.get("width"))
        if None in expected:
            return
        h, w = image.shape[:2]
        if (h, w) != tuple(expected):
            hint = " (EXIF rotation?)" if (w, h) == tuple(expected) else ""
            raise ImageSizeMismatchError(
                f"{dataset_dict['file_name']} (image_id {dataset_dict.get('image_id')}): decoded "
                f"image is {w}x{h} (WxH) but the annotations say {expected[1]}x{expected[0]}{hint}"
            )

    def __call__(self, dataset_dict: dict) -> dict:
        """Map one dataset dict; the input dict is not modified."""
        file_name = dataset_dict["file_name"]
        image = read_image(file_name, self.image_format)
        self._check_size(dataset_dict, image)
        orig_h, orig_w = image.shape[:2]
        boxes = None  # box-aware augmentations (AutoAugment) see the boxes of kept annotations
        if any(getattr(aug, "needs_boxes", False) for aug in self.augmentations):
            boxes = np.array([a["bbox"] for a in dataset_dict.get("annotations", [])
                              if self.keep_crowd or not a.get("iscrowd", 0)],
                             dtype=np.float64).reshape(-1, 4)
        image, transforms = apply_augmentations(self.augmentations, image, self._rng, boxes)
        out = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "height": int(orig_h),
            "width": int(orig_w),
            "image_id": dataset_dict.get("image_id"),
            "file_name": file_name,
        }
        if self.is_train:
            out["instances"] = self._transform_annotations(
                dataset_dict, transforms, (orig_h, orig_w), image.shape[:2]
            )
        return out

    def _transform_annotations(self, dataset_dict: dict, transforms: TransformList,
                               input_size: Tuple[int, int],
                               image_size: Tuple[int, int]) -> Instances:
        # positions in dataset_dict["annotations"], to name annotations in messages
        positions = [j for j, a in enumerate(dataset_dict.get("annotations", []))
                     if self.keep_crowd or not a.get("iscrowd", 0)]
        anns = [dataset_dict["annotations"][j] for j in positions]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        classes = np.array([a["category_id"] for a in anns], dtype=np.int64)
        is_crowd = torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool)
        # fvcore's apply_box takes the min/max of the moved corners, which would turn an inverted
        # box (x2 < x1) into a valid one; such boxes are empty and stay dropped
        ordered = torch.as_tensor((boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1]))
        boxes = Boxes(torch.as_tensor(transforms.apply_box(boxes), dtype=torch.float32))
        boxes.clip(image_size)
        keep = boxes.nonempty(threshold=1e-5) & ordered
        masks = None
        if self.mask_on:
            context = _ImageContext(dataset_dict.get("image_id"), dataset_dict.get("file_name"),
                                    positions)
            masks, has_segmentation, visible = _transform_masks(
                anns, is_crowd, transforms, input_size, image_size, self.mask_format, context
            )
            missing = keep & ~is_crowd & ~has_segmentation
            vanished = keep & ~is_crowd & has_segmentation & ~visible
            self._count_skips("no_segmentation", missing, context)
            self._count_skips("mask_vanished", vanished, context)
            keep &= ~(missing | vanished)
        instances = Instances(
            image_size, gt_boxes=boxes[keep], gt_classes=torch.as_tensor(classes)[keep]
        )
        if masks is not None:
            instances.gt_masks = masks[keep]
        if self.keep_crowd:
            instances.gt_is_crowd = is_crowd[keep]
        return instances

    def _count_skips(self, reason: str, dropped: torch.Tensor, context: "_ImageContext") -> None:
        n = int(dropped.sum())
        if n == 0:
            return
        before = self.num_skipped[reason]
        self.num_skipped[reason] = total = before + n
        if total.bit_length() > before.bit_length():  # crossed a power of two
            what = ("without a segmentation while MODEL.MASK_ON" if reason == "no_segmentation"
                    else "whose mask has no pixel left after the transforms")
            logger.warning("Dropped %d training instance(s) of %s %s (annotation index %s); "
                           "%d %s so far in this process", n, context, what,
                           [context.positions[i] for i in dropped.nonzero().flatten().tolist()],
                           total, reason)


class _ImageContext:
    """Names the image in messages ("image id 7 (path)") and the annotations' positions in its
    dataset dict."""

    def __init__(self, image_id, file_name, positions: List[int]):
        self.image_id, self.file_name, self.positions = image_id, file_name, positions

    def __str__(self) -> str:
        return f"image id {self.image_id} ({self.file_name})"


def _is_rle(segmentation) -> bool:
    return isinstance(segmentation, dict)


def _check_rle(rle: dict, index: int, input_size, context: _ImageContext) -> None:
    where = f"{context}: annotation {context.positions[index]}"
    if "size" not in rle or "counts" not in rle:
        raise ValueError(f"{where} has an RLE without 'size' and 'counts'")
    size = tuple(int(v) for v in rle["size"])
    if size != tuple(input_size):
        raise ValueError(f"{where} has an RLE of size (h, w) {size} but the image is "
                         f"{tuple(input_size)}")


def _polygon_arrays(segmentation, index: int, context: _ImageContext) -> List[np.ndarray]:
    """The flat polygons of one annotation as (k, 2) float64 arrays (fresh copies: fvcore's
    transforms move coordinates in place)."""
    where = f"{context}: annotation {context.positions[index]}"
    if not isinstance(segmentation, (list, tuple)):
        raise ValueError(f"{where} has a segmentation of type {type(segmentation).__name__}; "
                         f"expected polygons or an RLE dict")
    out = []
    for polygon in segmentation:
        try:
            array = np.array(polygon, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            array = np.empty(1)
        if array.size < 6 or array.size % 2 or not np.isfinite(array).all():
            raise ValueError(f"{where} has a polygon that is not a flat list of >= 3 finite "
                             f"(x, y) points")
        out.append(array.reshape(-1, 2))
    return out


def _transform_masks(anns, is_crowd, transforms: TransformList, input_size, image_size,
                     mask_format: str, context: _ImageContext):
    """(masks of every annotation, bool has-a-segmentation, bool has-a-pixel-left); crowd
    regions and annotations without a segmentation get empty placeholders."""
    n = len(anns)
    polygons: List[List[np.ndarray]] = [[] for _ in range(n)]
    rle_index, rles = [], []
    has_segmentation = torch.zeros(n, dtype=torch.bool)
    for i, ann in enumerate(anns):
        segm = ann.get("segmentation")
        if is_crowd[i] or segm is None or (isinstance(segm, (list, tuple)) and not segm):
            continue
        has_segmentation[i] = True
        if _is_rle(segm):
            _check_rle(segm, i, input_size, context)
            rle_index.append(i)
            rles.append(segm)
        else:
            moved = transforms.apply_polygons(_polygon_arrays(segm, i, context))
            polygons[i] = [p.reshape(-1) for p in moved]

    height, width = image_size
    if mask_format == "polygon" and not rles:
        # pixels left inside the image, counted on the RLEs without decoding them
        rasterised = polygons_to_rles(polygons, height, width)
        areas = mask_util.area(rasterised) if rasterised else np.zeros(0)
        return PolygonMasks(polygons), has_segmentation, torch.as_tensor(areas > 0)

    bitmaps = PolygonMasks(polygons).to_bitmasks(height, width).tensor
    if rles:
        moved = transforms.apply_segmentation(decode_rles(rles, *input_size))
        bitmaps[torch.as_tensor(rle_index)] = torch.from_numpy(
            np.ascontiguousarray(moved.transpose(2, 0, 1)))
    masks = BitMasks(bitmaps)
    return masks, has_segmentation, masks.nonempty()
