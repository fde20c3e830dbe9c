import pytest
import torch
from torchvision.models.detection._utils import Matcher as TVMatcher

from detector.modeling import Matcher


def test_threshold_intervals():
    iou = torch.tensor([[0.39, 0.4, 0.49, 0.5, 0.9, 0.0]])
    matches, labels = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=False)(iou)
    assert labels.tolist() == [0, -1, -1, 1, 1, 0]
    assert matches.tolist() == [0] * 6


def test_best_gt_wins_and_low_quality_matches():
    iou = torch.tensor([
        [0.6, 0.1, 0.30, 0.0],   # gt 0: anchor 0 is foreground on its own
        [0.7, 0.2, 0.30, 0.0],   # gt 1: beats gt 0 on anchor 0
        [0.0, 0.35, 0.1, 0.0],   # gt 2: best IoU 0.35 only, on anchor 1
    ])
    matches, labels = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=False)(iou)
    assert matches[0] == 1 and labels.tolist() == [1, 0, 0, 0]
    matches, labels = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)(iou)
    # anchor 1 is gt 2's best -> foreground; anchor 2 (0.3) is nobody's best and stays background
    assert labels.tolist() == [1, 1, 0, 0]
    assert matches[1] == 2


def test_low_quality_ties_and_zero_iou_gt():
    iou = torch.tensor([
        [0.3, 0.3, 0.1, 0.0],   # tie: both anchors 0 and 1 become foreground
        [0.0, 0.0, 0.0, 0.0],   # touches no anchor: must not turn every anchor foreground
    ])
    matches, labels = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)(iou)
    assert labels.tolist() == [1, 1, 0, 0]
    assert matches[:2].tolist() == [0, 0]


def test_empty_ground_truth_is_all_background():
    matches, labels = Matcher([0.4, 0.5], [0, -1, 1])(torch.zeros(0, 7))
    assert labels.tolist() == [0] * 7 and matches.shape == (7,)


def test_agrees_with_torchvision_on_random_ious():
    g = torch.Generator().manual_seed(0)
    iou = torch.rand(5, 400, generator=g) ** 2
    ours_matches, labels = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)(iou)
    tv = TVMatcher(0.5, 0.4, allow_low_quality_matches=True)(iou)
    expected_labels = torch.where(tv >= 0, 1, torch.where(tv == -2, -1, 0))
    assert labels.tolist() == expected_labels.tolist()
    assert torch.equal(ours_matches[labels == 1], tv[labels == 1])


def test_invalid_arguments():
    with pytest.raises(ValueError, match="increasing"):
        Matcher([0.5, 0.4], [0, -1, 1])
    with pytest.raises(ValueError, match="one label per interval"):
        Matcher([0.4, 0.5], [0, 1])
