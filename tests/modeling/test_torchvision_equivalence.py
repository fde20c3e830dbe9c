"""Our RetinaNet built from configs/retinanet/retinanet_R_50_FPN_torchvision.yaml, loaded with
converted torchvision retinanet_resnet50_fpn weights, gives torchvision's detections and losses,
also on batches padded to sizes that are not multiples of P6/P7's strides (torchvision's anchor
strides there follow MODEL.ANCHOR_GENERATOR.STRIDE_RULE "torchvision")."""
import copy

import pytest
import torch

from detector.structures import Boxes, Instances

from torchvision_retinanet_pair import (
    IMAGE_SIZES, UNEVEN_IMAGE_SIZES, build_torchvision_pair, make_images,
    set_torchvision_input_sizes,
)

# the two-image 800x1088 batch costs about a minute of CPU for both models
UNEVEN_BATCHES = [pytest.param(name, marks=[pytest.mark.slow] if name == "800x1088" else [])
                  for name in UNEVEN_IMAGE_SIZES]
TARGETS = [
    {"boxes": torch.tensor([[10.0, 20.0, 100.0, 150.0], [200.0, 30.0, 380.0, 250.0],
                            [50.0, 50.0, 90.0, 80.0], [300.5, 200.25, 340.0, 255.0]]),
     "labels": torch.tensor([1, 5, 90, 17])},
    {"boxes": torch.tensor([[0.0, 0.0, 255.0, 255.0], [100.0, 120.0, 140.0, 200.0]]),
     "labels": torch.tensor([0, 33])},
]


@pytest.fixture(scope="module")
def models():
    return build_torchvision_pair()


def _ours_inputs(images, targets=None):
    inputs = []
    for i, image in enumerate(images):
        item = {"image": image.clone(), "height": image.shape[1], "width": image.shape[2],
                "image_id": i}
        if targets is not None:
            item["instances"] = Instances(image.shape[1:], gt_boxes=Boxes(targets[i]["boxes"]),
                                          gt_classes=targets[i]["labels"])
        inputs.append(item)
    return inputs


def _sorted(boxes, scores, labels):
    order = sorted(range(len(scores)), key=lambda i: (-round(float(scores[i]), 4), int(labels[i]),
                                                      *[round(float(v), 2) for v in boxes[i]]))
    order = torch.tensor(order, dtype=torch.int64)
    return boxes[order], scores[order], labels[order]


def _assert_same_detections(tv, ours, images):
    with torch.no_grad():
        expected = tv([im.clone() for im in images])
        got = ours(_ours_inputs(images))
    for image, exp, out in zip(images, expected, got):
        h, w = image.shape[1:]
        inst = out["instances"]
        assert inst.image_size == (h, w)
        assert len(inst) == len(exp["scores"])
        e_boxes, e_scores, e_labels = _sorted(exp["boxes"], exp["scores"], exp["labels"])
        o_boxes, o_scores, o_labels = _sorted(inst.pred_boxes.tensor, inst.scores,
                                              inst.pred_classes)
        assert torch.equal(o_labels, e_labels)
        print(f"{len(inst)} detections on {h}x{w}: max |score diff| "
              f"{(o_scores - e_scores).abs().max():.1e}, max |box diff| "
              f"{(o_boxes - e_boxes).abs().max():.1e} px, labels equal")
        torch.testing.assert_close(o_scores, e_scores, atol=1e-4, rtol=0)
        torch.testing.assert_close(o_boxes, e_boxes, atol=1e-3, rtol=0)
        assert float(o_boxes[:, 2].max()) <= w and float(o_boxes[:, 3].max()) <= h
    return expected


def _losses(tv, ours, images, targets):
    tv.train()
    ours.train()
    with torch.no_grad():
        expected = tv([im.clone() for im in images],
                      [{k: v.clone() for k, v in t.items()} for t in targets])
        got = ours(_ours_inputs(images, targets))
    assert set(got) == {"loss_cls", "loss_box_reg"}
    assert float(expected["bbox_regression"]) > 0
    return got, expected


def _assert_same_losses(got, expected):
    for ours_key, tv_key in (("loss_cls", "classification"), ("loss_box_reg", "bbox_regression")):
        rel = abs(float(got[ours_key]) - float(expected[tv_key])) / float(expected[tv_key])
        print(f"{ours_key}: ours {float(got[ours_key]):.6f}, torchvision "
              f"{float(expected[tv_key]):.6f}, relative difference {rel:.1e}")
    torch.testing.assert_close(got["loss_cls"], expected["classification"], rtol=1e-4, atol=0)
    torch.testing.assert_close(got["loss_box_reg"], expected["bbox_regression"], rtol=1e-4, atol=0)


def test_inference_matches_torchvision(models):
    tv, ours, _, images = models
    set_torchvision_input_sizes(tv, IMAGE_SIZES)
    tv.eval()
    ours.eval()
    expected = _assert_same_detections(tv, ours, images)
    for exp in expected:
        assert 50 <= len(exp["scores"]) <= 300 and float(exp["scores"].min()) < 0.9


@pytest.mark.parametrize("batch", UNEVEN_BATCHES)
def test_inference_matches_torchvision_at_uneven_sizes(models, batch, monkeypatch):
    tv, ours, _, _ = models
    sizes = UNEVEN_IMAGE_SIZES[batch]
    set_torchvision_input_sizes(tv, sizes)
    tv.eval()
    ours.eval()
    # every detection above the score threshold, so the top levels' anchors take part (the best
    # 300 all come from P3-P5); contiguous memory and unfolded norms as torchvision, since their
    # rounding, scaled by P7's ~800 px anchors, reaches 1e-3 px and reorders near-equal scores
    # (both are checked against the unfused model in test_fused_inference.py)
    ours = copy.deepcopy(ours).to(memory_format=torch.contiguous_format)
    monkeypatch.setattr(tv, "detections_per_img", 10000)
    ours.max_detections_per_image = 10000
    ours.channels_last_inference = False
    ours.fuse_conv_norm = False
    expected = _assert_same_detections(tv, ours, make_images(sizes))
    for exp in expected:
        assert 1000 <= len(exp["scores"]) < tv.topk_candidates * 5


@pytest.mark.parametrize("second_image_empty", [False, True], ids=["boxes", "empty-gt"])
def test_training_losses_match_torchvision(models, second_image_empty):
    tv, ours, _, images = models
    set_torchvision_input_sizes(tv, IMAGE_SIZES)
    targets = list(TARGETS)
    if second_image_empty:
        targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    _assert_same_losses(*_losses(tv, ours, images, targets))


@pytest.mark.parametrize("batch", UNEVEN_BATCHES)
def test_training_losses_match_torchvision_at_uneven_sizes(models, batch, monkeypatch):
    tv, ours, _, _ = models
    sizes = UNEVEN_IMAGE_SIZES[batch]
    set_torchvision_input_sizes(tv, sizes)
    images = make_images(sizes)
    targets = TARGETS[:len(images)]
    got, expected = _losses(tv, ours, images, targets)
    _assert_same_losses(got, expected)
    # the pyramid stride rule misplaces P6/P7's anchors on this batch: the losses differ
    monkeypatch.setattr(ours.anchor_generator, "stride_rule", "pyramid")
    with torch.no_grad():
        pyramid = ours(_ours_inputs(images, targets))
    rel = abs(float(pyramid["loss_cls"]) / float(expected["classification"]) - 1)
    print(f"loss_cls with the pyramid stride rule: relative difference {rel:.1e}")
    assert rel > 1e-3
