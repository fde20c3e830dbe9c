"""Dataset dict (docs/architecture.md) -> model input dict: read, check, augment, convert."""
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from detector.structures import Boxes, Instances

from .transforms import Augmentation, apply_augmentations, build_augmentation

__all__ = ["DatasetMapper", "ImageLoadError", "ImageSizeMismatchError", "read_image"]


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
    augmentations (resize, flip) to image and boxes, and returns the model input dict:
    ``image`` uint8 (C, H, W), original ``height``/``width``, ``image_id``, ``file_name`` and, when
    ``is_train``, ``instances`` with ``gt_boxes`` (Boxes) and ``gt_classes`` (int64).

    Crowd annotations become crowd regions (``gt_is_crowd`` True, class kept) with ``keep_crowd``,
    which the detectors use only to ignore anchors, and are dropped otherwise; boxes left empty after
    the transforms are dropped. Random choices come
    from the mapper's own generator (``seed``, or re-seeded per data-loader worker via
    ``reseed``), never from global state."""

    def __init__(
        self,
        *,
        is_train: bool,
        augmentations: Sequence[Augmentation],
        image_format: str = "RGB",
        seed: Optional[int] = None,
        keep_crowd: bool = True,
    ):
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {image_format!r}")
        self.is_train = is_train
        self.augmentations: List[Augmentation] = list(augmentations)
        self.image_format = image_format
        self.keep_crowd = keep_crowd
        self.reseed(seed)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        """Constructor kwargs from INPUT.* (and SEED when >= 0)."""
        return {
            "is_train": is_train,
            "augmentations": build_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "seed": cfg.SEED if cfg.SEED >= 0 else None,
            "keep_crowd": cfg.INPUT.KEEP_CROWD,
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
        image, transforms = apply_augmentations(self.augmentations, image, self._rng)
        out = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "height": int(orig_h),
            "width": int(orig_w),
            "image_id": dataset_dict.get("image_id"),
            "file_name": file_name,
        }
        if self.is_train:
            out["instances"] = self._transform_annotations(
                dataset_dict.get("annotations", []), transforms, image.shape[:2], self.keep_crowd
            )
        return out

    @staticmethod
    def _transform_annotations(annotations, transforms, image_size, keep_crowd) -> Instances:
        anns = [a for a in annotations if keep_crowd or not a.get("iscrowd", 0)]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        classes = np.array([a["category_id"] for a in anns], dtype=np.int64)
        # fvcore's apply_box takes the min/max of the moved corners, which would turn an inverted
        # box (x2 < x1) into a valid one; such boxes are empty and stay dropped
        ordered = torch.as_tensor((boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1]))
        boxes = Boxes(torch.as_tensor(transforms.apply_box(boxes), dtype=torch.float32))
        boxes.clip(image_size)
        keep = boxes.nonempty(threshold=1e-5) & ordered
        instances = Instances(
            image_size, gt_boxes=boxes[keep], gt_classes=torch.as_tensor(classes)[keep]
        )
        if keep_crowd:
            is_crowd = torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool)
            instances.gt_is_crowd = is_crowd[keep]
        return instances
