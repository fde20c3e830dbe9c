import numpy as np
import pytest
import torch
from PIL import Image

from detector.data import DatasetMapper, ImageLoadError, ImageSizeMismatchError
from detector.data.transforms import RandomFlip, ResizeShortestEdge, build_augmentation


def _dict(path, height, width, boxes, classes=None, crowd=None):
    classes = classes or [0] * len(boxes)
    crowd = crowd or [0] * len(boxes)
    return {
        "file_name": str(path), "image_id": 5, "height": height, "width": width,
        "annotations": [{"bbox": list(map(float, b)), "category_id": c, "iscrowd": z}
                        for b, c, z in zip(boxes, classes, crowd)],
    }


def _rect_image(tmp_path, height, width, box):
    """Black PNG with a white rectangle exactly covering ``box`` (XYXY, integer)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = 255
    path = tmp_path / "rect.png"
    Image.fromarray(pixels).save(path)
    return path


def test_train_and_test_sizes(tmp_path, tiny_cfg):
    path = _rect_image(tmp_path, 100, 200, (10, 20, 50, 60))
    d = _dict(path, 100, 200, [(10, 20, 50, 60)])
    tiny_cfg.INPUT.MIN_SIZE_TRAIN = (40, 50)
    tiny_cfg.INPUT.MAX_SIZE_TRAIN = 1000
    train = DatasetMapper(**DatasetMapper.from_config(tiny_cfg, is_train=True))
    seen = set()
    for _ in range(30):
        out = train(d)
        c, h, w = out["image"].shape
        assert c == 3 and out["image"].dtype == torch.uint8
        assert (h, w) in {(40, 80), (50, 100)}
        seen.add(h)
        assert (out["height"], out["width"]) == (100, 200)  # original size
        assert out["instances"].image_size == (h, w)
        assert out["instances"].gt_classes.dtype == torch.int64
    assert seen == {40, 50}  # both sizes are sampled

    # longer side capped by MAX_SIZE_TEST: 100x200 with short 100 would be 200 wide > 150
    tiny_cfg.INPUT.MIN_SIZE_TEST = 100
    tiny_cfg.INPUT.MAX_SIZE_TEST = 150
    test = DatasetMapper(**DatasetMapper.from_config(tiny_cfg, is_train=False))
    out = test(d)
    assert tuple(out["image"].shape) == (3, 75, 150)
    assert "instances" not in out and out["image_id"] == 5 and out["file_name"] == str(path)


def test_boxes_follow_resize(tmp_path):
    path = _rect_image(tmp_path, 100, 200, (10, 20, 50, 60))
    mapper = DatasetMapper(is_train=True, augmentations=[ResizeShortestEdge((50,), 0)])
    out = mapper(_dict(path, 100, 200, [(10, 20, 50, 60)]))
    assert torch.allclose(out["instances"].gt_boxes.tensor, torch.tensor([[5.0, 10.0, 25.0, 30.0]]))


@pytest.mark.parametrize("seed", range(6))
def test_flip_box_matches_flipped_content(tmp_path, tiny_cfg, seed):
    box = (8, 12, 30, 40)
    path = _rect_image(tmp_path, 64, 96, box)
    tiny_cfg.SEED = seed
    mapper = DatasetMapper(**DatasetMapper.from_config(tiny_cfg, is_train=True))  # flip p=0.5
    out = mapper(_dict(path, 64, 96, [box]))
    image = out["image"][0]
    x1, y1, x2, y2 = out["instances"].gt_boxes.tensor[0].round().long().tolist()
    # white exactly inside the box, black everywhere else
    assert (image[y1:y2, x1:x2] == 255).all()
    inside = torch.zeros_like(image, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    assert (image[~inside] == 0).all()


def test_forced_flip_mirrors_image_and_box(tmp_path):
    box = (8, 12, 30, 40)
    path = _rect_image(tmp_path, 64, 96, box)
    d = _dict(path, 64, 96, [box])
    plain = DatasetMapper(is_train=True, augmentations=[])(d)
    flipped = DatasetMapper(is_train=True, augmentations=[RandomFlip(prob=1.0)])(d)
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert flipped["instances"].gt_boxes.tensor.tolist() == [[96 - 30, 12, 96 - 8, 40]]


def test_flip_probability_is_about_half(tmp_path, tiny_cfg):
    path = _rect_image(tmp_path, 64, 96, (0, 0, 10, 10))
    tiny_cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    mapper = DatasetMapper(**DatasetMapper.from_config(tiny_cfg, is_train=True))
    flips = sum(
        int(mapper(_dict(path, 64, 96, [(0, 0, 10, 10)]))["instances"].gt_boxes.tensor[0, 0] > 0)
        for _ in range(200)
    )
    assert 70 < flips < 130


def test_crowd_and_emptied_boxes_dropped(tmp_path):
    path = _rect_image(tmp_path, 64, 96, (0, 0, 1, 1))
    d = _dict(path, 64, 96, [(5, 5, 20, 20), (0, 0, 96, 64), (30, 30, 30.000001, 40)],
              classes=[2, 1, 0], crowd=[0, 1, 0])
    out = DatasetMapper(is_train=True, augmentations=[], keep_crowd=False)(d)
    assert out["instances"].gt_boxes.tensor.tolist() == [[5, 5, 20, 20]]
    assert out["instances"].gt_classes.tolist() == [2]
    assert not out["instances"].has("gt_is_crowd")
    assert len(d["annotations"]) == 3  # input not modified


def test_crowd_kept_as_regions_follow_the_transforms(tmp_path, tiny_cfg):
    path = _rect_image(tmp_path, 64, 96, (0, 0, 1, 1))
    d = _dict(path, 64, 96, [(5, 5, 20, 20), (40, 0, 96, 32), (30, 30, 30.000001, 40)],
              classes=[2, 1, 0], crowd=[0, 1, 1])
    assert tiny_cfg.INPUT.KEEP_CROWD  # the default
    kwargs = DatasetMapper.from_config(tiny_cfg, is_train=True)
    kwargs["augmentations"] = [RandomFlip(prob=1.0)]
    out = DatasetMapper(**kwargs)(d)
    inst = out["instances"]
    # flipped in a 96-wide image; the emptied crowd box is dropped like any empty box
    assert inst.gt_boxes.tensor.tolist() == [[76, 5, 91, 20], [0, 0, 56, 32]]
    assert inst.gt_classes.tolist() == [2, 1]
    assert inst.gt_is_crowd.tolist() == [False, True]


def test_bgr_format(tmp_path):
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[..., 0] = 200  # red
    path = tmp_path / "red.png"
    Image.fromarray(pixels).save(path)
    d = _dict(path, 8, 8, [])
    rgb = DatasetMapper(is_train=False, augmentations=[], image_format="RGB")(d)["image"]
    bgr = DatasetMapper(is_train=False, augmentations=[], image_format="BGR")(d)["image"]
    assert rgb[0].eq(200).all() and bgr[2].eq(200).all() and bgr[0].eq(0).all()


def test_exif_orientation_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    out = DatasetMapper(is_train=False, augmentations=[])(_dict(path, 20, 10, []))
    assert tuple(out["image"].shape) == (3, 20, 10)


def test_missing_image_raises_one_line_error(tmp_path):
    missing = tmp_path / "missing.jpg"
    mapper = DatasetMapper(is_train=True, augmentations=[])
    with pytest.raises(ImageLoadError) as info:
        mapper(_dict(missing, 10, 10, [(1, 1, 5, 5)]))
    assert str(missing) in str(info.value) and "\n" not in str(info.value)


def test_corrupt_image_raises_one_line_error(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    mapper = DatasetMapper(is_train=False, augmentations=[])
    with pytest.raises(ImageLoadError) as info:
        mapper(_dict(corrupt, 10, 10, []))
    assert str(corrupt) in str(info.value) and "\n" not in str(info.value)


def test_truncated_image_raises(tmp_path):
    path = tmp_path / "truncated.jpg"
    noise = np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        DatasetMapper(is_train=False, augmentations=[])(_dict(path, 64, 64, []))


def test_size_mismatch_names_file(tmp_path):
    path = _rect_image(tmp_path, 64, 96, (0, 0, 1, 1))
    with pytest.raises(ImageSizeMismatchError) as info:
        DatasetMapper(is_train=False, augmentations=[])(_dict(path, 60, 96, []))
    assert str(path) in str(info.value) and "96x64" in str(info.value)


def test_bad_flip_setting(tiny_cfg):
    tiny_cfg.INPUT.RANDOM_FLIP = "diagonal"
    with pytest.raises(ValueError, match="INPUT.RANDOM_FLIP"):
        build_augmentation(tiny_cfg, is_train=True)
