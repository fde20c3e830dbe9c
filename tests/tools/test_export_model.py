"""tools/export_model.py: RetinaNet, EfficientDet and Mask R-CNN exported to ONNX (and
torch.export) give PyTorch's outputs within rtol 1e-3 / atol 1e-4 in onnxruntime, and the same
detections after our postprocessing, on a real image (a generated shapes image; coco128 in the
slow tests)."""
import os
import re

import numpy as np
import pytest
import torch

from detector.checkpoint import DetectionCheckpointer
from detector.config import get_cfg
from detector.modeling import build_model
from detector.structures import Boxes, Instances
from random_statistics import randomize_batchnorms
from tool_loader import load_tool

for _package in ("onnxruntime", "onnxscript"):
    pytest.importorskip(_package, reason=f"{_package} is not installed (pip install -e '.[export]')")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the demo configs shrunk to 64 px and a few channels; every score kept so that random weights
# give a full set of detections to compare
SMALL_INPUT = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
TINY_RETINANET = ("configs/demo/retinanet_tiny_shapes.yaml", [
    "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.NECK.OUT_CHANNELS", "32",
    "MODEL.GN.NUM_GROUPS", "8", "MODEL.BACKBONE.NORM", "FrozenBN",
    "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"] + SMALL_INPUT)
TINY_EFFICIENTDET = ("configs/efficientdet/EfficientDet-tiny-shapes.yaml", [
    "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.BIFPN.CHANNELS", "16",
    "MODEL.BIFPN.NUM_REPEATS", "2", "MODEL.EFFICIENTDET.NUM_HEAD_CONVS", "1"] + SMALL_INPUT)
