"""The built-in synthetic "shapes" detection dataset: circles, squares and triangles of random
colours on textured backgrounds, written once as PNG images + a COCO instances json.

Each image is drawn from its own ``numpy.random.RandomState([seed, image_index])`` so the output
is bit-identical across runs and machines. Later shapes may occlude earlier ones a little (every
object keeps >= 65% of its area visible); boxes and RLE masks describe the visible part only."""
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

from detector.utils.env import get_cache_dir

__all__ = [
    "SHAPES_CLASSES", "SHAPES_SPLITS", "SHAPES_VERSION", "generate_shapes_dataset",
    "ensure_shapes_dataset", "shapes_split_dir", "shapes_json_file", "shapes_image_root",
    "get_cache_dir",
]

logger = logging.getLogger("detector.data")

SHAPES_VERSION = "shapes_v1"
# Category names; their COCO ids are 1, 2, 3 in this order
SHAPES_CLASSES = ("circle", "square", "triangle")
# split -> (number of images, seed); different seeds keep train and val disjoint
SHAPES_SPLITS: Dict[str, Tuple[int, int]] = {"train": (1000, 1), "val": (200, 2)}

_MIN_EXTENT, _MAX_EXTENT = 16, 56  # bounding extent of a shape in pixels
_MAX_OBJECTS = 4
_MIN_VISIBLE = 0.65  # fraction of a shape that must stay visible under later shapes
_PLACEMENT_TRIES = 30


def _background(rng: np.random.RandomState, height: int, width: int) -> np.ndarray:
    """Float (H, W, 3) in 0-255: smooth colour noise, a linear gradient or sinusoidal stripes."""
    kind = rng.randint(3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 0:
        cells = rng.randint(3, 9)
        coarse = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
        return np.asarray(
            Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32
        )
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    proj = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == 1:
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    else:
        period = rng.uniform(6, 32)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * proj / period + rng.uniform(0, 2 * np.pi))
    return c0 + (c1 - c0) * t[..., None]


def _shape_mask(rng: np.random.RandomState, label: int, height: int, width: int) -> np.ndarray:
    """Boolean mask of one shape of class ``label`` placed fully inside the image."""
    extent = rng.uniform(_MIN_EXTENT, _MAX_EXTENT)
    if label == 0:  # circle
        unit = None
    elif label == 1:  # square, rotated a little
        angle = np.deg2rad(rng.uniform(-30, 30))
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        unit = corners @ rot.T
    else:  # equilateral triangle, any rotation
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3
        unit = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if unit is None:
        r = extent / 2
        cx = rng.uniform(r, width - r)
        cy = rng.uniform(r, height - r)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        unit = unit - (unit.max(0) + unit.min(0)) / 2  # centre the bounding box
        pts = unit * (extent / np.ptp(unit, axis=0).max())
        half = np.ptp(pts, axis=0) / 2
        cx = rng.uniform(half[0], width - half[0])
        cy = rng.uniform(half[1], height - half[1])
        draw.polygon([(float(x + cx), float(y + cy)) for x, y in pts], fill=1)
    return np.asarray(canvas, dtype=bool)


def _contrasting_colour(rng: np.random.RandomState, background: np.ndarray, mask: np.ndarray):
    """A random colour, redrawn a few times to keep the best contrast with what it covers."""
    under = background[mask].mean(axis=0)
    best, best_diff = None, -1.0
    for _ in range(8):
        colour = rng.uniform(0, 255, size=3)
        diff = float(np.abs(colour - under).sum())
        if diff > best_diff:
            best, best_diff = colour, diff
        if diff >= 150:
            break
    return best


def _render_image(seed: int, index: int, height: int, width: int):
    """(uint8 image, [(label, visible mask)]) of image ``index`` of a split with ``seed``."""
    rng = np.random.RandomState([seed, index])
    image = _background(rng, height, width)
    objects: List[Tuple[int, np.ndarray, int]] = []  # (label, visible mask, full area)
    for _ in range(rng.randint(1, _MAX_OBJECTS + 1)):
        label = rng.randint(len(SHAPES_CLASSES))
        for _ in range(_PLACEMENT_TRIES):
            mask = _shape_mask(rng, label, height, width)
            if all((vis & ~mask).sum() >= _MIN_VISIBLE * area for _, vis, area in objects):
                break
        else:
            continue  # no placement with mild occlusion only: fewer objects in this image
        image[mask] = _contrasting_colour(rng, image, mask)
        objects = [(lbl, vis & ~mask, area) for lbl, vis, area in objects]
        objects.append((label, mask, int(mask.sum())))
    image += rng.normal(0, 4.0, size=image.shape)  # mild sensor noise
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, [(lbl, vis) for lbl, vis, _ in objects]


