"""tools/benchmark.py runs ours and the reference implementations side by side and reports
ratios; outputs must agree before any speed is reported. No timing is asserted."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

pytest.importorskip("effdet")
import benchmark  # noqa: E402


def test_both_models_side_by_side(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = benchmark.main(["--size", "128", "--iters", "1", "--warmup", "0", "--threads", "1",
                              "--json", str(out)])
    assert set(results) == {"RetinaNet R-50-FPN", "EfficientDet-D0"}
    for name, res in results.items():
        assert res["max_score_diff"] < 1e-4, name
        ref_ms, our_ms, infer_ratio = res["rows"]["inference_ms_per_img"]
        ref_ips, our_ips, train_ratio = res["rows"]["train_img_per_s"]
        assert min(ref_ms, our_ms, ref_ips, our_ips) > 0
        # > 1 means ours is faster: less time per image, more images per second
        assert infer_ratio == pytest.approx(ref_ms / our_ms)
        assert train_ratio == pytest.approx(our_ips / ref_ips)
    text = capsys.readouterr().out
    assert "summary: ratio ours/reference speed" in text
    assert "torchvision" in text and "effdet" in text
    saved = json.loads(out.read_text())
    assert saved["EfficientDet-D0"]["train_img_per_s"]["ratio"] == pytest.approx(
        results["EfficientDet-D0"]["rows"]["train_img_per_s"][2])


def test_size_must_suit_efficientdet(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--size", "100"])
    assert "multiple of 128" in capsys.readouterr().err
