"""Our EfficientDet-D0/D1 (configs/efficientdet/*.yaml), loaded with weights converted from effdet's
``tf_efficientdet_d0`` / ``d1`` (random init, randomised statistics), computes effdet's per-level
outputs, ``DetBenchPredict`` detections and ``DetBenchTrain`` losses; symmetric padding does not."""
import copy
import importlib.util

import pytest
import torch
from torch import nn

from detector.checkpoint.effdet_convert import (
    EffdetConversionError,
    convert_effdet_state_dict,
    select_classes,
)
from detector.config import get_cfg
from detector.data.datasets import EFFDET_COCO80_INDICES
from detector.modeling import build_model
from detector.structures import Boxes, Instances

from modeling_testutils import CONFIGS, ROOT

effdet = pytest.importorskip("effdet")
from effdet.bench import DetBenchPredict, DetBenchTrain  # noqa: E402

SIZE = 256  # effdet's BiFPN resamples to the sizes of config.image_size, so both run at 256
NUM_CLASSES = 90


def _cfg(variant, *opts):
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / "efficientdet" / f"EfficientDet-D{variant}.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.EFFICIENTDET.NUM_CLASSES", str(NUM_CLASSES),
                         *opts])
    return cfg


def _randomize(model, generator):
    """Random norm parameters and statistics, biases and fusion weights, then BiFPN and head
    statistics of a random batch, so their features vary over space as in a trained model: every
    converted tensor matters and the scores spread over (0, 1) without ties."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) * 0.5
                                    + 0.75)
        for name, p in model.named_parameters():
            if name.startswith("backbone"):
                continue
            if name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
            if name.endswith("edge_weights"):
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
        heads = [m for name, m in model.named_modules()
                 if isinstance(m, nn.BatchNorm2d) and not name.startswith("backbone")]
        momenta = [m.momentum for m in heads]
        for m in heads:
            m.momentum = 1.0
        model.train()
        model.backbone.eval()
        model(torch.randn(2, 3, SIZE, SIZE, generator=generator))
        model.eval()
        for m, momentum in zip(heads, momenta):
            m.momentum = momentum


def _effdet_model(variant):
    torch.manual_seed(variant)
    model = effdet.create_model(f"tf_efficientdet_d{variant}", pretrained=False,
                                pretrained_backbone=False, image_size=(SIZE, SIZE))
    _randomize(model, torch.Generator().manual_seed(10 + variant))
    return model


@pytest.fixture(scope="module", params=[0, pytest.param(1, marks=pytest.mark.slow)],
                ids=["d0", "d1"])
def pair(request):
    variant = request.param
    theirs = _effdet_model(variant)
    ours = build_model(_cfg(variant))
    converted = convert_effdet_state_dict(theirs.state_dict(), ours.state_dict())
    converted = {k: v.clone() for k, v in converted.items()}  # not views of effdet's tensors
    ours.load_state_dict(converted, strict=True)
    g = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (3, SIZE, SIZE), generator=g).float() for _ in range(2)]
    return variant, theirs, ours, converted, images


def _normalized(ours, images):
    return torch.stack([(im - ours.pixel_mean) / ours.pixel_std for im in images])


def _yx_to_xy(box_out):
    n, c, h, w = box_out.shape
    return box_out.reshape(n, c // 4, 4, h, w)[:, :, [1, 0, 3, 2]].reshape(n, c, h, w)


def _relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _per_level_errors(ours, theirs, x):
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        their_cls, their_box = theirs(x)
        our_cls, our_box, _ = ours.forward_features(x)
    assert len(our_cls) == len(their_cls) == 5
    cls_err = [_relative_error(o, t) for o, t in zip(our_cls, their_cls)]
    box_err = [_relative_error(o, _yx_to_xy(t)) for o, t in zip(our_box, their_box)]
    return cls_err, box_err


def test_per_level_outputs_match_effdet(pair):
    variant, theirs, ours, _, images = pair
    cls_err, box_err = _per_level_errors(ours, theirs, _normalized(ours, images))
    print(f"D{variant} same padding: max relative error per level, class "
          f"{max(cls_err):.1e}, box {max(box_err):.1e}")
    assert max(cls_err) <= 1e-4, cls_err
    assert max(box_err) <= 1e-4, box_err


def _assert_same_detections(boxes, scores, labels, e_boxes, e_scores, e_labels):
    """Every detection has a distinct counterpart of the same class, score within 1e-5 + 1e-4
    relative and box within 0.02 px: the raw outputs agree to ~1e-5 relative, which moves a box
    decoded from a P7 anchor (up to ~1100 px) by ~1e-2 px; near-equal scores may swap order."""
    assert len(scores) == len(e_scores)
    unused = set(range(len(e_scores)))
    for box, score, label in zip(boxes, scores, labels):
        candidates = [j for j in unused if int(e_labels[j]) == int(label)
                      and float((e_boxes[j] - box).abs().max()) <= 0.02
                      and abs(float(e_scores[j] - score)) <= 1e-5 + 1e-4 * float(score)]
        assert candidates, f"no effdet detection matches class {label} {score} {box.tolist()}"
        unused.remove(candidates[0])


def test_detections_match_effdet_predict_bench(pair):
    _, theirs, ours, _, images = pair
    bench = DetBenchPredict(theirs).eval()
    ours.eval()
    x = _normalized(ours, images)
    info = {"img_scale": torch.ones(len(images)), "img_size": torch.tensor([[SIZE, SIZE]] * 2)}
    with torch.no_grad():
        expected = bench(x, img_info=info)
        got = ours([{"image": im.clone(), "height": SIZE, "width": SIZE} for im in images])
    for exp, out in zip(expected, got):
        inst = out["instances"]
        exp = exp[exp[:, 4] > 0]  # effdet pads to 100 rows with zeros
        assert len(inst) == len(exp) == 100
        assert float(exp[:, 4].max() - exp[:, 4].min()) > 0.1  # spread scores, not near-ties
        _assert_same_detections(inst.pred_boxes.tensor, inst.scores, inst.pred_classes,
                                exp[:, :4], exp[:, 4], exp[:, 5].long() - 1)
        assert torch.equal(inst.scores, inst.scores.sort(descending=True).values)


def test_training_losses_match_effdet_train_bench(pair):
    variant, theirs, ours, _, images = pair
    # copies: a training forward updates BatchNorm statistics
    theirs, ours = copy.deepcopy(theirs), copy.deepcopy(ours)
    bench = DetBenchTrain(theirs, create_labeler=True)
    boxes = [torch.tensor([[10.3, 20.7, 100.1, 150.9], [120.5, 30.2, 250.3, 200.8],
                           [50.6, 50.1, 90.2, 80.7]]),
             torch.tensor([[5.5, 6.25, 200.1, 240.3]])]
    classes = [torch.tensor([0, 5, 89]), torch.tensor([17])]
    # effdet: (y1, x1, y2, x2) boxes and 1-based classes, padded with -1
    target = {"bbox": torch.full((2, 3, 4), -1.0), "cls": torch.full((2, 3), -1)}
    for i, (b, c) in enumerate(zip(boxes, classes)):
        target["bbox"][i, : len(b)] = b[:, [1, 0, 3, 2]]
        target["cls"][i, : len(c)] = c + 1
    inputs = [{"image": im.clone(), "height": SIZE, "width": SIZE,
               "instances": Instances((SIZE, SIZE), gt_boxes=Boxes(b), gt_classes=c)}
              for im, b, c in zip(images, boxes, classes)]
    bench.train()
    ours.train()
    with torch.no_grad():
        # drop connect in the backbones draws the same random numbers in both
        torch.manual_seed(7)
        expected = bench(_normalized(ours, images), target)
        torch.manual_seed(7)
        got = ours(inputs)
    assert set(got) == {"loss_cls", "loss_box_reg"}
    assert float(expected["box_loss"]) > 0
    torch.testing.assert_close(got["loss_cls"], expected["class_loss"], rtol=1e-4, atol=0)
    torch.testing.assert_close(got["loss_box_reg"], 50.0 * expected["box_loss"], rtol=1e-4, atol=0)
    torch.testing.assert_close(got["loss_cls"] + got["loss_box_reg"], expected["loss"], rtol=1e-4,
                               atol=0)


def test_symmetric_padding_gives_different_outputs(pair):
    variant, theirs, _, converted, images = pair
    if variant != 0:
        pytest.skip("checked on D0")
    symmetric = build_model(_cfg(0, "MODEL.EFFICIENTDET.PADDING", "symmetric"))
    symmetric.load_state_dict(converted, strict=True)  # same parameters, only padding differs
    x = _normalized(symmetric, images)
    symmetric.eval()
    with torch.no_grad():
        ours_features = symmetric.backbone(x)
        their_features = theirs.backbone(x)
    # TF "same" padding puts the extra pixel of stride-2 convs / pools at the bottom-right;
    # PyTorch pads both sides, which shifts every strided window by one pixel
    feature_err = [_relative_error(ours_features[f"c{k}"], t)
                   for k, t in zip((3, 4, 5), their_features)]
    assert min(feature_err) > 0.03, feature_err
    cls_err, box_err = _per_level_errors(symmetric, theirs, x)
    print(f"D0 symmetric padding: backbone features differ by {min(feature_err):.2f}+ relative, "
          f"outputs by class {max(cls_err):.1e}, box {max(box_err):.1e}")
    # the (random) BiFPN and heads damp the difference, but it stays far above the tolerance
    assert max(cls_err) > 5e-4 and max(box_err) > 5e-4, (cls_err, box_err)


def test_other_variant_checkpoint_names_mismatched_keys(pair):
    variant, theirs, ours, _, _ = pair
    if variant != 0:
        pytest.skip("checked once")
    d1_state = _effdet_model(1).state_dict()
    with pytest.raises(EffdetConversionError) as err:
        convert_effdet_state_dict(d1_state, ours.state_dict())
    message = str(err.value)
    assert "\n" not in message
    assert "BiFPN 88 channels x 4 cells" in message
    assert "shape mismatch: head.bbox_norms.0.0.bias (88,) vs ours (64,)" in message
    assert "not in our model: backbone.body.blocks.0.1." in message  # B1 is deeper

    state = dict(theirs.state_dict())
    state["fpn.cell.0.fnode.0.something.weight"] = torch.zeros(1)
    with pytest.raises(EffdetConversionError, match=r"fnode\.0\.something\.weight"):
        convert_effdet_state_dict(state, ours.state_dict())


def test_redundant_biases_fold_into_norms(pair):
    variant, theirs, ours, _, images = pair
    if variant != 0:
        pytest.skip("checked on D0")
    lean = build_model(_cfg(0, "MODEL.EFFICIENTDET.REDUNDANT_BIAS", "False"))
    converted = convert_effdet_state_dict(theirs.state_dict(), lean.state_dict())
    assert "head.cls_subnet.0.conv_pw.bias" not in converted
    lean.load_state_dict(converted, strict=True)
    cls_err, box_err = _per_level_errors(lean, theirs, _normalized(lean, images))
    assert max(cls_err + box_err) <= 1e-4


def test_coco80_selection_keeps_those_logits(pair):
    variant, theirs, ours, converted, images = pair
    if variant != 0:
        pytest.skip("checked on D0")
    assert len(EFFDET_COCO80_INDICES) == 80 and EFFDET_COCO80_INDICES[:3] == (0, 1, 2)
    ours80 = build_model(_cfg(0, "MODEL.EFFICIENTDET.NUM_CLASSES", "80"))
    ours80.load_state_dict(select_classes(converted, EFFDET_COCO80_INDICES), strict=True)
    ours80.eval()
    x = _normalized(ours, images[:1])
    with torch.no_grad():
        logits80 = ours80.forward_features(x)[0][-1]
        logits90 = ours.forward_features(x)[0][-1]
    n, _, h, w = logits90.shape
    expected = logits90.reshape(n, 9, 90, h, w)[:, :, list(EFFDET_COCO80_INDICES)]
    assert torch.equal(logits80, expected.reshape(n, 9 * 80, h, w))


def test_convert_tool(pair, tmp_path):
    variant, theirs, _, converted, _ = pair
    if variant != 0:
        pytest.skip("checked on D0")
    spec = importlib.util.spec_from_file_location("convert_effdet",
                                                  ROOT / "tools" / "convert_effdet.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    src, dst = tmp_path / "effdet_d0.pth", tmp_path / "out" / "ours.pth"
    torch.save({"state_dict": theirs.state_dict()}, src)
    config = CONFIGS / "efficientdet" / "EfficientDet-D0.yaml"
    assert tool.main(["--input", str(src), "--output", str(dst), "--config-file", str(config)]) == 0
    saved = torch.load(dst, weights_only=True)
    assert set(saved) == {"model"} and saved["model"].keys() == converted.keys()
    assert all(torch.equal(saved["model"][k], converted[k]) for k in converted)

    dst80 = tmp_path / "ours80.pth"
    assert tool.main(["--input", str(src), "--output", str(dst80), "--config-file", str(config),
                      "--coco80"]) == 0
    assert torch.load(dst80, weights_only=True)["model"]["head.cls_score.conv_pw.bias"].numel() \
        == 9 * 80

    wrong = tmp_path / "d1.pth"
    torch.save(_effdet_model(1).state_dict(), wrong)
    assert tool.main(["--input", str(wrong), "--output", str(tmp_path / "x.pth"),
                      "--config-file", str(config)]) == 1
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    assert tool.main(["--input", str(junk), "--output", str(tmp_path / "x.pth"),
                      "--config-file", str(config)]) == 1
    assert not (tmp_path / "x.pth").exists()
