"""Our RetinaNet built from configs/retinanet/retinanet_R_50_FPN_torchvision.yaml, loaded with
converted torchvision retinanet_resnet50_fpn weights, gives torchvision's detections and losses."""
import pytest
import torch

from detector.structures import Boxes, Instances

from torchvision_retinanet_pair import IMAGE_SIZES, build_torchvision_pair


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


def test_inference_matches_torchvision(models):
    tv, ours, _, images = models
    tv.eval()
    ours.eval()
    with torch.no_grad():
        expected = tv([im.clone() for im in images])
        got = ours(_ours_inputs(images))
    for (h, w), exp, out in zip(IMAGE_SIZES, expected, got):
        inst = out["instances"]
        assert inst.image_size == (h, w)
        assert 50 <= len(exp["scores"]) <= 300 and float(exp["scores"].min()) < 0.9
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


@pytest.mark.parametrize("second_image_empty", [False, True], ids=["boxes", "empty-gt"])
def test_training_losses_match_torchvision(models, second_image_empty):
    tv, ours, _, images = models
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 100.0, 150.0], [200.0, 30.0, 380.0, 250.0],
                                [50.0, 50.0, 90.0, 80.0], [300.5, 200.25, 340.0, 255.0]]),
         "labels": torch.tensor([1, 5, 90, 17])},
        {"boxes": torch.tensor([[0.0, 0.0, 255.0, 255.0], [100.0, 120.0, 140.0, 200.0]]),
         "labels": torch.tensor([0, 33])},
    ]
    if second_image_empty:
        targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    tv.train()
    ours.train()
    with torch.no_grad():
        expected = tv([im.clone() for im in images],
                      [{k: v.clone() for k, v in t.items()} for t in targets])
        got = ours(_ours_inputs(images, targets))
    assert set(got) == {"loss_cls", "loss_box_reg"}
    assert float(expected["bbox_regression"]) > 0
    for ours_key, tv_key in (("loss_cls", "classification"), ("loss_box_reg", "bbox_regression")):
        rel = abs(float(got[ours_key]) - float(expected[tv_key])) / float(expected[tv_key])
        print(f"{ours_key}: ours {float(got[ours_key]):.6f}, torchvision "
              f"{float(expected[tv_key]):.6f}, relative difference {rel:.1e}")
    torch.testing.assert_close(got["loss_cls"], expected["classification"], rtol=1e-4, atol=0)
    torch.testing.assert_close(got["loss_box_reg"], expected["bbox_regression"], rtol=1e-4, atol=0)
