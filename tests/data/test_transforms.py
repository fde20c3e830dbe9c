"""EfficientDet's scale-jitter resize and random crop (INPUT.RESIZE_MODE_TRAIN "scale_jitter")."""
import numpy as np
import pytest

from detector.data import DatasetMapper
from detector.data.transforms import (
    CropTransform,
    ResizeShortestEdge,
    ScaleJitterCrop,
    TransformList,
    build_augmentation,
)


def _bright_region(image):
    """XYXY extent of the pixels above mid-grey."""
    ys, xs = np.nonzero(image[..., 0] > 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def test_crop_transform_moves_image_and_boxes_together():
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[10:20, 30:50] = 255
    crop = CropTransform(x0=25, y0=5, w=30, h=30)
    out = crop.apply_image(image)
    assert out.shape == (30, 30, 3)
    box = crop.apply_box(np.array([[30.0, 10.0, 50.0, 20.0]]))[0]
    np.testing.assert_allclose(box, [5.0, 5.0, 25.0, 15.0])
    np.testing.assert_allclose(_bright_region(out), [5.0, 5.0, 25.0, 15.0])


def test_scale_jitter_output_size_and_scale_range():
    aug = ScaleJitterCrop(target_size=64, scale_range=(0.5, 2.0))
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    longest = []
    for _ in range(200):
        t = aug.get_transform(image, rng)
        out = t.apply_image(image)
        h, w = out.shape[:2]
        assert h <= 64 and w <= 64
        resize = t.transforms[0] if isinstance(t, TransformList) else t
        longest.append(max(resize.new_h, resize.new_w) / 64)
        if isinstance(t, TransformList):  # cropped: the long side fills the square
            assert w == 64
    # the scale of the fitted square spreads over the whole range
    assert 0.5 <= min(longest) < 0.6 and 1.9 < max(longest) <= 2.0 + 1 / 64


def test_scale_jitter_keeps_boxes_on_their_pixels():
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    image[30:90, 40:120] = 255
    box = np.array([[40.0, 30.0, 120.0, 90.0]])
    aug = ScaleJitterCrop(target_size=96, scale_range=(0.8, 1.6))
    rng = np.random.default_rng(1)
    crops = 0
    for _ in range(20):
        t = aug.get_transform(image, rng)
        out = t.apply_image(image)
        moved = t.apply_box(box)[0]
        h, w = out.shape[:2]
        clipped = np.clip(moved, 0, [w, h, w, h])
        if clipped[2] - clipped[0] < 2 or clipped[3] - clipped[1] < 2:
            continue  # the crop missed the object: the mapper drops such boxes
        crops += isinstance(t, TransformList)
        # bilinear resizing blurs edges by at most a pixel
        np.testing.assert_allclose(_bright_region(out), clipped, atol=1.5)
    assert crops > 0, "some draws must crop"


def test_config_selects_scale_jitter_and_rejects_bad_values(tiny_cfg):
    tiny_cfg.INPUT.MAX_SIZE_TRAIN = 64
    assert isinstance(build_augmentation(tiny_cfg, is_train=True)[0], ResizeShortestEdge)
    tiny_cfg.INPUT.RESIZE_MODE_TRAIN = "scale_jitter"
    tiny_cfg.INPUT.SCALE_JITTER_RANGE = (0.25, 1.5)
    aug = build_augmentation(tiny_cfg, is_train=True)[0]
    assert isinstance(aug, ScaleJitterCrop)
    assert (aug.target_size, aug.min_scale, aug.max_scale) == (64, 0.25, 1.5)
    assert isinstance(build_augmentation(tiny_cfg, is_train=False)[0], ResizeShortestEdge)
    tiny_cfg.INPUT.SCALE_JITTER_RANGE = (2.0, 1.0)
    with pytest.raises(ValueError, match="INPUT.SCALE_JITTER_RANGE"):
        build_augmentation(tiny_cfg, is_train=True)
    tiny_cfg.INPUT.RESIZE_MODE_TRAIN = "random"
    with pytest.raises(ValueError, match="INPUT.RESIZE_MODE_TRAIN"):
        build_augmentation(tiny_cfg, is_train=True)


def test_mapper_with_scale_jitter_drops_boxes_cropped_away(tmp_path, tiny_cfg):
    from PIL import Image

    pixels = np.zeros((64, 256, 3), dtype=np.uint8)
    pixels[20:40, 4:24] = 255      # left object
    pixels[20:40, 230:250] = 255   # right object
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    d = {"file_name": str(path), "image_id": 1, "height": 64, "width": 256,
         "annotations": [{"bbox": [4.0, 20.0, 24.0, 40.0], "category_id": 0, "iscrowd": 0},
                         {"bbox": [230.0, 20.0, 250.0, 40.0], "category_id": 1, "iscrowd": 0}]}
    tiny_cfg.INPUT.RESIZE_MODE_TRAIN = "scale_jitter"
    tiny_cfg.INPUT.SCALE_JITTER_RANGE = (4.0, 4.0)  # fits a 256 square: 64 x 256, cropped to 64
    tiny_cfg.INPUT.MAX_SIZE_TRAIN = 64
    tiny_cfg.INPUT.RANDOM_FLIP = "none"
    mapper = DatasetMapper(**DatasetMapper.from_config(tiny_cfg, is_train=True))
    counts = set()
    for _ in range(30):
        out = mapper(d)
        assert tuple(out["image"].shape[1:]) == (64, 64)
        boxes = out["instances"].gt_boxes.tensor
        assert ((boxes[:, 2] - boxes[:, 0]) > 0).all() and (boxes >= 0).all()
        assert (boxes <= 64).all()
        counts.add(len(boxes))
    assert 0 in counts, "some 64-px windows of the 256-px wide image hold no object"
