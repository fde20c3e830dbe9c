"""tools/test_net.py --results-json reproduces the official COCO reference numbers with both backends."""
import importlib.util
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


# --------------------------------------------------------------------------------------------
# --results-json: bad input ends in one line, no traceback
# --------------------------------------------------------------------------------------------
GT = {
    "images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.jpg"}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [10.0, 10.0, 30.0, 30.0],
                     "area": 900.0, "iscrowd": 0,
                     "segmentation": [[10.0, 10.0, 40.0, 10.0, 40.0, 40.0, 10.0, 40.0]]}],
    "categories": [{"id": 4, "name": "cat"}],
}
DETECTION = {"image_id": 1, "category_id": 4, "bbox": [10.0, 10.0, 30.0, 30.0], "score": 0.9}


def load_test_net():
    spec = importlib.util.spec_from_file_location(
        "_tool_test_net", os.path.join(ROOT, "tools", "test_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_package_name_of_faster_coco_eval_is_accepted(tmp_path, capsys):
    gt = _write(tmp_path / "gt.json", GT)
    results = _write(tmp_path / "results.json", [DETECTION])
    stats = load_test_net().cli(["--results-json", results, "--gt-json", gt,
                                 "--backend", "faster-coco-eval"])
    assert stats[0] == pytest.approx(1.0)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in capsys.readouterr().out


@pytest.mark.parametrize("results, iou_type, fragment", [
    ("[{\"image_id\": 1,", "bbox", "malformed results JSON"),
    ([dict(DETECTION, category_id=1)], "bbox", "category id(s) that are not in the ground truth"),
    ([DETECTION], "segm", "lacks key(s) ['segmentation']"),
    ([dict(DETECTION, image_id=7)], "bbox", "image id(s) that are not in the ground truth"),
])
def test_bad_results_file_is_one_line(tmp_path, capsys, results, iou_type, fragment):
    gt = _write(tmp_path / "gt.json", GT)
    path = _write(tmp_path / "results.json", results)
    with pytest.raises(SystemExit) as info:
        load_test_net().cli(["--results-json", path, "--gt-json", gt, "--iou-type", iou_type])
    message = str(info.value)
    assert message.startswith(f"test_net.py: error: {path}") and "\n" not in message, message
    assert fragment in message, message
    assert "Traceback" not in "".join(capsys.readouterr())


def test_missing_files_are_one_line(tmp_path):
    gt = _write(tmp_path / "gt.json", GT)
    with pytest.raises(SystemExit, match=r"^test_net.py: error: --results-json needs --gt-json$"):
        load_test_net().cli(["--results-json", gt])
    with pytest.raises(SystemExit) as info:
        load_test_net().cli(["--results-json", str(tmp_path / "absent.json"), "--gt-json", gt])
    assert str(info.value) == f"test_net.py: error: results file not found: {tmp_path}/absent.json"
