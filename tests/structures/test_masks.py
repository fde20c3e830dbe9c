"""BitMasks and PolygonMasks: rasterisation, RLE decoding, indexing together with Instances, boxes
and areas, and the errors on malformed input."""
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from detector.structures import (
    BitMasks,
    Boxes,
    Instances,
    PolygonMasks,
    decode_rles,
    polygon_area,
)

SQUARE = [2.0, 3.0, 7.0, 3.0, 7.0, 8.0, 2.0, 8.0]  # covers pixels [3:8, 2:7]
TRIANGLE = [10.0, 1.0, 18.0, 1.0, 10.0, 9.0]


def _rect_mask(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _rle(mask: np.ndarray) -> dict:
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))


def test_polygons_rasterise_to_the_covered_pixels():
    masks = PolygonMasks([[SQUARE], [], [SQUARE, [12.0, 0.0, 16.0, 0.0, 16.0, 2.0, 12.0, 2.0]]])
    bits = masks.to_bitmasks(10, 20)
    assert isinstance(bits, BitMasks) and bits.tensor.shape == (3, 10, 20)
    assert bits.tensor.dtype == torch.bool
    square = _rect_mask(10, 20, 2, 3, 7, 8)
    assert np.array_equal(bits.tensor[0].numpy(), square)
    assert not bits.tensor[1].any()  # no polygon: empty mask
    assert np.array_equal(bits.tensor[2].numpy(), square | _rect_mask(10, 20, 12, 0, 16, 2))
    assert bits.area().tolist() == [25, 0, 33]
    assert bits.nonempty().tolist() == [True, False, True]


def test_polygon_parts_outside_the_canvas_are_cut_off():
    # the square shifted up-left by 4 px: what remains inside equals the cut of the full one
    shifted = (np.array(SQUARE) - 4).tolist()
    bits = PolygonMasks([[shifted]]).to_bitmasks(6, 6).tensor[0].numpy()
    assert np.array_equal(bits, _rect_mask(6, 6, 0, 0, 3, 4))


def test_polygon_area_and_boxes():
    masks = PolygonMasks([[SQUARE], [TRIANGLE, SQUARE], []])
    assert masks.area().tolist() == [25.0, 32.0 + 25.0, 0.0]
    assert polygon_area(np.array(TRIANGLE)) == 32.0
    assert masks.get_bounding_boxes().tensor.tolist() == [
        [2, 3, 7, 8], [2, 1, 18, 9], [0, 0, 0, 0]]
    assert masks.nonempty().tolist() == [True, True, False]


@pytest.mark.parametrize("polygons,needle", [
    ([[[1.0, 2.0, 3.0, 4.0]]], "instance 0: a polygon needs >= 3"),
    ([[SQUARE], [[1.0, 2.0, 3.0, 4.0, 5.0]]], "instance 1: a polygon needs >= 3"),
    ([[[0.0, 0.0, float("nan"), 1.0, 1.0, 1.0]]], "non-finite"),
    ([np.array(SQUARE)], "instance 0 must be a list of polygons"),
])
def test_malformed_polygons_are_one_line_errors(polygons, needle):
    with pytest.raises(ValueError, match=needle) as info:
        PolygonMasks(polygons)
    assert "\n" not in str(info.value)


def test_bitmask_boxes_are_tight_and_zero_when_empty():
    tensor = torch.zeros(3, 8, 12, dtype=torch.bool)
    tensor[0, 2:5, 3:9] = True
    tensor[2, 7, 11] = True
    boxes = BitMasks(tensor).get_bounding_boxes()
    assert isinstance(boxes, Boxes)
    assert boxes.tensor.tolist() == [[3, 2, 9, 5], [0, 0, 0, 0], [11, 7, 12, 8]]
    assert len(BitMasks(torch.zeros(0, 8, 12)).get_bounding_boxes()) == 0


def test_bitmasks_from_numpy_and_uint8_become_bool():
    masks = BitMasks(np.array([[[0, 2], [1, 0]]], dtype=np.uint8))
    assert masks.tensor.dtype == torch.bool and masks.tensor.tolist() == [[[False, True],
                                                                           [True, False]]]
    assert masks.image_size == (2, 2)
    with pytest.raises(ValueError, match=r"\(N, H, W\) tensor, got shape \(4, 4\)"):
        BitMasks(torch.zeros(4, 4))


