"""The augmentations' transforms (fvcore's flips and crops, our PIL resize) move pixels, boxes,
polygons and label maps exactly as numpy slicing and the flip / shift / scale formulas say."""
import numpy as np
import pytest
import torch
from fvcore.transforms import PadTransform
from fvcore.transforms import Transform as FvcoreTransform
from PIL import Image

from detector.data import DatasetMapper
from detector.data.transforms import (
    CropTransform,
    HFlipTransform,
    NoOpTransform,
    RandomFlip,
    ResizeShortestEdge,
    ResizeTransform,
    ScaleJitterCrop,
    TransformList,
    VFlipTransform,
    apply_augmentations,
)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _boxes(h, w, n=6, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w - 1, h - 1], size=(n, 2))
    wh = rng.uniform(0.5, 30, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def _pil_bilinear(image, new_h, new_w):
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def _flip_x(boxes, width):
    return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)


def _flip_y(boxes, height):
    return np.stack([boxes[:, 0], height - boxes[:, 3], boxes[:, 2], height - boxes[:, 1]], axis=1)


def _scale(boxes, sx, sy):
    return boxes * np.array([sx, sy, sx, sy])


def test_all_transforms_are_fvcore_transforms():
    for t in (ResizeTransform(4, 6, 2, 3), CropTransform(0, 0, 2, 2), HFlipTransform(6),
              VFlipTransform(4), NoOpTransform(), TransformList([])):
        assert isinstance(t, FvcoreTransform)


def test_flips_and_crop_match_slicing_and_formulas():
    image, boxes = _image(37, 53), _boxes(37, 53)
    hflip, vflip = HFlipTransform(53), VFlipTransform(37)
    assert np.array_equal(hflip.apply_image(image), image[:, ::-1])
    assert np.array_equal(vflip.apply_image(image), image[::-1])
    np.testing.assert_array_equal(hflip.apply_box(boxes), _flip_x(boxes, 53))
    np.testing.assert_array_equal(vflip.apply_box(boxes), _flip_y(boxes, 37))

    crop = CropTransform(x0=7, y0=4, w=30, h=20)
    assert np.array_equal(crop.apply_image(image), image[4:24, 7:37])
    np.testing.assert_array_equal(crop.apply_box(boxes), boxes - np.array([7, 4, 7, 4]))
    assert crop.apply_box(np.zeros((0, 4))).shape == (0, 4)


def test_resize_matches_pil_and_scales_boxes():
    image, boxes = _image(40, 70), _boxes(40, 70)
    resize = ResizeTransform(40, 70, 23, 41)
    assert np.array_equal(resize.apply_image(image), _pil_bilinear(image, 23, 41))
    np.testing.assert_array_equal(resize.apply_box(boxes), _scale(boxes, 41 / 70, 23 / 40))
    # integer coordinates are scaled, not truncated in place
    np.testing.assert_array_equal(resize.apply_coords(np.array([[7, 10]])),
                                  [[7 * (41 / 70), 5.75]])
    with pytest.raises(ValueError, match=r"made for \(h, w\) \(40, 70\), got .* \(39, 70\)"):
        resize.apply_image(image[:39])


def test_resize_of_label_maps_is_nearest_and_inverse_restores_coordinates():
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    resize = ResizeTransform(3, 4, 6, 8)
    assert np.array_equal(resize.apply_segmentation(labels), labels.repeat(2, 0).repeat(2, 1))
    mask = labels % 3 == 0
    up = resize.apply_segmentation(mask)
    assert up.dtype == np.bool_ and np.array_equal(up, mask.repeat(2, 0).repeat(2, 1))
    coords = np.array([[1.0, 2.0], [3.5, 0.25]])
    back = resize.inverse().apply_coords(resize.apply_coords(coords.copy()))
    np.testing.assert_allclose(back, coords, rtol=0, atol=1e-12)


def test_polygons_follow_resize_crop_and_flip():
    polygon = np.array([[10.0, 5.0], [30.0, 5.0], [30.0, 25.0], [12.0, 20.0]])
    chain = TransformList([ResizeTransform(40, 60, 20, 30), HFlipTransform(30),
                           VFlipTransform(20)])
    (moved,) = chain.apply_polygons([polygon.copy()])
    expected = polygon * 0.5
    expected[:, 0] = 30 - expected[:, 0]
    expected[:, 1] = 20 - expected[:, 1]
    np.testing.assert_array_equal(moved, expected)


