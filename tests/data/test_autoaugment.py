"""Detection AutoAugment: geometric operations move boxes and masks with the pixels, colour and
box-only operations move neither, the v0-v3 policies run through the mapper on images with
masks, and the same generator gives the same sample."""
import numpy as np
import pytest
import torch

from detector.config import get_cfg
from detector.data import DatasetMapper
from detector.data.autoaugment import (
    OPERATIONS,
    POLICIES,
    AutoAugment,
    CutoutTransform,
    PixelTransform,
    make_operation,
)
from detector.data.datasets import generate_shapes_dataset, load_coco_json
from detector.data.transforms import ResizeShortestEdge, apply_augmentations, build_augmentation

H, W = 120, 160
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
BOXES = np.array([[20, 15, 60, 45], [90, 30, 140, 70], [40, 70, 100, 110]], dtype=np.float64)
GEOMETRIC = ["Rotate_BBox", "ShearX_BBox", "ShearY_BBox", "TranslateX_BBox", "TranslateY_BBox"]
BOX_ONLY = [op for op in OPERATIONS if op.endswith("_Only_BBoxes")]
PIXEL_ONLY = [op for op in OPERATIONS if op not in GEOMETRIC and op not in BOX_ONLY]


def _drawn():
    """A dark image with one filled box per colour, and the boxes' masks as (H, W, 3)."""
    image = np.full((H, W, 3), 40, dtype=np.uint8)
    masks = np.zeros((H, W, 3), dtype=np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(BOXES.astype(int)):
        image[y0:y1, x0:x1] = COLOURS[i]
        masks[y0:y1, x0:x1, i] = 1
    return image, masks


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("name", GEOMETRIC)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_geometric_operations_move_boxes_and_masks_with_the_pixels(name, seed):
    image, masks = _drawn()
    # level 10 rotates 30 degrees and shears 0.3; translations (250 px at level 10) use level 1
    level = 1 if name.startswith("Translate") else 10
    t = make_operation(name, 1.0, level, np.random.default_rng(seed), H, W, BOXES)
    out, moved_masks = t.apply_image(image), t.apply_segmentation(masks)
    boxes = t.apply_box(BOXES)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, W)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, H)
    assert not np.array_equal(out, image)
    for i, colour in enumerate(COLOURS):
        ys, xs = np.nonzero((out == colour).all(axis=2))
        assert len(xs) > 100, (name, i)
        x0, y0, x1, y1 = boxes[i]
        # every pixel of the object has its centre inside the moved box ...
        assert (xs + 0.5 >= x0 - 1e-6).all() and (xs + 0.5 <= x1 + 1e-6).all(), (name, i)
        assert (ys + 0.5 >= y0 - 1e-6).all() and (ys + 0.5 <= y1 + 1e-6).all(), (name, i)
        # ... and the box is the object's extent, not a loose bound
        tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert _iou(tight, boxes[i]) > 0.9, (name, i, tight, boxes[i])
        # the mask moved exactly as the pixels did
        np.testing.assert_array_equal(moved_masks[:, :, i] == 1, (out == colour).all(axis=2))
    # pixels nothing maps to are grey 128, as in the reference (the background is 40)
    assert (out == 128).all(axis=2).any()


def test_polygons_move_like_boxes():
    t = make_operation("Rotate_BBox", 1.0, 10, np.random.default_rng(0), H, W, BOXES)
    x0, y0, x1, y1 = BOXES[0]
    polygon = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    moved = t.apply_polygons([polygon])[0]
    box = t.apply_box(BOXES[:1])[0]
    np.testing.assert_allclose(np.concatenate([moved.min(0), moved.max(0)]), box, atol=1e-9)


