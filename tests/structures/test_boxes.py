"""Boxes and pairwise_iou against values worked out by hand."""
import pytest
import torch

from detector.structures import Boxes, pairwise_iou, xywh_to_xyxy, xyxy_to_xywh


def _boxes(*rows):
    return Boxes(torch.tensor(rows, dtype=torch.float32))


def test_area_is_width_times_height_and_zero_for_inverted_boxes():
    boxes = _boxes([0, 0, 10, 5], [2, 3, 4.5, 7], [5, 5, 5, 9], [8, 2, 6, 4])
    assert boxes.area().tolist() == [50.0, 10.0, 0.0, 0.0]


def test_clip_to_height_width_in_place():
    boxes = _boxes([-5, -2, 30, 12], [10, 18, 50, 40], [1, 2, 3, 4])
    boxes.clip((20, 25))  # (height, width)
    assert boxes.tensor.tolist() == [[0, 0, 25, 12], [10, 18, 25, 20], [1, 2, 3, 4]]


def test_nonempty_needs_width_and_height_above_threshold():
    boxes = _boxes([0, 0, 1, 1], [0, 0, 0, 5], [0, 0, 5, 0], [3, 3, 2, 4], [0, 0, 0.5, 2])
    assert boxes.nonempty().tolist() == [True, False, False, False, True]
    assert boxes.nonempty(threshold=0.5).tolist() == [True, False, False, False, False]


def test_indexing_keeps_an_n_by_4_tensor():
    boxes = _boxes([0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3])
    assert boxes[1].tensor.tolist() == [[1, 1, 2, 2]]
    assert boxes[torch.tensor([True, False, True])].tensor.tolist() == [[0, 0, 1, 1], [2, 2, 3, 3]]
    assert len(boxes[1:]) == 2 and len(boxes[torch.tensor([], dtype=torch.int64)]) == 0


def test_empty_and_malformed_inputs():
    empty = Boxes(torch.zeros(0))
    assert empty.tensor.shape == (0, 4) and empty.tensor.dtype == torch.float32
    assert len(Boxes.cat([])) == 0
    with pytest.raises(ValueError, match=r"\(N, 4\) tensor, got shape \(2, 3\)"):
        Boxes(torch.zeros(2, 3))


def test_cat_centers_scale_and_xywh_round_trip():
    a, b = _boxes([0, 0, 4, 2]), _boxes([2, 2, 6, 10], [1, 1, 1, 1])
    both = Boxes.cat([a, b])
    assert both.tensor.tolist() == [[0, 0, 4, 2], [2, 2, 6, 10], [1, 1, 1, 1]]
    assert both.get_centers().tolist() == [[2, 1], [4, 6], [1, 1]]
    both.scale(0.5, 2.0)
    assert both.tensor.tolist() == [[0, 0, 2, 4], [1, 4, 3, 20], [0.5, 2, 0.5, 2]]
    xywh = torch.tensor([[3.0, 4.0, 5.0, 6.0]])
    assert xywh_to_xyxy(xywh).tolist() == [[3, 4, 8, 10]]
    assert torch.equal(xyxy_to_xywh(xywh_to_xyxy(xywh)), xywh)


def test_is_finite_flags_nan_and_inf_rows():
    boxes = _boxes([0, 0, 1, 1], [0, float("nan"), 1, 1], [0, 0, float("inf"), 1])
    assert boxes.is_finite().tolist() == [True, False, False]


def test_pairwise_iou_matches_hand_computed_values():
    a = _boxes([0, 0, 10, 10], [5, 5, 15, 15])
    b = _boxes([0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [2, 2, 4, 4])
    iou = pairwise_iou(a, b)
    assert iou.shape == (2, 4)
    # [0,0,10,10] vs [5,0,15,10]: intersection 5x10 = 50, union 100 + 100 - 50 = 150
    # [5,5,15,15] vs [0,0,10,10]: 5x5 = 25 / 175; vs [5,0,15,10]: 10x5 = 50 / 150
    # [2,2,4,4] lies inside [0,0,10,10]: 4 / 100; it misses [5,5,15,15]
    expected = torch.tensor([[1.0, 50 / 150, 0.0, 4 / 100],
                             [25 / 175, 50 / 150, 0.0, 0.0]])
    torch.testing.assert_close(iou, expected)
    assert torch.equal(pairwise_iou(b, a), iou.T)


def test_pairwise_iou_of_degenerate_and_empty_sets_is_zero_not_nan():
    point = _boxes([3, 3, 3, 3])
    iou = pairwise_iou(point, point)
    assert iou.tolist() == [[0.0]]
    assert pairwise_iou(point, Boxes(torch.zeros(0, 4))).shape == (1, 0)
    assert pairwise_iou(Boxes(torch.zeros(0, 4)), point).shape == (0, 1)