def test_rles_compressed_string_and_uncompressed_decode_alike():
    a, b = _rect_mask(6, 9, 1, 2, 4, 5), _rect_mask(6, 9, 5, 0, 9, 6)
    rle_a = _rle(a)
    rle_b = _rle(b)
    rle_b["counts"] = rle_b["counts"].decode("ascii")  # as json.load gives it
    # uncompressed (column-major run lengths starting with zeros), as COCO's crowd "counts" lists
    flat = a.T.reshape(-1).astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    uncompressed = {"size": [6, 9], "counts": runs}
    masks = BitMasks.from_rles([rle_a, rle_b, uncompressed], 6, 9)
    assert masks.tensor.shape == (3, 6, 9)
    assert np.array_equal(masks.tensor[0].numpy(), a)
    assert np.array_equal(masks.tensor[1].numpy(), b)
    assert np.array_equal(masks.tensor[2].numpy(), a)
    stack = decode_rles([rle_a], 6, 9)
    assert stack.shape == (6, 9, 1) and stack.dtype == bool
    assert decode_rles([], 6, 9).shape == (6, 9, 0)


def test_rle_of_another_size_is_an_error():
    with pytest.raises(ValueError, match=r"RLE 1 has size \(h, w\) \(6, 8\) but the image is "
                                         r"\(6, 9\)"):
        BitMasks.from_rles([_rle(np.zeros((6, 9))), _rle(np.zeros((6, 8)))], 6, 9)


@pytest.mark.parametrize("make", ["polygons", "bitmasks"])
def test_instances_index_masks_together_with_boxes(make):
    squares = [[[x, 0.0, x + 2, 0.0, x + 2, 3.0, x, 3.0]] for x in (0.0, 4.0, 8.0, 12.0)]
    masks = PolygonMasks(squares)
    if make == "bitmasks":
        masks = masks.to_bitmasks(4, 16)
    boxes = Boxes(torch.tensor([[x, 0.0, x + 2, 3.0] for x in (0.0, 4.0, 8.0, 12.0)]))
    inst = Instances((4, 16), gt_boxes=boxes, gt_masks=masks)

    def mask_boxes(i):
        m = i.gt_masks
        return (m if isinstance(m, BitMasks) else m.to_bitmasks(4, 16)).get_bounding_boxes()

    for index in (torch.tensor([False, True, False, True]), torch.tensor([3, 0]),
                  slice(1, 3), 2, torch.tensor([], dtype=torch.int64)):
        part = inst[index]
        assert type(part.gt_masks) is type(masks)
        assert len(part.gt_masks) == len(part.gt_boxes)
        assert torch.equal(mask_boxes(part).tensor, part.gt_boxes.tensor)
    joined = Instances.cat([inst[torch.tensor([2])], inst[torch.tensor([0, 1])]])
    assert type(joined.gt_masks) is type(masks)
    assert torch.equal(mask_boxes(joined).tensor, boxes.tensor[[2, 0, 1]])
    moved = inst.to("cpu")
    assert type(moved.gt_masks) is type(masks) and len(moved.gt_masks) == 4


def test_bad_indices_are_errors():
    masks = PolygonMasks([[SQUARE], [TRIANGLE]])
    with pytest.raises(IndexError, match="bool index of shape"):
        masks[torch.tensor([True, False, True])]
    with pytest.raises(IndexError, match="out of range"):
        masks[torch.tensor([2])]
    with pytest.raises(IndexError, match="1-d bool/int tensor"):
        masks[torch.tensor([0.0])]
    assert masks[torch.tensor([-1])].polygons[0][0].tolist() == TRIANGLE


def test_bitmask_cat_needs_one_image_size():
    with pytest.raises(ValueError, match="one image size"):
        BitMasks.cat([BitMasks(torch.zeros(1, 4, 4)), BitMasks(torch.zeros(1, 4, 5))])