@pytest.mark.parametrize("name", PIXEL_ONLY)
def test_colour_and_cutout_operations_leave_boxes_and_masks(name):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    masks = rng.integers(0, 2, (H, W, 3), dtype=np.uint8)
    t = make_operation(name, 1.0, 8, rng, H, W, BOXES)
    out = t.apply_image(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(t.apply_box(BOXES), BOXES)
    np.testing.assert_array_equal(t.apply_segmentation(masks), masks)
    polygon = np.array([[1.0, 2.0], [30.0, 2.0], [30.0, 40.0]])
    np.testing.assert_array_equal(t.apply_polygons([polygon])[0], polygon)
    if name != "AutoContrast":  # a uniform-noise image is already at full contrast
        assert not np.array_equal(out, image), name


def test_pixel_operations_follow_the_reference_formulas():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    # Posterize: level 2 -> 0 bits, which the reference's clamped shift turns into 1 bit
    np.testing.assert_array_equal(PixelTransform("Posterize", 0).apply_image(image),
                                  (image >= 128) * np.uint8(128))
    np.testing.assert_array_equal(PixelTransform("Posterize", 4).apply_image(image),
                                  image & 0xF0)
    np.testing.assert_array_equal(PixelTransform("Solarize", 100).apply_image(image),
                                  np.where(image < 100, image, 255 - image))
    added = PixelTransform("SolarizeAdd", 44).apply_image(image).astype(int)
    expected = np.where(image < 128, np.minimum(image.astype(int) + 44, 255), image)
    np.testing.assert_array_equal(added, expected)
    # Cutout at level 1: a 2 * 10 px square of grey, cut by the image border where it crosses it
    unclipped = 0
    for seed in range(20):
        t = make_operation("Cutout", 1.0, 1, np.random.default_rng(seed), H, W, BOXES)
        assert isinstance(t, CutoutTransform) and t.fill == 128
        assert 0 <= t.x0 < t.x1 <= W and 0 <= t.y0 < t.y1 <= H
        assert t.x1 - t.x0 <= 20 and t.y1 - t.y0 <= 20
        if 0 < t.x0 and t.x1 < W and 0 < t.y0 and t.y1 < H:
            assert (t.x1 - t.x0, t.y1 - t.y0) == (20, 20)
            unclipped += 1
    assert unclipped > 10


def test_bbox_cutout_stays_inside_the_image_centred_in_a_box():
    image, _ = _drawn()
    for seed in range(10):
        t = make_operation("BBox_Cutout", 1.0, 10, np.random.default_rng(seed), H, W, BOXES)
        out = t.apply_image(image)
        changed = np.nonzero((out != image).any(axis=2))
        cy, cx = (t.y0 + t.y1) / 2, (t.x0 + t.x1) / 2
        assert any(b[0] - 1 <= cx <= b[2] + 1 and b[1] - 1 <= cy <= b[3] + 1 for b in BOXES)
        assert (out[changed] == 128).all() and len(changed[0]) > 0
        np.testing.assert_array_equal(t.apply_box(BOXES), BOXES)
    empty = make_operation("BBox_Cutout", 1.0, 10, np.random.default_rng(0), H, W,
                           np.zeros((0, 4)))
    np.testing.assert_array_equal(empty.apply_image(image), image)


@pytest.mark.parametrize("name", BOX_ONLY)
def test_box_only_operations_change_pixels_inside_boxes_only(name):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    masks = rng.integers(0, 2, (H, W, 3), dtype=np.uint8)
    # prob 3 makes the per-box probability prob / 3 one: every box is augmented
    t = make_operation(name, 3.0, 6, np.random.default_rng(0), H, W, BOXES)
    out = t.apply_image(image)
    inside = np.zeros((H, W), dtype=bool)
    for x0, y0, x1, y1 in BOXES.astype(int):
        inside[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(out[~inside], image[~inside])
    changed = (out != image).any(axis=2)
    for x0, y0, x1, y1 in BOXES.astype(int):
        assert changed[y0:y1, x0:x1].any(), (name, (x0, y0, x1, y1))
    np.testing.assert_array_equal(t.apply_box(BOXES), BOXES)
    np.testing.assert_array_equal(t.apply_segmentation(masks), masks)


def test_box_only_operations_apply_with_a_third_of_their_probability():
    hits = 0
    for seed in range(300):
        t = make_operation("Flip_Only_BBoxes", 0.6, 0, np.random.default_rng(seed), H, W,
                           BOXES[:1])
        hits += len(getattr(t, "transforms", []))
    assert 0.12 < hits / 300 < 0.28  # 0.6 / 3 = 0.2


def test_policies_are_the_reference_tables():
    assert [len(POLICIES[v]) for v in ("v0", "v1", "v2", "v3")] == [5, 20, 15, 15]
    assert POLICIES["v0"][0] == (("TranslateX_BBox", 0.6, 4), ("Equalize", 0.8, 10))
    for table in POLICIES.values():
        for sub in table:
            for name, prob, level in sub:
                assert name in OPERATIONS and 0 <= prob <= 1 and 0 <= level <= 10


def test_config_appends_the_policy_and_rejects_unknown_ones():
    cfg = get_cfg()
    assert not any(isinstance(a, AutoAugment) for a in build_augmentation(cfg, True))
    cfg.INPUT.AUTOAUGMENT.POLICY = "v2"
    augs = build_augmentation(cfg, True)
    assert isinstance(augs[-1], AutoAugment) and augs[-1].policy == POLICIES["v2"]
    assert not any(isinstance(a, AutoAugment) for a in build_augmentation(cfg, False))
    cfg.INPUT.AUTOAUGMENT.POLICY = "v9"
    with pytest.raises(ValueError, match="INPUT.AUTOAUGMENT.POLICY"):
        build_augmentation(cfg, True)
    with pytest.raises(ValueError, match="boxes"):
        apply_augmentations([AutoAugment("v0")], np.zeros((8, 8, 3), np.uint8),
                            np.random.default_rng(0))


@pytest.fixture(scope="module")
def shapes_dicts(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_aa")
    json_file = generate_shapes_dataset(str(root), num_images=4, seed=3, image_size=(112, 144))
    dicts = load_coco_json(json_file, str(root / "images"))
    # polygons for half of the images (the shapes dataset has RLEs), to cover both mask kinds
    for d in dicts[::2]:
        for a in d["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            a["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    return dicts


def _mapper(policy, seed):
    augs = [ResizeShortestEdge(160, 400)] + ([AutoAugment(policy)] if policy else [])
    return DatasetMapper(is_train=True, augmentations=augs, seed=seed, mask_on=True)


@pytest.mark.parametrize("policy", ["v0", "v1", "v2", "v3"])
def test_policies_run_through_the_mapper_on_images_with_masks(policy, shapes_dicts):
    mapped = [_mapper(policy, s).__call__(d) for s in range(2) for d in shapes_dicts]
    plain = [_mapper("", s).__call__(d) for s in range(2) for d in shapes_dicts]
    assert any(not torch.equal(m["image"], p["image"]) for m, p in zip(mapped, plain))
    for m in mapped:
        inst = m["instances"]
        assert m["image"].dtype == torch.uint8 and m["image"].shape[1:] == inst.image_size
        assert len(inst.gt_boxes) == len(inst.gt_classes) == len(inst.gt_masks)
        h, w = inst.image_size
        bitmasks = (inst.gt_masks.to_bitmasks(h, w) if hasattr(inst.gt_masks, "to_bitmasks")
                    else inst.gt_masks)
        # each mask lies within its box (to a pixel): they moved together
        mask_boxes = bitmasks.get_bounding_boxes().tensor
        boxes = inst.gt_boxes.tensor
        assert (mask_boxes[:, :2] >= boxes[:, :2] - 1.01).all()
        assert (mask_boxes[:, 2:] <= boxes[:, 2:] + 1.01).all()
        assert bitmasks.nonempty().all()
    again = [_mapper(policy, s).__call__(d) for s in range(2) for d in shapes_dicts]
    for a, b in zip(mapped, again):
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)


def test_same_generator_gives_the_same_transform():
    image, _ = _drawn()
    aug = AutoAugment("v1")
    outs = []
    for _ in range(2):
        rng = np.random.default_rng(11)
        results = []
        for _ in range(10):
            t = aug.get_transform(image, rng, boxes=BOXES)
            results.append((t.apply_image(image), t.apply_box(BOXES)))
        outs.append(results)
    for (im_a, box_a), (im_b, box_b) in zip(*outs):
        np.testing.assert_array_equal(im_a, im_b)
        np.testing.assert_array_equal(box_a, box_b)
    assert any(not np.array_equal(im, outs[0][0][0]) for im, _ in outs[0])
