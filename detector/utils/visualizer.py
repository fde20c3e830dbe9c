"""Draw detections (boxes, class names, scores, masks) on images, numpy in and numpy out.

Every tool that shows pictures (demo, dataset and prediction visualisation, TensorBoard images)
draws through ``draw_instances`` so colours and label style are the same everywhere::

    drawn = draw_instances(image_rgb, boxes=xyxy, classes=labels, class_names=names,
                           scores=scores, score_threshold=0.5)
    save_image(drawn, "out/000123.png")

Box outlines are drawn without anti-aliasing in exactly ``class_color(class_id)``, so a pixel
on the outline of a box has that colour (unless a later box or label covers it).
"""
import colorsys
import os
import tempfile
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["class_color", "draw_instances", "save_image", "hstack_images", "scale_for_display"]

_MASK_ALPHA = 0.5


@lru_cache(maxsize=None)
def _base_palette() -> Tuple[Tuple[int, int, int], ...]:
    # matplotlib's tab10 then the light tab20 variants: 20 well-separated colours; grey is left
    # out because it reads as "background" next to a grey image
    tab10 = matplotlib.colormaps["tab10"].colors
    tab20_light = matplotlib.colormaps["tab20"].colors[1::2]
    colours = [c for i, c in enumerate(tab10) if i != 7]
    colours += [c for i, c in enumerate(tab20_light) if i != 7]
    return tuple(tuple(int(round(255 * v)) for v in c[:3]) for c in colours)


def class_color(class_id: int) -> Tuple[int, int, int]:
    """A fixed RGB colour for ``class_id``: a 18-colour palette, then golden-ratio hues."""
    class_id = int(class_id)
    if class_id < 0:
        raise ValueError(f"class_color: class id must be >= 0, got {class_id}")
    palette = _base_palette()
    if class_id < len(palette):
        return palette[class_id]
    # beyond the palette, step the hue by the golden ratio so neighbouring ids stay apart
    hue = (0.13 + (class_id - len(palette)) * 0.6180339887) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.9)
    return (int(round(255 * r)), int(round(255 * g)), int(round(255 * b)))


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont:
    # DejaVu Sans ships with matplotlib, so labels look the same on every machine
    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return ImageFont.load_default(size=size)


