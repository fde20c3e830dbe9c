import pytest
import torch
from torchvision.ops import batched_nms as torchvision_batched_nms

from cpu_kernel_switch import use_cpu_kernel
from detector.layers import batched_nms


@pytest.fixture(params=["kernel", "torchvision"])
def nms_path(request, monkeypatch):
    use_cpu_kernel(monkeypatch, "grouped_nms", request.param == "kernel")
    return request.param


def _case(n, groups, seed=0, spread=500.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * spread
    wh = torch.rand(n, 2, generator=g) * 100 + 1
    # distinct scores: with ties torchvision's order among them is unspecified
    scores = torch.randperm(n, generator=g).float() / max(n, 1)
    return torch.cat([xy, xy + wh], 1), scores, torch.randint(0, groups, (n,), generator=g)


# 5000 boxes over 90 groups: torchvision's per-group loop; 1000 over 3: its single shifted nms
@pytest.mark.parametrize("n,groups", [(5000, 90), (1000, 3), (300, 1), (7, 2), (1, 1)])
@pytest.mark.parametrize("threshold", [0.5, 0.0, 1.0])
def test_equals_torchvision(n, groups, threshold, nms_path):
    boxes, scores, idxs = _case(n, groups, spread=100.0 if n > 1000 else 500.0)
    expected = torchvision_batched_nms(boxes, scores, idxs, threshold)
    assert 0 < len(expected) <= n
    assert torch.equal(batched_nms(boxes, scores, idxs, threshold), expected)


def test_ties_keep_the_same_boxes_in_input_order(nms_path):
    boxes, _, idxs = _case(400, 5)
    scores = (torch.arange(400) % 7).float()  # many equal scores
    kept = batched_nms(boxes, scores, idxs, 0.3)
    expected = torchvision_batched_nms(boxes, scores, idxs, 0.3)
    assert sorted(kept.tolist()) == sorted(expected.tolist())
    assert (scores[kept][1:] <= scores[kept][:-1]).all()
    if nms_path == "kernel":
        for value in scores.unique():
            same = kept[scores[kept] == value]
            assert (same[1:] > same[:-1]).all()


def test_degenerate_and_empty_boxes(nms_path):
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 5], [5, 5, 5, 5],
                          [20, 20, 10, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    idxs = torch.zeros(5, dtype=torch.int64)
    expected = torchvision_batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), expected)
    empty = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5)
    assert empty.dtype == torch.int64 and empty.shape == (0,)


def test_other_dtypes_take_torchvision():
    boxes, scores, idxs = _case(200, 4)
    expected = torchvision_batched_nms(boxes.double(), scores.double(), idxs, 0.5)
    assert torch.equal(batched_nms(boxes.double(), scores.double(), idxs, 0.5), expected)