@pytest.mark.parametrize("seed", range(4))
def test_scale_jitter_and_flip_chain_equals_step_by_step_numpy(seed):
    image, boxes = _image(90, 130, seed), _boxes(90, 130, seed=seed)
    augs = [ScaleJitterCrop(target_size=64, scale_range=(0.8, 1.6)), RandomFlip(prob=0.5)]
    out, chain = apply_augmentations(augs, image, np.random.default_rng(seed))

    expected_image, expected_boxes = image, boxes
    kinds = [type(t) for t in chain]
    for t in chain:
        if isinstance(t, ResizeTransform):
            assert (t.h, t.w) == expected_image.shape[:2]
            expected_image = _pil_bilinear(expected_image, t.new_h, t.new_w)
            expected_boxes = _scale(expected_boxes, t.new_w / t.w, t.new_h / t.h)
        elif isinstance(t, CropTransform):
            expected_image = expected_image[t.y0:t.y0 + t.h, t.x0:t.x0 + t.w]
            expected_boxes = expected_boxes - np.array([t.x0, t.y0, t.x0, t.y0])
        elif isinstance(t, HFlipTransform):
            assert t.width == expected_image.shape[1]
            expected_image = expected_image[:, ::-1]
            expected_boxes = _flip_x(expected_boxes, t.width)
        else:
            assert isinstance(t, NoOpTransform)
    assert kinds[0] is ResizeTransform and max(out.shape[:2]) <= 64
    assert np.array_equal(out, expected_image)
    np.testing.assert_array_equal(chain.apply_box(boxes), expected_boxes)


def test_seeded_draws_cover_crop_and_flip():
    """The chain test above sees every kind of step for some seed."""
    kinds = set()
    augs = [ScaleJitterCrop(target_size=64, scale_range=(0.8, 1.6)), RandomFlip(prob=0.5)]
    for seed in range(4):
        _, chain = apply_augmentations(augs, _image(90, 130, seed), np.random.default_rng(seed))
        kinds |= {type(t) for t in chain}
    assert {CropTransform, HFlipTransform, NoOpTransform} <= kinds


def test_crop_from_scale_jitter_is_invertible():
    aug = ScaleJitterCrop(target_size=32, scale_range=(2.0, 2.0))
    chain = aug.get_transform(_image(40, 50), np.random.default_rng(0))
    resize, crop = chain.transforms
    assert (crop.orig_h, crop.orig_w) == (resize.new_h, resize.new_w) == (51, 64)
    pad = crop.inverse()
    assert isinstance(pad, PadTransform)
    boxes = _boxes(51, 64)
    np.testing.assert_allclose(pad.apply_box(crop.apply_box(boxes)), boxes, rtol=0, atol=1e-12)
    assert pad.apply_image(crop.apply_image(_image(51, 64))).shape[:2] == (51, 64)


def test_mapper_output_equals_numpy_pipeline(tmp_path):
    image = _image(48, 80, seed=3)
    path = tmp_path / "noise.png"
    Image.fromarray(image).save(path)
    boxes = np.array([[4.0, 6.0, 30.0, 40.0], [50.5, 10.25, 79.0, 47.5]])
    d = {"file_name": str(path), "image_id": 9, "height": 48, "width": 80,
         "annotations": [{"bbox": b.tolist(), "category_id": i, "iscrowd": 0}
                         for i, b in enumerate(boxes)]}
    mapper = DatasetMapper(is_train=True,
                           augmentations=[ResizeShortestEdge((30,), 0), RandomFlip(prob=1.0)])
    out = mapper(d)
    # 48x80 -> short side 30: 30x50, then mirrored
    expected = _pil_bilinear(image, 30, 50)[:, ::-1]
    assert torch.equal(out["image"], torch.from_numpy(expected.transpose(2, 0, 1).copy()))
    expected_boxes = np.clip(_flip_x(_scale(boxes, 50 / 80, 30 / 48), 50), 0, [50, 30, 50, 30])
    assert torch.equal(out["instances"].gt_boxes.tensor,
                       torch.as_tensor(expected_boxes, dtype=torch.float32))
    assert out["instances"].gt_classes.tolist() == [0, 1]


def test_mapper_drops_inverted_boxes_that_the_transforms_would_reorder(tmp_path):
    path = tmp_path / "black.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(path)
    d = {"file_name": str(path), "image_id": 1, "height": 32, "width": 32,
         "annotations": [{"bbox": [20.0, 4.0, 10.0, 12.0], "category_id": 0, "iscrowd": 0},
                         {"bbox": [2.0, 3.0, 9.0, 8.0], "category_id": 1, "iscrowd": 0}]}
    out = DatasetMapper(is_train=True, augmentations=[RandomFlip(prob=1.0)])(d)
    assert out["instances"].gt_classes.tolist() == [1]
    assert out["instances"].gt_boxes.tensor.tolist() == [[23.0, 3.0, 30.0, 8.0]]
