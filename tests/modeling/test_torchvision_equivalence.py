"""Our RetinaNet built from configs/retinanet/retinanet_R_50_FPN_torchvision.yaml, loaded with
converted torchvision retinanet_resnet50_fpn weights, gives torchvision's detections and losses."""
import pytest
import torch
from torch import nn
from torchvision.models._meta import _COCO_CATEGORIES
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection._utils import overwrite_eps

from detector.checkpoint.torchvision_retinanet import (
    TorchvisionConversionError,
    convert_torchvision_retinanet_state_dict,
    select_classes,
)
from detector.config import get_cfg
from detector.data.datasets import TORCHVISION_COCO80_INDICES
from detector.layers import convert_frozen_batchnorm
from detector.modeling import build_model
from detector.modeling.dense_heads import permute_to_N_HWA_K
from detector.structures import Boxes, Instances

from modeling_testutils import CONFIGS, ROOT

TV_CONFIG = CONFIGS / "retinanet" / "retinanet_R_50_FPN_torchvision.yaml"
IMAGE_SIZES = [(256, 384), (256, 256)]  # padded to 256x384, a multiple of P7's stride 128


def _cfg(*opts):
    cfg = get_cfg()
    cfg.merge_from_file(str(TV_CONFIG))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _randomize(tv, generator):
    """Non-trivial BN statistics and biases, and a head whose scores spread over (0, 1), so every
    converted tensor matters and there are many detections above the default threshold."""
    with torch.no_grad():
        for m in tv.backbone.body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(
                    torch.rand(m.running_var.shape, generator=generator) * 0.5 + 0.75)
        for m in list(tv.backbone.fpn.modules()) + list(tv.head.modules()):
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.add_(torch.randn(m.bias.shape, generator=generator) * 0.01)
        tv.head.classification_head.cls_logits.weight.normal_(0, 0.02, generator=generator)
        tv.head.regression_head.bbox_reg.weight.normal_(0, 0.005, generator=generator)


@pytest.fixture(scope="module")
def models():
    cfg = _cfg()
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91,
        # no resizing (scale 1) and our normalisation, so both see the same pixels
        min_size=256, max_size=384, image_mean=cfg.MODEL.PIXEL_MEAN, image_std=cfg.MODEL.PIXEL_STD)
    _randomize(tv, torch.Generator().manual_seed(1))
    # what torchvision builds for its released COCO weights: FrozenBatchNorm with eps 0
    tv.backbone.body = convert_frozen_batchnorm(tv.backbone.body)
    overwrite_eps(tv, 0.0)
    ours = build_model(cfg)
    converted = convert_torchvision_retinanet_state_dict(tv.state_dict(), ours.state_dict())
    ours.load_state_dict(converted, strict=True)
    g = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, h, w), generator=g).float() for h, w in IMAGE_SIZES]
    return tv, ours, converted, images


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


def _to_legacy_layout(state_dict):
    """torchvision's pre-0.13 key layout, that of the released COCO checkpoint file."""
    legacy = {}
    for k, v in state_dict.items():
        parts = k.split(".")
        if k.startswith("backbone.fpn.") and parts[2] in ("inner_blocks", "layer_blocks"):
            k = ".".join(parts[:4] + parts[5:])  # drop the ".0"
        elif ".conv." in k and k.startswith("head."):
            i = parts.index("conv")
            k = ".".join(parts[: i + 1] + [str(2 * int(parts[i + 1]))] + parts[i + 3:])
        legacy[k] = v
    return legacy


def test_legacy_torchvision_layout_converts_identically(models):
    tv, ours, converted, _ = models
    legacy = _to_legacy_layout(tv.state_dict())
    assert "head.classification_head.conv.6.weight" in legacy
    assert "backbone.fpn.inner_blocks.2.weight" in legacy
    again = convert_torchvision_retinanet_state_dict(legacy, ours.state_dict())
    assert again.keys() == converted.keys()
    assert all(torch.equal(again[k], converted[k]) for k in converted)


def test_conversion_errors_name_the_keys(models):
    tv, ours, _, _ = models
    state = dict(tv.state_dict())
    state["head.classification_head.conv.0.1.weight"] = torch.ones(256)  # a GN head (v2)
    with pytest.raises(TorchvisionConversionError, match=r"conv\.0\.1\.weight"):
        convert_torchvision_retinanet_state_dict(state)

    state = dict(tv.state_dict())
    state["backbone.fpn.extra_blocks.p6.weight"] = torch.zeros(256, 2048, 3, 3)  # P6 from C5 (v2)
    del state["head.regression_head.bbox_reg.bias"]
    with pytest.raises(TorchvisionConversionError) as err:
        convert_torchvision_retinanet_state_dict(state, ours.state_dict())
    message = str(err.value)
    assert "\n" not in message
    assert "neck.top_block.p6.weight (256, 2048, 3, 3) vs ours (256, 256, 3, 3)" in message
    assert "head.bbox_pred.bias" in message


def test_select_coco_classes_keeps_those_logits(models):
    tv, _, converted, images = models
    expected_ids = [i for i, name in enumerate(_COCO_CATEGORIES)
                    if name not in ("__background__", "N/A")]
    assert list(TORCHVISION_COCO80_INDICES) == expected_ids
    ours80 = build_model(_cfg("MODEL.RETINANET.NUM_CLASSES", "80"))
    ours80.load_state_dict(select_classes(converted, TORCHVISION_COCO80_INDICES), strict=True)
    ours80.eval()
    tv.eval()
    x = (images[1][None] - ours80.pixel_mean) / ours80.pixel_std
    with torch.no_grad():
        p7 = ours80.neck(ours80.backbone(x))["p7"]
        logits80 = permute_to_N_HWA_K(ours80.head([p7])[0][0], 80)
        logits91 = permute_to_N_HWA_K(tv.head.classification_head.cls_logits(
            tv.head.classification_head.conv(p7)), 91)
    assert torch.equal(logits80, logits91[..., list(TORCHVISION_COCO80_INDICES)])


def test_convert_tool_writes_checkpoint(models, tmp_path):
    import importlib.util

    tv, _, converted, _ = models
    spec = importlib.util.spec_from_file_location(
        "convert_torchvision_retinanet", ROOT / "tools" / "convert_torchvision_retinanet.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    src, dst = tmp_path / "tv.pth", tmp_path / "out" / "ours.pth"
    torch.save(_to_legacy_layout(tv.state_dict()), src)
    assert tool.main(["--input", str(src), "--output", str(dst)]) == 0
    saved = torch.load(dst, weights_only=True)
    assert set(saved) == {"model"} and saved["model"].keys() == converted.keys()
    assert all(torch.equal(saved["model"][k], converted[k]) for k in converted)
    assert not (tmp_path / "out" / "ours.pth.tmp").exists()

    dst80 = tmp_path / "ours80.pth"
    assert tool.main(["--input", str(src), "--output", str(dst80), "--coco-contiguous"]) == 0
    saved80 = torch.load(dst80, weights_only=True)["model"]
    expected80 = select_classes(converted, TORCHVISION_COCO80_INDICES)
    assert saved80["head.cls_score.bias"].numel() == 9 * 80
    assert all(torch.equal(saved80[k], expected80[k]) for k in expected80)

    bad = tmp_path / "bad.pth"
    torch.save({"something.else": torch.zeros(1)}, bad)
    assert tool.main(["--input", str(bad), "--output", str(tmp_path / "x.pth")]) == 1
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    assert tool.main(["--input", str(junk), "--output", str(tmp_path / "x.pth")]) == 1
    assert not (tmp_path / "x.pth").exists()
