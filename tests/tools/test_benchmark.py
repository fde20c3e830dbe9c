"""tools/benchmark.py runs ours and the reference implementations side by side and reports
ratios; outputs must agree before any speed is reported. No timing is asserted."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

pytest.importorskip("effdet")
import benchmark  # noqa: E402
import benchmark_common  # noqa: E402
import benchmark_maskrcnn  # noqa: E402


def _check_ratios(res, name, train_batch):
    rows = res["rows"]
    ref_ms, our_ms, infer_ratio = rows["inference_ms_per_img"]
    ref_ips, our_ips, train_ratio = rows["train_img_per_s"]
    assert min(ref_ms, our_ms, ref_ips, our_ips) > 0, name
    # > 1 means ours is faster: less time per image, more images per second
    assert infer_ratio == pytest.approx(ref_ms / our_ms)
    assert train_ratio == pytest.approx(our_ips / ref_ips)
    # one timed step: its forward and backward are parts of the step's time
    for side, ips in ((0, ref_ips), (1, our_ips)):
        forward, backward = rows["train_forward_ms"][side], rows["train_backward_ms"][side]
        assert 0 < forward and 0 < backward, name
        assert forward + backward < 1000 * train_batch / ips, name
    # the same network on both sides: the FLOP rates are in the inverse ratio of the times
    ref_rate, our_rate, rate_ratio = rows["inference_GFLOP_per_s"]
    assert ref_rate > 0 and rate_ratio == pytest.approx(ref_ms / our_ms)


def test_both_models_side_by_side(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = benchmark.main(["--model", "retinanet", "efficientdet", "--size", "128", "--iters",
                              "1", "--warmup", "0", "--threads", "1", "--json", str(out),
                              "--no-memory"])
    assert set(results) == {"RetinaNet R-50-FPN", "EfficientDet-D0"}
    for name, res in results.items():
        assert res["max_score_diff"] < 1e-4, name
        _check_ratios(res, name, train_batch=2)
        assert not any(k.startswith("peak_MB") for k in res["rows"])
    text = capsys.readouterr().out
    assert "summary: ratio ours/reference speed" in text
    assert "torchvision" in text and "effdet" in text
    saved = json.loads(out.read_text())
    assert saved["EfficientDet-D0"]["train_img_per_s"]["ratio"] == pytest.approx(
        results["EfficientDet-D0"]["rows"]["train_img_per_s"][2])


def test_maskrcnn_against_torchvision(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = benchmark.main(["--model", "maskrcnn", "--size", "128", "--iters", "1", "--warmup",
                              "0", "--threads", "1", "--train-batch", "1", "--json", str(out),
                              "--no-memory"])
    res = results["Mask R-CNN R-50-FPN"]
    check = res["outputs"]
    # the biased class logits keep the full 100 detections, so masks are predicted and pasted
    assert check["detections"] == [(benchmark_maskrcnn.DETECTIONS_PER_IMAGE,) * 2]
    assert benchmark_maskrcnn.outputs_match(check), check
    assert check["max_score_diff"] <= 1e-4 and check["max_box_diff"] <= 1e-2
    assert check["min_mask_iou"] >= 0.99
    _check_ratios(res, "Mask R-CNN", train_batch=1)
    text = capsys.readouterr().out
    assert benchmark_maskrcnn.HOW_DETECTIONS_ARE_KEPT in text
    assert "min mask IoU" in text
    saved = json.loads(out.read_text())["Mask R-CNN R-50-FPN"]
    for key in ("inference_ms_per_img", "train_img_per_s", "train_forward_ms",
                "train_backward_ms", "inference_GFLOP_per_s"):
        assert saved[key]["ratio"] == pytest.approx(res["rows"][key][2])
    assert saved["min_mask_iou"] == pytest.approx(check["min_mask_iou"])


def test_maskrcnn_comparison_catches_different_outputs():
    tv, ours = benchmark_maskrcnn.build_pair(128)
    images, _, inputs = benchmark_maskrcnn.make_inputs(1, 128)
    tv.eval()
    ours.eval()
    with torch.no_grad():
        ours.roi_heads.box_predictor.bbox_pred.bias.add_(0.5)
        check = benchmark_maskrcnn.compare_outputs(
            tv(images), ours(benchmark_common.without_instances(inputs)))
    assert not benchmark_maskrcnn.outputs_match(check)


def test_size_must_suit_efficientdet(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--size", "100"])
    assert "multiple of 128" in capsys.readouterr().err
