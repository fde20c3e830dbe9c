"""evaluate_coco_json: known AP on hand-made data, reference numbers, backend agreement and
bad input."""
import copy
import json
import logging
import math

import numpy as np
import pytest
from tiny_coco import TINY_OBJECTS, perfect_results, tiny_gt_dict, write_json

from detector.evaluation import (
    VALID_BACKENDS,
    build_coco_api,
    check_backend,
    check_coco_gt,
    check_coco_results,
    evaluate_coco_json,
    format_summary,
    get_coco_api,
    load_coco_results,
    make_synthetic_coco,
    run_coco_eval,
)

BACKENDS = list(VALID_BACKENDS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_detections_give_ap_one(tiny_gt_json, tmp_path, backend, capsys):
    results = write_json(tmp_path / "res.json", perfect_results())
    stats, per_category = evaluate_coco_json(tiny_gt_json, results, "bbox", backend)
    assert len(stats) == 12
    # every object is "medium": AP/AR all/medium are 1, small/large are undefined (-1)
    assert stats[:3] == pytest.approx([1.0, 1.0, 1.0])
    assert stats[3] == -1 and stats[5] == -1
    assert stats[4] == pytest.approx(1.0)
    assert stats[8] == pytest.approx(1.0)
    assert per_category == pytest.approx({"cat": 1.0, "dog": 1.0, "bird": 1.0})
    out = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in out


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_box_lowers_ap_by_the_expected_amount(tiny_gt_json, tmp_path, backend):
    results = perfect_results()
    # shift the dog box 8 px right: IoU = 32*40 / (2*1600 - 32*40) = 2/3, so it matches at the
    # IoU thresholds 0.50..0.65 (4 of 10) and misses at 0.70..0.95
    dog = next(r for r in results if r["category_id"] == 7)
    dog["bbox"][0] += 8.0
    stats, per_category = evaluate_coco_json(tiny_gt_json, write_json(tmp_path / "r.json", results),
                                             "bbox", backend)
    assert per_category["dog"] == pytest.approx(0.4)
    assert per_category["cat"] == pytest.approx(1.0)
    assert per_category["bird"] == pytest.approx(1.0)
    assert stats[0] == pytest.approx((1.0 + 1.0 + 0.4) / 3)
    assert stats[1] == pytest.approx(1.0)  # AP50
    assert stats[2] == pytest.approx(2.0 / 3)  # AP75: dog misses
    assert stats[8] == pytest.approx((1.0 + 1.0 + 0.4) / 3)  # AR100 per category, averaged


@pytest.mark.parametrize("backend", BACKENDS)
def test_segm_of_box_polygons(tiny_gt_json, tmp_path, backend):
    from pycocotools import mask as mask_util

    records = []
    for image_id, objects in TINY_OBJECTS.items():
        for cat_id, (x, y, w, h) in objects:
            poly = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            rle = mask_util.merge(mask_util.frPyObjects(poly, 120, 120))
            rle["counts"] = rle["counts"].decode("ascii")
            records.append({"image_id": image_id, "category_id": cat_id, "segmentation": rle,
                            "score": 0.5})
    stats, _ = evaluate_coco_json(tiny_gt_json, write_json(tmp_path / "segm.json", records),
                                  "segm", backend)
    assert stats[0] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_reference_numbers(reference_dir, backend, iou_type, capsys):
    stats, per_category = evaluate_coco_json(
        f"{reference_dir}/instances_val2014_100.json",
        f"{reference_dir}/instances_val2014_fake{iou_type}100_results.json", iou_type, backend)
    with open(f"{reference_dir}/expected_stats.json") as f:
        expected = json.load(f)[iou_type]
    assert len(stats) == 12
    for i, (got, want) in enumerate(zip(stats, expected)):
        assert abs(got - want) <= 1e-6, f"stat {i}: {got} != {want}"
    assert len(per_category) == 80 and per_category["person"] > 0
    assert capsys.readouterr().out.count("Average Recall") == 6


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_backends_agree_on_synthetic_data(iou_type):
    gt, results = make_synthetic_coco(num_images=40, dets_per_image=60, seed=3,
                                      with_masks=iou_type == "segm")
    check_coco_results(results, check_coco_gt(gt, "gt", iou_type), iou_type, "results")
    runs = {}
    for backend in BACKENDS:
        coco_gt = build_coco_api(copy.deepcopy(gt), backend)
        coco_dt = load_coco_results(coco_gt, copy.deepcopy(results), backend)
        runs[backend] = run_coco_eval(coco_gt, coco_dt, iou_type, backend)
    a, b = runs["pycocotools"], runs["faster_coco_eval"]
    assert 0.05 < a.stats[0] < 0.95  # a meaningful mix of hits and misses
    assert np.allclose(a.stats, b.stats, rtol=0, atol=1e-12), (a.stats, b.stats)
    assert a.per_category_ap.keys() == b.per_category_ap.keys()
    for cat_id, ap in a.per_category_ap.items():
        other = b.per_category_ap[cat_id]
        assert (math.isnan(ap) and math.isnan(other)) or abs(ap - other) <= 1e-12, cat_id
    assert a.summary_lines == b.summary_lines == format_summary(a.stats)


def test_synthetic_data_is_deterministic():
    first = make_synthetic_coco(num_images=5, dets_per_image=10, seed=1)
    assert first == make_synthetic_coco(num_images=5, dets_per_image=10, seed=1)
    assert first != make_synthetic_coco(num_images=5, dets_per_image=10, seed=2)
    assert len(first[1]) == 50


def _single_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_malformed_results_json(tiny_gt_json, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image_id": 5, "category_id": 3,')
    with pytest.raises(ValueError) as excinfo:
        evaluate_coco_json(tiny_gt_json, str(bad))
    _single_line_error(excinfo, str(bad), "malformed")


def test_missing_files(tiny_gt_json, tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError) as excinfo:
        evaluate_coco_json(tiny_gt_json, missing)
    _single_line_error(excinfo, missing)
    with pytest.raises(FileNotFoundError) as excinfo:
        evaluate_coco_json(missing, write_json(tmp_path / "r.json", perfect_results()))
    _single_line_error(excinfo, missing, "ground-truth")


def test_unknown_image_id(tiny_gt_json, tmp_path):
    results = perfect_results() + [{"image_id": 12345, "category_id": 3, "bbox": [0, 0, 5, 5],
                                    "score": 0.3}]
    path = write_json(tmp_path / "r.json", results)
    with pytest.raises(ValueError) as excinfo:
        evaluate_coco_json(tiny_gt_json, path)
    _single_line_error(excinfo, path, "12345", "image id")


def test_unknown_category_id(tiny_gt_json, tmp_path):
    results = perfect_results()
    results[0]["category_id"] = 0
    with pytest.raises(ValueError) as excinfo:
        evaluate_coco_json(tiny_gt_json, write_json(tmp_path / "r.json", results))
    _single_line_error(excinfo, "category id", "[0]")


@pytest.mark.parametrize("change, fragment", [
    (lambda r: r.pop("score"), "score"),
    (lambda r: r.update(score=float("nan")), "score"),
    (lambda r: r.update(bbox=[1, 2, 3]), "bbox"),
])
def test_bad_records(tiny_gt_json, tmp_path, change, fragment):
    results = perfect_results()
    change(results[2])
    with pytest.raises(ValueError) as excinfo:
        evaluate_coco_json(tiny_gt_json, write_json(tmp_path / "r.json", results))
    _single_line_error(excinfo, "record 2", fragment)


def test_results_must_be_a_list(tiny_gt_json, tmp_path):
    with pytest.raises(ValueError) as excinfo:
        evaluate_coco_json(tiny_gt_json, write_json(tmp_path / "r.json", {"annotations": []}))
    _single_line_error(excinfo, "list")


def test_gt_annotation_without_area(tmp_path):
    gt = tiny_gt_dict()
    del gt["annotations"][1]["area"]
    gt_path = write_json(tmp_path / "gt.json", gt)
    with pytest.raises(ValueError) as excinfo:
        evaluate_coco_json(gt_path, write_json(tmp_path / "r.json", perfect_results()))
    _single_line_error(excinfo, gt_path, "annotation id 2", "area")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results_give_zeros_and_a_warning(tiny_gt_json, tmp_path, backend, caplog):
    with caplog.at_level(logging.WARNING):
        stats, per_category = evaluate_coco_json(tiny_gt_json, write_json(tmp_path / "e.json", []),
                                                 backend=backend)
    assert stats == [0.0] * 12
    assert per_category == {"cat": 0.0, "dog": 0.0, "bird": 0.0}
    assert "no detections" in caplog.text


def test_unknown_backend(tiny_gt_json, tmp_path):
    for call in (lambda: evaluate_coco_json(tiny_gt_json, tiny_gt_json, backend="detectron"),
                 lambda: get_coco_api("detectron")):
        with pytest.raises(ValueError) as excinfo:
            call()
        _single_line_error(excinfo, "detectron", "pycocotools", "faster_coco_eval")


def test_backend_package_name_is_accepted(tiny_gt_json, tmp_path, capsys):
    assert check_backend("faster-coco-eval") == "faster_coco_eval"
    assert check_backend("pycocotools") == "pycocotools"
    results = write_json(tmp_path / "results.json", perfect_results())
    stats, _ = evaluate_coco_json(tiny_gt_json, results, backend="faster-coco-eval")
    assert stats[0] == pytest.approx(1.0)
    assert "Average Precision" in capsys.readouterr().out


def test_format_summary_matches_pycocotools():
    gt, results = make_synthetic_coco(num_images=8, dets_per_image=20, seed=0)
    coco_gt = build_coco_api(gt, "pycocotools")
    run = run_coco_eval(coco_gt, load_coco_results(coco_gt, results, "pycocotools"), "bbox",
                        "pycocotools")
    assert len(run.summary_lines) == 12
    assert format_summary(run.stats) == run.summary_lines