def _text_color(background: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    luma = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def _label_text(class_id: int, class_names: Optional[Sequence[str]],
                score: Optional[float]) -> str:
    if class_names is not None and 0 <= class_id < len(class_names):
        name = str(class_names[class_id])
    else:
        name = f"class {class_id}"
    return name if score is None else f"{name} {score:.2f}"


def _mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (or on the image border)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def _check_inputs(image, boxes, classes, scores, masks):
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 \
            or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"draw_instances: image must be an (H, W, 3) uint8 RGB array, "
                         f"got shape {shape} dtype {dtype}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if boxes is not None \
        else np.zeros((0, 4))
    classes = np.asarray(classes, dtype=np.int64).reshape(-1) if classes is not None \
        else np.zeros((0,), dtype=np.int64)
    n = len(boxes)
    if len(classes) != n:
        raise ValueError(f"draw_instances: {n} boxes but {len(classes)} classes")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != n:
            raise ValueError(f"draw_instances: {n} boxes but {len(scores)} scores")
    if masks is not None:
        masks = np.asarray(masks).astype(bool, copy=False)
        if masks.shape != (n,) + image.shape[:2]:
            raise ValueError(f"draw_instances: masks must have shape {(n,) + image.shape[:2]} "
                             f"(N, H, W) to match boxes and image, got {masks.shape}")
    return boxes, classes, scores, masks


def draw_instances(image: np.ndarray, *, boxes: np.ndarray, classes: np.ndarray,
                   class_names: Optional[Sequence[str]] = None,
                   scores: Optional[np.ndarray] = None,
                   masks: Optional[np.ndarray] = None,
                   score_threshold: float = 0.0) -> np.ndarray:
    """Draw instances on a copy of ``image`` and return it.

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) absolute XYXY in pixels; the outline covers pixel columns
            ``round(x1) .. round(x2) - 1`` and rows ``round(y1) .. round(y2) - 1``, drawn inward.
        classes: (N,) class ids (contiguous, indexing ``class_names``).
        class_names: names for the labels; ``None`` labels as "class <id>".
        scores: (N,) confidences; shown in the label, and instances with
            ``score < score_threshold`` are not drawn. ``None``: all drawn, no score in labels.
        masks: (N, H, W) bool, blended semi-transparently in the class colour, with a solid
            one-pixel contour in that colour.
        score_threshold: minimum score to draw (ignored when ``scores`` is None).

    Returns:
        (H, W, 3) uint8 RGB, the same size as ``image``; ``image`` itself is not modified.
    """
    boxes, classes, scores, masks = _check_inputs(image, boxes, classes, scores, masks)
    keep = np.all(np.isfinite(boxes), axis=1)
    if scores is not None:
        keep &= scores >= score_threshold
    indices = np.nonzero(keep)[0]
    if len(indices) == 0:
        return image.copy()

    height, width = image.shape[:2]
    # large instances first so small ones stay visible on top
    areas = (boxes[indices, 2] - boxes[indices, 0]) * (boxes[indices, 3] - boxes[indices, 1])
    indices = indices[np.argsort(-areas, kind="stable")]

    canvas = image.astype(np.float32)
    if masks is not None:
        for i in indices:
            colour = np.array(class_color(classes[i]), dtype=np.float32)
            region = masks[i]
            canvas[region] = canvas[region] * (1.0 - _MASK_ALPHA) + colour * _MASK_ALPHA
            # a solid contour keeps the mask visible on objects of a similar colour
            canvas[_mask_boundary(region)] = colour
    pil_image = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil_image)

    scale = (height * width) ** 0.5
    line_width = max(1, int(round(scale / 200)))
    font = _font(max(10, int(round(scale / 32))))

    pixel_boxes = []
    for i in indices:
        x0 = int(np.clip(round(boxes[i, 0]), 0, width - 1))
        y0 = int(np.clip(round(boxes[i, 1]), 0, height - 1))
        x1 = int(np.clip(round(boxes[i, 2]) - 1, x0, width - 1))
        y1 = int(np.clip(round(boxes[i, 3]) - 1, y0, height - 1))
        pixel_boxes.append((x0, y0, x1, y1))
        draw.rectangle((x0, y0, x1, y1), outline=class_color(classes[i]), width=line_width)

    # labels after all outlines so no box line crosses a label
    for i, (x0, y0, x1, y1) in zip(indices, pixel_boxes):
        colour = class_color(classes[i])
        text = _label_text(int(classes[i]), class_names,
                           None if scores is None else float(scores[i]))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left, bottom - top
        pad = max(1, text_h // 5)
        label_w, label_h = text_w + 2 * pad, text_h + 2 * pad
        # above the box when there is room, otherwise just inside its top edge
        label_y = y0 - label_h if y0 - label_h >= 0 else y0
        label_x = min(x0, max(0, width - label_w))
        draw.rectangle((label_x, label_y, label_x + label_w - 1, label_y + label_h - 1),
                       fill=colour)
        draw.text((label_x + pad - left, label_y + pad - top), text, font=font,
                  fill=_text_color(colour))
    return np.asarray(pil_image, dtype=np.uint8).copy()


def scale_for_display(image: np.ndarray, factor: float, **arrays) -> Tuple[np.ndarray, dict]:
    """Enlarge (or shrink) ``image`` by ``factor`` before drawing, so labels stay readable on
    small images: returns the resized image and ``arrays`` (the ``draw_instances`` keyword
    arrays) with ``boxes`` scaled and ``masks`` resized alike (nearest neighbour)."""
    if factor <= 0:
        raise ValueError(f"scale_for_display: factor must be positive, got {factor}")
    height, width = image.shape[:2]
    size = (max(1, int(round(width * factor))), max(1, int(round(height * factor))))
    if factor == 1.0:
        return image, dict(arrays)
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC), dtype=np.uint8)
    out = dict(arrays)
    if out.get("boxes") is not None:
        scale = np.array([size[0] / width, size[1] / height] * 2)
        out["boxes"] = np.asarray(out["boxes"], dtype=np.float64).reshape(-1, 4) * scale
    if out.get("masks") is not None:
        masks = np.asarray(out["masks"]).astype(bool, copy=False)
        out["masks"] = np.stack(
            [np.asarray(Image.fromarray(m).resize(size, Image.NEAREST)) for m in masks]
        ) if len(masks) else np.zeros((0, size[1], size[0]), dtype=bool)
    return resized, out


def hstack_images(images: Sequence[np.ndarray], gap: int = 4,
                  gap_color: Tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Put (H_i, W_i, 3) uint8 images side by side, top-aligned, separated by ``gap`` pixels."""
    if not images:
        raise ValueError("hstack_images: no images given")
    height = max(img.shape[0] for img in images)
    width = sum(img.shape[1] for img in images) + gap * (len(images) - 1)
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[:] = np.array(gap_color, dtype=np.uint8)
    x = 0
    for img in images:
        out[:img.shape[0], x:x + img.shape[1]] = img
        x += img.shape[1] + gap
    return out


def save_image(image: np.ndarray, path: str) -> None:
    """Write an (H, W, 3) uint8 RGB image to ``path`` atomically; JPEG for .jpg/.jpeg, else PNG."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 \
            or image.dtype != np.uint8:
        raise ValueError(f"save_image: {path}: image must be an (H, W, 3) uint8 RGB array, "
                         f"got shape {getattr(image, 'shape', None)}")
    ext = os.path.splitext(path)[1].lower()
    fmt = "JPEG" if ext in (".jpg", ".jpeg") else "PNG"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=ext or ".png")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image).save(f, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