TINY_MASK_RCNN = ("configs/demo/mask_rcnn_tiny_shapes.yaml", [
    "MODEL.TINYNET.CHANNELS", "[8, 16, 16, 32, 32]", "MODEL.NECK.OUT_CHANNELS", "16",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "MODEL.ROI_MASK_HEAD.NUM_CONV", "1",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    + SMALL_INPUT)


def export_and_check(tmp_path, config, opts, *flags):
    """Run the tool in this process; returns its figures."""
    tool = load_tool("export_model")
    return tool.main(["--config-file", os.path.join(ROOT, config), "--output",
                      str(tmp_path / "export"), "--runs", "2", *flags, *opts])


def assert_checked(out, figures, *, num_outputs, mode, float64_fallback=False):
    """Every output within tolerance (with ``float64_fallback``, network mode: or within twice
    PyTorch float32's error against float64), detections matched, timings reported."""
    rows = re.findall(r"^  (\S+)\s+\(.*max abs \S+\s+max rel \S+\s+(ok|NOT within .*)$", out,
                      flags=re.M)
    assert len(rows) == num_outputs, out
    beyond = [name for name, verdict in rows if verdict != "ok"]
    if not float64_fallback:
        assert beyond == [], out
    for name in beyond:
        assert re.search(rf"^  {name}\s+max \|error\|: .* ok within 2x PyTorch's$", out,
                         flags=re.M), out
    counts = re.search(r"detections: PyTorch (\d+), exported (\d+)", out)
    assert counts and counts.group(1) == counts.group(2), out
    assert figures["num_detections"] == int(counts.group(1)) > 0
    assert "classes equal" in out
    assert ("our postprocessing" in out) == (mode == "network")
    assert figures["runtime_ms"] > 0 and figures["torch_ms"] > 0
    assert out.rstrip().endswith("Check passed")


def save_random_retinanet(path):
    """A tiny RetinaNet with random weights and BN statistics, saved as a training run would."""
    config, opts = TINY_RETINANET
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(ROOT, config))
    cfg.merge_from_list(opts + ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(3)
    model = build_model(cfg)
    randomize_batchnorms(model.modules(), torch.Generator().manual_seed(3))
    DetectionCheckpointer(model, save_dir=str(path)).save("model_final")
    return str(path / "model_final.pth")


def test_retinanet_onnx_network_from_checkpoint(tmp_path, capsys):
    weights = save_random_retinanet(tmp_path)
    figures = export_and_check(tmp_path, *TINY_RETINANET, "MODEL.WEIGHTS", weights)
    out = capsys.readouterr().out
    assert_checked(out, figures, num_outputs=6, mode="network")
    assert "No MODEL.WEIGHTS" not in out
    assert (tmp_path / "export" / "model.onnx").is_file()


@pytest.mark.slow
def test_retinanet_onnx_full(tmp_path, capsys):
    figures = export_and_check(tmp_path, *TINY_RETINANET, "--mode", "full")
    out = capsys.readouterr().out
    assert_checked(out, figures, num_outputs=3, mode="full")
    # random weights: FrozenBN statistics measured on the image, not the identity
    assert "norm statistics measured on the check image" in out


def test_retinanet_torch_export(tmp_path, capsys):
    figures = export_and_check(tmp_path, *TINY_RETINANET, "--format", "torch_export")
    assert_checked(capsys.readouterr().out, figures, num_outputs=6, mode="network")
    assert (tmp_path / "export" / "model.pt2").is_file()


@pytest.mark.parametrize("mode, num_outputs", [
    pytest.param("network", 6, marks=pytest.mark.slow), ("full", 3)])
def test_efficientdet_onnx(tmp_path, capsys, mode, num_outputs):
    figures = export_and_check(tmp_path, *TINY_EFFICIENTDET, "--mode", mode)
    assert_checked(capsys.readouterr().out, figures, num_outputs=num_outputs, mode=mode)


def test_mask_rcnn_onnx_full(tmp_path, capsys):
    """RPN proposals (NMS, top-k), RoIAlign, box and mask heads inside the ONNX graph."""
    figures = export_and_check(tmp_path, *TINY_MASK_RCNN, "--mode", "full")
    out = capsys.readouterr().out
    assert_checked(out, figures, num_outputs=4, mode="full")
    assert re.search(r"mask_probs\s+\(\d+, 1, 28, 28\)", out)
    assert float(re.search(r"pasted mask probabilities: max \|diff\| (\S+),", out).group(1)) < 1e-4


@pytest.mark.slow
def test_mask_rcnn_onnx_network(tmp_path, capsys):
    figures = export_and_check(tmp_path, *TINY_MASK_RCNN, "--mode", "network")
    # p2..p6 features, 5 levels of RPN logits and of deltas
    assert_checked(capsys.readouterr().out, figures, num_outputs=15, mode="network")


def test_outputs_beyond_tolerance_fail(capsys):
    tool = load_tool("export_model")
    reference = [np.linspace(-1.0, 1.0, 40, dtype=np.float32).reshape(4, 10)]
    assert tool.compare_outputs(["logits_p3"], reference, [reference[0] + 5e-5]) == []
    assert tool.compare_outputs(["logits_p3"], reference, [reference[0] + 2e-3]) == ["logits_p3"]
    assert tool.compare_outputs(["logits_p3"], reference, [reference[0][:3]]) == ["logits_p3"]
    out = capsys.readouterr().out
    assert re.search(r"logits_p3 .* NOT within rtol 1e-3 / atol 1e-4", out)
    assert "shape (3, 10) != PyTorch's (4, 10)" in out


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                          torch.nn.Linear(256, 8))

    def forward(self, x):
        return (self.layers(x),)


def test_float64_reference_decides_beyond_tolerance(capsys):
    tool = load_tool("export_model")
    torch.manual_seed(0)
    net, x = _TwoLayers().eval(), torch.randn(4, 256) * 1e4
    with torch.no_grad():
        reference = [net(x)[0].numpy()]
        exact = net.double()(x.double())[0].numpy()
    net.float()
    torch_error = float(np.abs(reference[0] - exact).max())
    assert torch_error > 1e-4  # large activations: float32 itself misses atol 1e-4
    assert tool.within_float32_noise(net, (x,), ["out"], reference,
                                     [exact.astype(np.float32)], ["out"])
    assert not tool.within_float32_noise(net, (x,), ["out"], reference,
                                         [reference[0] + 3 * torch_error], ["out"])
    assert "NOT within 2x PyTorch's" in capsys.readouterr().out


