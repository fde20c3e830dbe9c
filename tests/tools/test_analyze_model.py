"""tools/analyze_model.py: fvcore FLOPs, parameters, activations and structure of any config."""
import os

import pytest
import torch

from detector.config import get_cfg
from detector.modeling.meta_arch.efficientdet import EfficientDet

from tool_loader import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")
TINY_RETINANET = os.path.join(CONFIGS, "demo", "retinanet_tiny_shapes.yaml")
TINY_MASK_RCNN = os.path.join(CONFIGS, "demo", "mask_rcnn_tiny_shapes.yaml")
TV_RETINANET = os.path.join(CONFIGS, "retinanet", "retinanet_R_50_FPN_torchvision.yaml")
TINY = ["MODEL.TINYNET.CHANNELS", "[8, 8, 16, 16, 16]", "MODEL.NECK.OUT_CHANNELS", "16",
        "MODEL.GN.NUM_GROUPS", "4"]


@pytest.fixture(scope="module")
def analyze_model():
    return load_tool("analyze_model")


def test_all_tasks_on_a_tiny_config(analyze_model, capsys):
    # the overrides follow the task names directly, as in detectron2's command line
    results = analyze_model.main(["--config-file", TINY_RETINANET, "--size", "64", "96",
                                  "--tasks", "flop", "parameter", "activation", "structure",
                                  *TINY])
    text = capsys.readouterr().out
    assert "one fused multiply-add counts as one flop" in text
    flops = results["flop"]
    assert set(flops["by_part"]) == {"backbone", "neck", "head", "anchor_generator", "other"}
    assert sum(flops["by_part"].values()) == flops["total"] > 0
    assert min(flops["by_part"][p] for p in ("backbone", "neck", "head")) > 0

    params = results["parameter"]
    model = analyze_model.build_eval_model(_tiny_cfg())
    assert params["total"] == sum(p.numel() for p in model.parameters())
    assert sum(params["by_part"].values()) == params["total"]
    assert "| model " in text and "head.cls_score" in text  # fvcore's table, depth 2

    acts = results["activation"]
    assert sum(acts["by_part"].values()) == acts["total"] > 0
    assert results["structure"].startswith("RetinaNet(") and "Structure of RetinaNet" in text


def _tiny_cfg():
    cfg = get_cfg()
    cfg.merge_from_file(TINY_RETINANET)
    cfg.merge_from_list(TINY)
    return cfg


def test_flops_double_with_the_image_area(analyze_model):
    # convolutions dominate and scale with the number of pixels
    cfg = _tiny_cfg()
    model = analyze_model.build_eval_model(cfg)
    small = analyze_model.flop_count(model, 64, 64)["by_operator"]["conv"]
    large = analyze_model.flop_count(model, 64, 128)["by_operator"]["conv"]
    assert large == pytest.approx(2 * small, rel=0.02)


def test_two_stage_parts(analyze_model, capsys):
    results = analyze_model.main(["--config-file", TINY_MASK_RCNN, "--size", "64", "64",
                                  "--tasks", "flop", "parameter"])
    parts = results["flop"]["by_part"]
    assert {"backbone", "neck", "proposal_generator", "roi_heads"} <= set(parts)
    assert parts["proposal_generator"] > 0 and parts["roi_heads"] > 0
    assert results["parameter"]["by_part"]["roi_heads"] > 0
    assert "roi_heads" in capsys.readouterr().out


def test_bad_task_is_one_line(analyze_model, capsys):
    with pytest.raises(SystemExit):
        analyze_model.main(["--config-file", TINY_RETINANET, "--tasks", "flops"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("analyze_model.py: error: argument --tasks: invalid task 'flops'")


def test_retinanet_r50_fpn_matches_torchvision(analyze_model):
    """Our torchvision-compatible RetinaNet built as torchvision's retinanet_resnet50_fpn with
    weights=None is (trainable BatchNorm everywhere, nothing frozen, 91 classes)."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    results = analyze_model.main([
        "--config-file", TV_RETINANET, "--tasks", "parameter", "flop", "--size", "512", "512",
        "MODEL.RETINANET.NUM_CLASSES", "91", "MODEL.BACKBONE.NORM", "BN",
        "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.BACKBONE.WEIGHTS", ""])
    assert results["parameter"]["total"] == sum(p.numel() for p in tv.parameters())
    flops = results["flop"]
    # the convolutions are fixed by the architecture: fvcore counts the same 62,003,326,976
    # multiply-adds in torchvision's backbone and head at 512x512
    assert flops["by_operator"]["conv"] == 62_003_326_976
    # the rest is eval-mode BatchNorm (one per element, 0.19%) and the FPN upsampling; the
    # postprocessing's ops (sort, NMS, gather) have no flop formula: about 61-62 G in total
    assert flops["total"] == pytest.approx(62.12e9, rel=0.005)


@pytest.mark.slow
def test_retinanet_r50_fpn_1x_is_about_61_g(analyze_model):
    results = analyze_model.main([
        "--config-file", os.path.join(CONFIGS, "retinanet", "retinanet_R_50_FPN_1x.yaml"),
        "--tasks", "flop", "--size", "512", "512", "MODEL.BACKBONE.WEIGHTS", ""])
    flops = results["flop"]
    # detectron2's layout (P6 from C5) and 80 classes, so not torchvision's 62.0 G; the count is
    # fixed by the architecture. The rest is the FPN upsampling (FrozenBN is element-wise)
    assert flops["by_operator"]["conv"] == 61_023_076_352
    assert flops["total"] == pytest.approx(61.0e9, rel=0.005)


@pytest.mark.parametrize("k", [0, 7])
def test_efficientdet_parameters_equal_effdet(analyze_model, k):
    effdet = pytest.importorskip("effdet")
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, "efficientdet", f"EfficientDet-D{k}.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.EFFICIENTDET.NUM_CLASSES", "90"])
    with torch.device("meta"):  # shapes only: D7 builds in a fraction of a second
        ours = EfficientDet(**EfficientDet.from_config(cfg))
        theirs = effdet.create_model(f"tf_efficientdet_d{k}", pretrained=False,
                                     pretrained_backbone=False)
    # the number tests/modeling/test_efficientdet_configs.py checks against effdet
    assert analyze_model.parameter_counts(ours)["total"] == sum(
        p.numel() for p in theirs.parameters())