def _annotation(ann_id: int, image_id: int, label: int, visible: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(visible.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    ys, xs = np.nonzero(visible)
    x0, y0 = int(xs.min()), int(ys.min())
    # pixel i spans [i, i + 1): the tight box ends one past the last covered pixel
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": label + 1,
        "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
        "area": int(visible.sum()),
        "iscrowd": 0,
        "segmentation": rle,
    }


def generate_shapes_dataset(
    output_dir: str,
    num_images: int,
    seed: int,
    image_size: Union[int, Sequence[int]] = 128,
    json_name: str = "instances.json",
) -> str:
    """Write ``num_images`` PNGs to ``output_dir/images`` and a COCO instances json to
    ``output_dir/json_name`` (returned). ``image_size`` is an int or (height, width).
    Overwrites files of the same names; see ``ensure_shapes_dataset`` for the cached splits."""
    if isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = (int(s) for s in image_size)
    if min(height, width) < 2 * _MAX_EXTENT:
        raise ValueError(f"shapes images must be at least {2 * _MAX_EXTENT} px per side, "
                         f"got {height}x{width}")
    image_dir = os.path.join(output_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1
        pixels, objects = _render_image(seed, index, height, width)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(os.path.join(image_dir, file_name), compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for label, visible in objects:
            annotations.append(_annotation(len(annotations) + 1, image_id, label, visible))
    data = {
        "info": {"description": f"detector synthetic {SHAPES_VERSION}", "seed": seed,
                 "num_images": num_images},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                       for i, n in enumerate(SHAPES_CLASSES)],
    }
    json_path = os.path.join(output_dir, json_name)
    with open(json_path, "w") as f:
        json.dump(data, f)
    return json_path


def shapes_split_dir(split: str) -> str:
    """Cache folder of a split: $DETECTOR_CACHE/shapes_v1/<split>."""
    if split not in SHAPES_SPLITS:
        raise ValueError(f"Unknown shapes split '{split}'; choose from {sorted(SHAPES_SPLITS)}")
    return os.path.join(get_cache_dir(), SHAPES_VERSION, split)


def shapes_json_file(split: str) -> str:
    return os.path.join(shapes_split_dir(split), f"instances_{split}.json")


def shapes_image_root(split: str) -> str:
    return os.path.join(shapes_split_dir(split), "images")


def _remove_stale_incomplete(parent: str, split: str, max_age_s: float = 3600.0) -> None:
    """Delete temp folders of runs that were killed mid-generation (older than an hour, so a
    concurrent generation in another process is left alone)."""
    now = time.time()
    for entry in os.listdir(parent):
        if not entry.startswith(f".{split}-incomplete-"):
            continue
        path = os.path.join(parent, entry)
        try:
            if now - os.path.getmtime(path) > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:  # removed by another process meanwhile
            pass


def ensure_shapes_dataset(split: str) -> str:
    """Generate the cached split on first use and return its json path.

    The split is built in a temporary sibling folder and renamed into place, so an interrupted run
    never leaves a partial dataset, and concurrent processes (one per rank) simply let the first
    finished copy win."""
    final_dir = shapes_split_dir(split)
    json_path = shapes_json_file(split)
    if os.path.isfile(json_path):
        return json_path
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    num_images, seed = SHAPES_SPLITS[split]
    _remove_stale_incomplete(parent, split)
    logger.info("Generating synthetic %s/%s (%d images, first use) into %s",
                SHAPES_VERSION, split, num_images, final_dir)
    start = time.perf_counter()
    tmp_dir = tempfile.mkdtemp(prefix=f".{split}-incomplete-", dir=parent)
    os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        generate_shapes_dataset(tmp_dir, num_images, seed, json_name=os.path.basename(json_path))
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            if not os.path.isfile(json_path):  # not another process finishing first
                raise RuntimeError(
                    f"{final_dir} exists without {os.path.basename(json_path)}; delete the "
                    f"folder to regenerate the shapes dataset"
                ) from None
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("Generated synthetic %s/%s in %.1fs", SHAPES_VERSION, split,
                time.perf_counter() - start)
    return json_path
