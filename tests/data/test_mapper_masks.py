"""Masks in the data path: the mapper's gt_masks follow the image through resize, flip and crop,
stay aligned with the boxes, and every bad input is a counted skip or a one-line error."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_util

from detector.data import DatasetMapper, load_coco_json
from detector.data.datasets import generate_shapes_dataset
from detector.data.transforms import (
    Augmentation,
    CropTransform,
    RandomFlip,
    ResizeShortestEdge,
    ResizeTransform,
    ScaleJitterCrop,
    clip_polygon,
)
from detector.structures import BitMasks, PolygonMasks, polygons_to_rles

from data_helpers import ann, write_coco
from log_capture import CollectLogs

H, W = 80, 100
# a concave arrow and a triangle that reaches the right border: crops cut both
ARROW = [10.0, 10.0, 50.0, 10.0, 50.0, 30.0, 30.0, 30.0, 30.0, 70.0, 10.0, 70.0]
TRIANGLE = [60.0, 20.0, 100.0, 40.0, 60.0, 75.0]
# an L whose box [0, 0, 60, 60] has an empty top-right corner
L_SHAPE = [0.0, 0.0, 10.0, 0.0, 10.0, 50.0, 60.0, 50.0, 60.0, 60.0, 0.0, 60.0]


class FixedCrop(Augmentation):
    """Always the same window (x0, y0, w, h)."""

    def __init__(self, x0, y0, w, h):
        self.window = (x0, y0, w, h)

    def get_transform(self, image, rng):
        return CropTransform(*self.window, orig_w=image.shape[1], orig_h=image.shape[0])


def _rasterise(polygon, h=H, w=W) -> np.ndarray:
    return mask_util.decode(polygons_to_rles([[np.array(polygon)]], h, w)[0]).astype(bool)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _write_channels(tmp_path, masks, h=H, w=W):
    """PNG whose channel c is 255 exactly on masks[c] (the polygons' rasterisation)."""
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    for c, m in enumerate(masks):
        pixels[..., c][m] = 255
    path = tmp_path / "masks.png"
    Image.fromarray(pixels).save(path)
    return path


def _dict(path, annotations, h=H, w=W, image_id=7):
    return {"file_name": str(path), "image_id": image_id, "height": h, "width": w,
            "annotations": annotations}


def _obj(bbox, segmentation=None, category_id=0, iscrowd=0):
    out = {"bbox": [float(v) for v in bbox], "category_id": category_id, "iscrowd": iscrowd}
    if segmentation is not None:
        out["segmentation"] = segmentation
    return out


def _box_of(polygon):
    xy = np.array(polygon).reshape(-1, 2)
    return [*xy.min(0), *xy.max(0)]


def _bitmap(masks, image_size) -> torch.Tensor:
    return masks.tensor if isinstance(masks, BitMasks) else masks.to_bitmasks(*image_size).tensor


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose whole 3x3 neighbourhood is in ``mask`` (H, W)."""
    return -F.max_pool2d(-mask[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0.5


def _mapper(augmentations, mask_format="polygon", keep_crowd=True):
    return DatasetMapper(is_train=True, augmentations=augmentations, mask_on=True,
                         mask_format=mask_format, keep_crowd=keep_crowd)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("source,mask_format,expected_type", [
    ("polygon", "polygon", PolygonMasks),
    ("polygon", "bitmask", BitMasks),
    ("rle", "polygon", BitMasks),
])
def test_masks_cover_the_transformed_image_region(tmp_path, seed, source, mask_format,
                                                  expected_type):
    regions = [_rasterise(ARROW), _rasterise(TRIANGLE)]
    path = _write_channels(tmp_path, regions)
    segms = ([[ARROW], [TRIANGLE]] if source == "polygon" else [_rle(m) for m in regions])
    d = _dict(path, [_obj(_box_of(p), s) for p, s in zip((ARROW, TRIANGLE), segms)])
    # scaled to 77-102 px then cut to 64: a crop every time, flipped half of the time
    mapper = _mapper([ScaleJitterCrop(64, (1.2, 1.6)), RandomFlip(0.5)], mask_format)
    mapper.reseed(seed)
    out = mapper(d)
    inst = out["instances"]
    assert isinstance(inst.gt_masks, expected_type)
    h, w = inst.image_size
    bitmaps = _bitmap(inst.gt_masks, (h, w))
    channels = out["image"][: len(inst)] > 127  # instance i was drawn into channel i
    assert len(inst) >= 1 and bitmaps.shape == (len(inst), h, w)
    for mask, drawn in zip(bitmaps, channels):
        # the image region and the mask agree everywhere but on their one-pixel border
        assert not (_erode(mask) & ~drawn).any()
        assert not (_erode(~mask) & drawn).any()
        assert (mask & drawn).sum() >= 0.8 * (mask | drawn).sum()
    assert all(v == 0 for v in mapper.num_skipped.values())


def test_polygons_cut_by_a_crop_equal_the_cut_of_their_rasterisation():
    # integer corners: rasterising then cutting and cutting then rasterising agree exactly; the U
    # is cut in two pieces joined by a zero-width bridge along the window border
    u_shape = [5.0, 5.0, 15.0, 5.0, 15.0, 40.0, 35.0, 40.0, 35.0, 5.0, 45.0, 5.0, 45.0, 50.0,
               5.0, 50.0]
    crop = CropTransform(8, 0, 34, 30)
    for polygon in (u_shape, L_SHAPE, ARROW):
        cut = crop.apply_polygons([np.array(polygon).reshape(-1, 2)])
        assert all((p >= 0).all() and (p <= [34, 30]).all() for p in cut)  # inside the window
        expected = crop.apply_segmentation(_rasterise(polygon))
        got = (mask_util.decode(polygons_to_rles([[p.reshape(-1) for p in cut]], 30, 34)[0])
               if cut else np.zeros((30, 34), dtype=bool))
        assert np.array_equal(got.astype(bool), expected)
    assert len(clip_polygon(np.array(L_SHAPE).reshape(-1, 2), 20, 0, 60, 40)) < 3  # all outside


def test_resize_moves_a_stack_of_masks_like_each_mask():
    rng = np.random.default_rng(0)
    stack = rng.random((30, 45, 4)) > 0.5
    resize = ResizeTransform(30, 45, 17, 61)
    moved = resize.apply_segmentation(stack)
    assert moved.shape == (17, 61, 4) and moved.dtype == np.bool_
    for c in range(4):
        assert np.array_equal(moved[..., c], resize.apply_segmentation(stack[..., c]))


@pytest.mark.parametrize("source", ["polygon", "rle"])
@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_mask_vanished_after_a_crop_is_a_counted_skip(tmp_path, source, mask_format):
    path = _write_channels(tmp_path, [])
    segms = ([[L_SHAPE], [TRIANGLE]] if source == "polygon"
             else [_rle(_rasterise(L_SHAPE)), _rle(_rasterise(TRIANGLE))])
    d = _dict(path, [_obj([0, 0, 60, 60], segms[0], category_id=1),
                     _obj(_box_of(TRIANGLE), segms[1], category_id=2)])
    # the window keeps a corner of the L's box, none of the L itself
    mapper = _mapper([FixedCrop(20, 0, 80, 40)], mask_format)
    with CollectLogs("detector.data") as logs:
        inst = mapper(d)["instances"]
    assert inst.gt_classes.tolist() == [2]
    assert len(inst.gt_masks) == 1 and bool(_bitmap(inst.gt_masks, inst.image_size).any())
    assert mapper.num_skipped == {"no_segmentation": 0, "mask_vanished": 1}
    assert "image id 7" in logs.text and "annotation index [0]" in logs.text
    assert "no pixel left" in logs.text


def test_annotation_without_segmentation_is_a_counted_skip_with_mask_on(tmp_path):
    path = _write_channels(tmp_path, [])
    d = _dict(path, [_obj([1, 1, 9, 9]), _obj(_box_of(ARROW), [ARROW], category_id=2),
                     _obj([70, 0, 99, 20], segmentation=[], category_id=1)], image_id=31)
    mapper = _mapper([])
    with CollectLogs("detector.data") as logs:
        inst = mapper(d)["instances"]
    assert inst.gt_classes.tolist() == [2] and len(inst.gt_masks) == 1
    assert mapper.num_skipped["no_segmentation"] == 2
    assert "image id 31" in logs.text and "annotation index [0, 2]" in logs.text
    assert "without a segmentation while MODEL.MASK_ON" in logs.text
    # counts that are not a power of two are not logged again
    with CollectLogs("detector.data") as logs:
        mapper(d)
    assert mapper.num_skipped["no_segmentation"] == 4 and "4 no_segmentation" in logs.text
    with CollectLogs("detector.data") as logs:
        mapper(d)
    assert mapper.num_skipped["no_segmentation"] == 6 and logs.text == ""
    # without masks nothing is dropped and there is no gt_masks
    plain = DatasetMapper(is_train=True, augmentations=[])(d)["instances"]
    assert len(plain) == 3 and not plain.has("gt_masks")


def test_crowd_regions_get_empty_placeholder_masks(tmp_path):
    path = _write_channels(tmp_path, [_rasterise(ARROW)])
    crowd_rle = _rle(np.pad(np.ones((20, 30), bool), ((50, 10), (60, 10))))
    anns = [_obj(_box_of(ARROW), [ARROW]), _obj([60, 50, 90, 70], crowd_rle, iscrowd=1),
            _obj([0, 0, 5, 5], iscrowd=1)]  # a crowd box without segmentation is fine
    for mask_format, kind in (("polygon", PolygonMasks), ("bitmask", BitMasks)):
        mapper = _mapper([ResizeShortestEdge((40,))], mask_format)
        inst = mapper(_dict(path, anns))["instances"]
        assert inst.gt_is_crowd.tolist() == [False, True, True]
        assert isinstance(inst.gt_masks, kind)  # a crowd RLE does not force bitmasks
        areas = _bitmap(inst.gt_masks, inst.image_size).flatten(1).sum(1)
        assert areas[0] > 0 and areas[1:].tolist() == [0, 0]
        assert mapper.num_skipped == {"no_segmentation": 0, "mask_vanished": 0}
    dropped = _mapper([], keep_crowd=False)(_dict(path, anns))["instances"]
    assert len(dropped) == 1 and not dropped.has("gt_is_crowd") and len(dropped.gt_masks) == 1


def test_masks_stay_aligned_with_boxes_after_empty_boxes_are_dropped(tmp_path):
    path = _write_channels(tmp_path, [])
    squares = [[x, 45.0, x + 10, 45.0, x + 10, 55.0, x, 55.0] for x in (5.0, 40.0, 70.0)]
    anns = [_obj(_box_of(squares[0]), [squares[0]], category_id=0),
            _obj([90, 5, 80, 15], [squares[1]], category_id=1),  # inverted box: dropped
            _obj(_box_of(squares[2]), [squares[2]], category_id=2)]
    for mask_format in ("polygon", "bitmask"):
        inst = _mapper([ResizeShortestEdge((40,)), RandomFlip(1.0)], mask_format)(
            _dict(path, anns))["instances"]
        assert inst.gt_classes.tolist() == [0, 2]
        boxes = BitMasks(_bitmap(inst.gt_masks, inst.image_size)).get_bounding_boxes()
        assert torch.allclose(boxes.tensor, inst.gt_boxes.tensor, atol=0.5)


def test_polygons_and_rles_in_one_image_give_bitmasks(tmp_path):
    path = _write_channels(tmp_path, [])
    anns = [_obj(_box_of(ARROW), [ARROW]), _obj(_box_of(TRIANGLE), _rle(_rasterise(TRIANGLE)))]
    inst = _mapper([], "polygon")(_dict(path, anns))["instances"]
    assert isinstance(inst.gt_masks, BitMasks)
    assert np.array_equal(inst.gt_masks.tensor.numpy(),
                          np.stack([_rasterise(ARROW), _rasterise(TRIANGLE)]))


@pytest.mark.parametrize("segmentation,needle", [
    ({"size": [H, W + 1], "counts": "abc"},
     rf"annotation 1 has an RLE of size \(h, w\) \({H}, {W + 1}\) but the image is \({H}, {W}\)"),
    ({"counts": "abc"}, "annotation 1 has an RLE without 'size' and 'counts'"),
    ([[1.0, 2.0, 3.0, 4.0]], "annotation 1 has a polygon that is not a flat list of >= 3"),
    ("polygon", "annotation 1 has a segmentation of type str"),
])
def test_malformed_segmentation_is_a_one_line_error_naming_the_image(tmp_path, segmentation,
                                                                     needle):
    path = _write_channels(tmp_path, [])
    d = _dict(path, [_obj(_box_of(ARROW), [ARROW]), _obj([0, 0, 9, 9], segmentation)],
              image_id=123)
    with pytest.raises(ValueError, match=needle) as info:
        _mapper([])(d)
    assert str(info.value).startswith(f"image id 123 ({path})") and "\n" not in str(info.value)


def test_loader_counts_bad_polygons_and_rles_and_the_mapper_drops_what_is_left(tmp_path):
    images = [{"id": 5, "file_name": "a.png", "height": H, "width": W}]
    good = [ARROW]
    anns = [
        ann(1, 5, [10, 10, 40, 60], segmentation=good),
        ann(2, 5, [0, 0, 5, 5], segmentation=[[0.0, 0.0, 5.0, 5.0]]),  # 2 points
        ann(3, 5, [0, 0, 5, 5], segmentation=[[0.0, 0.0, 2.0, 2.0, 4.0, 4.0]]),  # no area
        ann(4, 5, [0, 0, 5, 5], segmentation={"size": [H, W + 3], "counts": "abc"}),
        ann(5, 5, [60, 20, 40, 55], segmentation=[[0.0, 0.0, 5.0, 5.0], TRIANGLE]),  # 1 of 2 bad
        ann(6, 5, [0, 0, 5, 5], segmentation=[[0.0, 1.0, 2.0]]),  # odd length
    ]
    json_file, root = write_coco(tmp_path, images, anns, name="masks.json")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    stats = {}
    with CollectLogs("detector.data") as logs:
        (d,) = load_coco_json(json_file, root, stats=stats)
    assert stats["polygon_few_points"] == 2 and stats["polygon_zero_area"] == 1
    assert stats["polygon_malformed"] == 1 and stats["rle_size_mismatch"] == 1
    assert stats["invalid_polygons"] == 4 and stats["segmentation_removed"] == 4
    assert "removed 5 invalid polygon(s)/RLE(s) (4 annotation(s) left without a segmentation)" \
        in logs.text
    # every box is kept for box-only training; only usable segmentations remain
    assert len(d["annotations"]) == 6
    assert [("segmentation" in a) for a in d["annotations"]] == [True, False, False, False,
                                                                 True, False]
    assert d["annotations"][4]["segmentation"] == [TRIANGLE]
    mapper = _mapper([])
    inst = mapper(d)["instances"]
    assert len(inst) == 2 and len(inst.gt_masks) == 2
    assert mapper.num_skipped["no_segmentation"] == 4


def test_shapes_dataset_with_mask_on_gives_masks_aligned_with_boxes(tmp_path, tiny_cfg):
    json_file = generate_shapes_dataset(str(tmp_path / "shapes"), num_images=3, seed=4)
    dicts = load_coco_json(json_file, str(tmp_path / "shapes" / "images"))
    tiny_cfg.MODEL.MASK_ON = True
    tiny_cfg.INPUT.MIN_SIZE_TRAIN = (96,)
    tiny_cfg.INPUT.MAX_SIZE_TRAIN = 96
    mapper = DatasetMapper(**DatasetMapper.from_config(tiny_cfg, is_train=True))
    assert mapper.mask_on and mapper.mask_format == "polygon"
    total = 0
    for d in dicts:
        inst = mapper(d)["instances"]
        assert isinstance(inst.gt_masks, BitMasks)  # the shapes masks are RLEs
        assert inst.gt_masks.image_size == inst.image_size == (96, 96)
        assert len(inst.gt_masks) == len(inst.gt_boxes) == len(d["annotations"])
        # tight boxes of 128-px masks scaled by 0.75: the resized masks' boxes are within a pixel
        mask_boxes = inst.gt_masks.get_bounding_boxes().tensor
        assert (mask_boxes - inst.gt_boxes.tensor).abs().max() <= 1.0
        total += len(inst)
    assert total >= 3 and all(v == 0 for v in mapper.num_skipped.values())


def test_mask_format_is_checked(tiny_cfg):
    tiny_cfg.INPUT.MASK_FORMAT = "rle"
    with pytest.raises(ValueError, match="INPUT.MASK_FORMAT must be 'polygon' or 'bitmask', "
                                         "got 'rle'"):
        DatasetMapper(**DatasetMapper.from_config(tiny_cfg, is_train=True))

