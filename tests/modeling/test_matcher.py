import pytest
import torch
from torchvision.models.detection._utils import Matcher as TVMatcher

from detector.modeling import Matcher
from detector.structures import Boxes, pairwise_iou


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


def _random_gt(generator, count, size=96.0):
    xy = torch.rand(count, 2, generator=generator) * size * 0.7
    wh = 4 + torch.rand(count, 2, generator=generator) * size * 0.4
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("low_quality", [True, False])
def test_match_batch_equals_matching_each_image(low_quality):
    g = torch.Generator().manual_seed(0)
    anchors = _random_gt(g, 300)
    matcher = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=low_quality)
    gts = [_random_gt(g, n) for n in (5, 0, 2)]
    iou = torch.full((3, 5, 300), 0.0)
    valid = torch.zeros(3, 5, dtype=torch.bool)
    for i, gt in enumerate(gts):
        iou[i, :len(gt)] = pairwise_iou(Boxes(gt), Boxes(anchors))
        valid[i, :len(gt)] = True
    matches, labels = matcher.match_batch(iou, valid)
    for i, gt in enumerate(gts):
        expected_matches, expected_labels = matcher(pairwise_iou(Boxes(gt), Boxes(anchors)))
        assert torch.equal(matches[i], expected_matches)
        assert torch.equal(labels[i], expected_labels)
    assert (labels[1] == 0).all() and (labels[0] == 1).any()


def test_batched_anchor_labels_equal_the_per_image_ones():
    from detector.modeling import build_model
    from detector.structures import Instances

    from modeling_testutils import tiny_cfg

    model = build_model(tiny_cfg())
    g = torch.Generator().manual_seed(1)
    anchors = _random_gt(g, 500)
    batch = [Instances((96, 96), gt_boxes=Boxes(_random_gt(g, n)),
                       gt_classes=torch.randint(0, 3, (n,), generator=g)) for n in (3, 0, 7)]
    labels, boxes = model.label_anchors(anchors, batch)
    for i, inst in enumerate(batch):
        # a crowd flag that marks nothing sends the image through the per-image path
        inst.gt_is_crowd = torch.zeros(len(inst), dtype=torch.bool)
        one_labels, one_boxes = model.label_anchors(anchors, [inst])
        assert torch.equal(labels[i], one_labels[0]) and torch.equal(boxes[i], one_boxes[0])
    assert (labels[1] == 3).all() and (labels[2] < 3).any() and (labels == -1).any()
