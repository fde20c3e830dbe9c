import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from detector.modeling import BoxCoder


def _random_boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 200
    wh = 1 + torch.rand(n, 2, generator=generator) * 150
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_round_trip(weights):
    g = torch.Generator().manual_seed(0)
    coder = BoxCoder(weights)
    anchors, boxes = _random_boxes(100, g), _random_boxes(100, g)
    deltas = coder.encode(boxes, anchors)
    torch.testing.assert_close(coder.decode(deltas, anchors), boxes, atol=1e-3, rtol=0)


def test_hand_computed_deltas():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), 10 x 20
    box = torch.tensor([[2.0, 4.0, 22.0, 24.0]])  # centre (12, 14), 20 x 20
    expected = torch.tensor([[10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2.0), 5 * math.log(1.0)]])
    torch.testing.assert_close(coder.encode(box, anchor), expected)


def test_same_as_torchvision():
    g = torch.Generator().manual_seed(1)
    anchors, boxes = _random_boxes(50, g), _random_boxes(50, g)
    ours, tv = BoxCoder((1.0, 2.0, 3.0, 4.0)), TVBoxCoder((1.0, 2.0, 3.0, 4.0))
    torch.testing.assert_close(ours.encode(boxes, anchors), tv.encode_single(boxes, anchors))
    deltas = torch.randn(50, 4, generator=g)
    assert torch.equal(ours.decode(deltas, anchors), tv.decode_single(deltas, anchors))


def test_huge_scale_deltas_are_clamped():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    boxes = coder.decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), anchor)
    assert torch.isfinite(boxes).all()
    torch.testing.assert_close(boxes[0, 2] - boxes[0, 0], torch.tensor(1000.0))


def test_bad_weights():
    with pytest.raises(ValueError, match="BBOX_REG_WEIGHTS"):
        BoxCoder((1.0, 1.0, 0.0, 1.0))
