import numpy as np
import pytest
from PIL import Image

from detector.utils.visualizer import (
    class_color,
    draw_instances,
    hstack_images,
    save_image,
    scale_for_display,
)


def _gray(height=96, width=128, value=100):
    return np.full((height, width, 3), value, dtype=np.uint8)


def test_class_colors_fixed_and_distinct():
    colours = [class_color(i) for i in range(40)]
    assert colours == [class_color(i) for i in range(40)]
    assert len(set(colours)) == 40
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colours)
    with pytest.raises(ValueError, match="class id"):
        class_color(-1)


def test_box_outline_has_class_color_and_size_kept():
    image = _gray()
    out = draw_instances(image, boxes=np.array([[20.0, 40.0, 60.0, 80.0], [70, 30, 120, 90]]),
                         classes=np.array([1, 3]), class_names=["a", "b", "c", "d"],
                         scores=np.array([0.9, 0.8]))
    assert out.shape == image.shape and out.dtype == np.uint8
    # left / right / bottom edges (the label sits on the top edge)
    assert tuple(out[60, 20]) == class_color(1)
    assert tuple(out[60, 59]) == class_color(1)
    assert tuple(out[79, 40]) == class_color(1)
    assert tuple(out[60, 70]) == class_color(3)
    assert tuple(out[60, 119]) == class_color(3)
    # inside and outside the box are untouched, and the input is not modified
    assert tuple(out[60, 40]) == (100, 100, 100)
    assert tuple(out[90, 5]) == (100, 100, 100)
    assert (image == 100).all()


def test_label_drawn_above_box_in_class_color():
    out = draw_instances(_gray(), boxes=np.array([[30.0, 50.0, 90.0, 90.0]]),
                         classes=np.array([2]), class_names=["x", "y", "zebra"],
                         scores=np.array([0.75]))
    label_rows = out[30:50, 30:90].reshape(-1, 3)
    colours = {tuple(p) for p in label_rows}
    assert class_color(2) in colours
    # text pixels: something neither background grey nor the fill colour
    assert colours - {class_color(2), (100, 100, 100)}


def test_mask_tinted_with_class_color():
    image = _gray()
    masks = np.zeros((1, 96, 128), dtype=bool)
    masks[0, 45:75, 25:55] = True
    out = draw_instances(image, boxes=np.array([[20.0, 40.0, 60.0, 80.0]]),
                         classes=np.array([0]), masks=masks)
    colour = np.array(class_color(0), dtype=np.float64)
    tinted = out[60, 40].astype(np.float64)
    # strictly between the original grey and the class colour, on every channel that differs
    for c in range(3):
        lo, hi = sorted((100.0, colour[c]))
        assert lo <= tinted[c] <= hi
    assert np.abs(tinted - 100).max() > 20
    assert np.abs(tinted - colour).max() > 20
    # the mask's contour is solid, inside it is tinted only
    assert tuple(out[45, 40]) == tuple(out[60, 25]) == class_color(0)
    # outside the mask but inside the box: untouched
    assert tuple(out[42 + 1, 57]) == (100, 100, 100)


def test_score_threshold_drops_low_scores():
    image = _gray()
    out = draw_instances(image, boxes=np.array([[10.0, 30.0, 50.0, 70.0], [60, 30, 110, 80]]),
                         classes=np.array([0, 1]), scores=np.array([0.9, 0.2]),
                         score_threshold=0.5)
    assert tuple(out[50, 10]) == class_color(0)
    # the kept label sits above y=30; below it nothing of the dropped box remains
    assert (out[30:, 58:] == 100).all()


def test_empty_input_returns_image_unchanged():
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    out = draw_instances(image, boxes=np.zeros((0, 4)), classes=np.zeros((0,), dtype=np.int64),
                         scores=np.zeros((0,)), masks=np.zeros((0, 64, 80), dtype=bool))
    assert out is not image
    np.testing.assert_array_equal(out, image)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        draw_instances(np.zeros((8, 8), np.uint8), boxes=np.zeros((0, 4)), classes=[])
    with pytest.raises(ValueError, match="2 boxes but 1 classes"):
        draw_instances(_gray(), boxes=np.zeros((2, 4)), classes=[0])
    with pytest.raises(ValueError, match="masks must have shape"):
        draw_instances(_gray(), boxes=np.zeros((1, 4)), classes=[0],
                       masks=np.zeros((1, 10, 10), bool))


def test_save_image_png_and_jpeg(tmp_path):
    image = draw_instances(_gray(), boxes=np.array([[20.0, 40.0, 60.0, 80.0]]), classes=[4])
    png = tmp_path / "sub" / "a.png"
    save_image(image, str(png))
    with Image.open(png) as loaded:
        assert loaded.format == "PNG" and loaded.size == (128, 96)
        np.testing.assert_array_equal(np.asarray(loaded.convert("RGB")), image)
    jpg = tmp_path / "a.jpg"
    save_image(image, str(jpg))
    with Image.open(jpg) as loaded:
        assert loaded.format == "JPEG" and loaded.size == (128, 96)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.jpg", "a.png", "sub"]


def test_hstack_images_side_by_side():
    left, right = _gray(40, 30, 10), _gray(50, 20, 200)
    out = hstack_images([left, right], gap=2)
    assert out.shape == (50, 52, 3)
    assert tuple(out[0, 0]) == (10, 10, 10) and tuple(out[0, 32]) == (200, 200, 200)
    assert tuple(out[45, 5]) == (255, 255, 255)


def test_scale_for_display_scales_image_boxes_and_masks():
    masks = np.zeros((1, 96, 128), dtype=bool)
    masks[0, 10:20, 30:50] = True
    image, arrays = scale_for_display(_gray(), 2.0, boxes=np.array([[30.0, 10.0, 50.0, 20.0]]),
                                      classes=np.array([1]), masks=masks, scores=None)
    assert image.shape == (192, 256, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(arrays["boxes"], [[60, 20, 100, 40]])
    assert arrays["masks"].shape == (1, 192, 256) and arrays["masks"].sum() == 4 * masks.sum()
    assert arrays["classes"].tolist() == [1] and arrays["scores"] is None
    out = draw_instances(image, **arrays)
    assert tuple(out[30, 60]) == class_color(1)
    with pytest.raises(ValueError, match="factor must be positive"):
        scale_for_display(_gray(), 0.0, boxes=np.zeros((0, 4)))
