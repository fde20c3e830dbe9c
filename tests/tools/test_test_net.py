"""tools/test_net.py --results-json reproduces the official COCO reference numbers with both backends."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_results_json_matches_reference(datasets_root, tmp_path, backend, iou_type):
    ref = os.path.join(datasets_root, "coco2014_eval_reference")
    if not os.path.isdir(ref):
        pytest.skip(f"{ref} is missing")
    results = os.path.join(ref, f"instances_val2014_fake{iou_type}100_results.json")
    stats_path = tmp_path / "stats.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "test_net.py"),
         "--results-json", results, "--gt-json", os.path.join(ref, "instances_val2014_100.json"),
         "--iou-type", iou_type, "--backend", backend, "--stats-json", str(stats_path)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in proc.stdout
    got = json.loads(stats_path.read_text())[iou_type]
    with open(os.path.join(ref, "expected_stats.json")) as f:
        expected = json.load(f)[iou_type]
    assert len(got) == 12
    for name, g, e in zip(range(12), got, expected):
        assert abs(g - e) <= 1e-6, f"stat {name}: {g} != {e}"
