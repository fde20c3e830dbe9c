"""Stitch: a batch-level augmentation that scales two training images down and puts them side by
side (or one above the other) in one image, so the batch sees more, smaller objects.

The rule follows object_detection2 (the source of the seed studies' "Stitch" rows): the two
images share a canvas of the size the pair would be padded to in a batch (the larger height and
the larger width of the two), each image gets one half of it, is scaled to fit its half with
its aspect ratio kept (never enlarged), and sits in the half's top-left corner; the rest of the
canvas is 0. The stitched image takes the place of the first image of the pair and the second
stays in the batch as it is, so the batch size and its padded size do not change. Of the two
layouts, the one that leaves less of the canvas empty is used (a tie is broken at random).

Boxes, polygon masks and bitmap masks move with their image (the same resize as the pixels,
then the half's offset); ``gt_is_crowd`` and ``gt_classes`` follow their boxes."""
from typing import List, Sequence, Tuple

import numpy as np
import torch

from detector.structures import BitMasks, Boxes, Instances, PolygonMasks

from .transforms import ResizeTransform

__all__ = ["stitch_pair", "stitch_batch", "stitched_layout"]

_MOVABLE_FIELDS = ("gt_boxes", "gt_classes", "gt_masks", "gt_is_crowd")


def _size(d: dict) -> Tuple[int, int]:
    image = d["image"]
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise ValueError(f"stitch: image id {d.get('image_id')} has no (C, H, W) tensor 'image'")
    return int(image.shape[1]), int(image.shape[2])