def _detections(boxes, scores, classes):
    return Instances((100, 100), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                     scores=torch.tensor(scores), pred_classes=torch.tensor(classes))


def test_detections_are_paired_by_class_and_box(capsys):
    compare = load_tool("export_model").compare_detections
    boxes = [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 30.0, 30.0], [50.0, 50.0, 60.0, 70.0]]
    reference = _detections(boxes, [0.9, 0.8, 0.8], [0, 1, 1])
    # the order of equal scores may differ
    assert compare(reference, _detections(boxes[:1] + boxes[:0:-1], [0.9, 0.8, 0.8], [0, 1, 1]))
    # 1e-3 px + 1e-4 x 100 px + 1e-3 x 20 px may move y2 by 0.031, x1 by 0.021 (10 px wide)
    within = [boxes[0], boxes[1], [50.0, 50.0, 60.0, 70.03]]
    assert compare(reference, _detections(within, [0.9, 0.8, 0.8], [0, 1, 1]))
    shifted = [boxes[0], boxes[1], [50.05, 50.0, 60.0, 70.0]]
    assert not compare(reference, _detections(shifted, [0.9, 0.8, 0.8], [0, 1, 1]))
    assert not compare(reference, _detections(boxes, [0.9, 0.8, 0.8001], [0, 1, 1]))
    assert not compare(reference, _detections(boxes, [0.9, 0.8, 0.8], [0, 1, 2]))
    assert not compare(reference, _detections(boxes[:2], [0.9, 0.8], [0, 1]))
    out = capsys.readouterr().out
    assert "max |box diff| 5.0e-02 px (NOT within 0.001 px + 0.0001 x 100 px + 0.001 x box size" \
        in out
    assert "has no counterpart of its class" in out


def test_bad_size_is_one_line(tmp_path, monkeypatch):
    # the generated (square) check image, not the first coco128 image, whatever the environment
    monkeypatch.delenv("DETECTOR_DATASETS", raising=False)
    config, opts = TINY_RETINANET
    with pytest.raises(SystemExit) as err:
        load_tool("export_model").main(["--config-file", os.path.join(ROOT, config), "--output",
                                        str(tmp_path), "--size", "64", "80", *opts])
    assert str(err.value) == ("export_model.py: error: --size 64 80 must hold the resized 64x64 "
                              "image and be a multiple of the size divisibility 32")


# --------------------------------------------------------------------------------------------
# Full-size models on a coco128 image (random weights, norm statistics measured on it)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("config, opts, mode, num_outputs", [
    ("configs/retinanet/retinanet_R_50_FPN_1x.yaml", ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"],
     "network", 10),
    ("configs/efficientdet/EfficientDet-D0.yaml", [], "network", 10),
    ("configs/mask_rcnn/mask_rcnn_R_50_FPN_1x.yaml",
     ["INPUT.MIN_SIZE_TEST", "480", "INPUT.MAX_SIZE_TEST", "640",
      "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"], "full", 4),
])
def test_full_size_models_on_coco128(datasets_root, tmp_path, capsys, monkeypatch, config, opts,
                                     mode, num_outputs):
    if not os.path.isdir(os.path.join(datasets_root, "coco128")):
        pytest.skip(f"{datasets_root}/coco128 is missing")
    monkeypatch.setenv("DETECTOR_DATASETS", datasets_root)
    figures = export_and_check(tmp_path, config, opts, "--mode", mode)
    out = capsys.readouterr().out
    assert "coco128" in out
    assert_checked(out, figures, num_outputs=num_outputs, mode=mode, float64_fallback=True)