def _slots(height: int, width: int, horizontal: bool) -> List[Tuple[int, int, int, int]]:
    """(x0, y0, slot width, slot height) of the two halves of a (height, width) canvas."""
    if horizontal:
        return [(0, 0, width // 2, height), (width // 2, 0, width - width // 2, height)]
    return [(0, 0, width, height // 2), (0, height // 2, width, height - height // 2)]


def _fit(h: int, w: int, slot_w: int, slot_h: int) -> Tuple[int, int]:
    """(new_h, new_w): (h, w) scaled to fit the slot, aspect kept, never enlarged."""
    scale = min(slot_w / w, slot_h / h, 1.0)
    return (max(1, min(slot_h, int(h * scale + 0.5))),
            max(1, min(slot_w, int(w * scale + 0.5))))


def stitched_layout(size_a: Tuple[int, int], size_b: Tuple[int, int]) -> Tuple[int, int]:
    """(area the pair covers side by side, area it covers top and bottom) on its canvas."""
    height, width = max(size_a[0], size_b[0]), max(size_a[1], size_b[1])
    areas = []
    for horizontal in (True, False):
        covered = 0
        for (h, w), (_, _, slot_w, slot_h) in zip((size_a, size_b),
                                                   _slots(height, width, horizontal)):
            new_h, new_w = _fit(h, w, slot_w, slot_h)
            covered += new_h * new_w
        areas.append(covered)
    return areas[0], areas[1]


def _moved_masks(masks, resize: ResizeTransform, x0: int, y0: int, height: int, width: int):
    if isinstance(masks, PolygonMasks):
        offset = np.array([x0, y0], dtype=np.float64)
        return PolygonMasks([
            [(resize.apply_coords(p.reshape(-1, 2)) + offset).reshape(-1) for p in polys]
            for polys in masks.polygons])
    if isinstance(masks, BitMasks):
        stack = masks.tensor.permute(1, 2, 0).numpy().astype(np.uint8)
        moved = resize.apply_segmentation(stack)
        canvas = torch.zeros(len(masks), height, width, dtype=torch.bool)
        canvas[:, y0:y0 + resize.new_h, x0:x0 + resize.new_w] = torch.from_numpy(
            np.ascontiguousarray(moved.transpose(2, 0, 1))) != 0
        return BitMasks(canvas)
    raise ValueError(f"stitch: cannot move gt_masks of type {type(masks).__name__}")


def _moved_instances(d: dict, resize: ResizeTransform, x0: int, y0: int,
                     height: int, width: int) -> Instances:
    instances = d["instances"]
    unknown = sorted(set(instances.get_fields()) - set(_MOVABLE_FIELDS))
    if unknown:
        raise ValueError(f"stitch: image id {d.get('image_id')} has instance fields {unknown} "
                         f"that stitching cannot move (known: {list(_MOVABLE_FIELDS)})")
    out = Instances((height, width))
    boxes = resize.apply_box(instances.gt_boxes.tensor.numpy().astype(np.float64))
    boxes += np.array([x0, y0, x0, y0], dtype=np.float64)
    out.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
    out.gt_classes = instances.gt_classes
    if instances.has("gt_masks"):
        out.gt_masks = _moved_masks(instances.gt_masks, resize, x0, y0, height, width)
    if instances.has("gt_is_crowd"):
        out.gt_is_crowd = instances.gt_is_crowd
    return out


def stitch_pair(a: dict, b: dict, *, horizontal: bool) -> dict:
    """One training sample holding the mapped samples ``a`` and ``b`` (each with a uint8
    (C, H, W) ``image`` and ``instances``), ``a`` left (or top), ``b`` right (or bottom).

    The result has the larger height and the larger width of the two; each image is scaled to
    fit its half (aspect kept, never enlarged) and placed in the half's top-left corner, the
    rest is 0. Its ``height``/``width`` are its own size (a stitched sample has no original
    image to rescale predictions to); ``image_id``/``file_name`` are ``a``'s, and
    ``stitched_from`` names both image ids."""
    (ha, wa), (hb, wb) = _size(a), _size(b)
    if a["image"].shape[0] != b["image"].shape[0]:
        raise ValueError(f"stitch: image ids {a.get('image_id')} and {b.get('image_id')} have "
                         f"different channel counts")
    fields = [set(d["instances"].get_fields()) for d in (a, b)]
    if fields[0] != fields[1]:
        raise ValueError(f"stitch: image ids {a.get('image_id')} and {b.get('image_id')} have "
                         f"different instance fields {sorted(fields[0])} / {sorted(fields[1])}")
    height, width = max(ha, hb), max(wa, wb)
    canvas = torch.zeros(a["image"].shape[0], height, width, dtype=a["image"].dtype)
    parts = []
    for d, (x0, y0, slot_w, slot_h) in zip((a, b), _slots(height, width, horizontal)):
        h, w = _size(d)
        new_h, new_w = _fit(h, w, slot_w, slot_h)
        resize = ResizeTransform(h, w, new_h, new_w)
        pixels = resize.apply_image(np.ascontiguousarray(d["image"].permute(1, 2, 0).numpy()))
        canvas[:, y0:y0 + new_h, x0:x0 + new_w] = torch.from_numpy(
            np.array(pixels)).permute(2, 0, 1)  # a copy: PIL's arrays are read-only
        parts.append(_moved_instances(d, resize, x0, y0, height, width))
    masks = [p.gt_masks for p in parts if p.has("gt_masks")]
    if len(masks) == 2 and type(masks[0]) is not type(masks[1]):
        # one image came with RLE masks (BitMasks): rasterise the other's polygons too
        for p in parts:
            if isinstance(p.gt_masks, PolygonMasks):
                p.gt_masks = p.gt_masks.to_bitmasks(height, width)
    return {
        "image": canvas,
        "height": height,
        "width": width,
        "image_id": a.get("image_id"),
        "file_name": a.get("file_name"),
        "stitched_from": (a.get("image_id"), b.get("image_id")),
        "instances": Instances.cat(parts),
    }


def stitch_batch(dicts: Sequence[dict], rng: np.random.Generator, prob: float) -> List[dict]:
    """With probability ``prob`` (drawn from ``rng``), two distinct images of the batch drawn
    from ``rng`` are stitched (see :func:`stitch_pair`, layout by the rule in the module
    docstring) into the first one's place; otherwise, or with fewer than two images, the batch
    is returned as it is (a new list, the same dicts)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"INPUT.STITCH must be a probability in [0, 1], got {prob}")
    out = list(dicts)
    if len(out) < 2 or prob == 0.0 or not rng.random() < prob:
        return out
    first, second = (int(i) for i in rng.choice(len(out), size=2, replace=False))
    side_by_side, top_bottom = stitched_layout(_size(out[first]), _size(out[second]))
    horizontal = side_by_side > top_bottom or (side_by_side == top_bottom and rng.random() < 0.5)
    out[first] = stitch_pair(out[first], out[second], horizontal=horizontal)
    return out
