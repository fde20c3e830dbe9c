"""Results as arrays: float32 decimals, the results-file encoder, the vectorised checks, and the
evaluator's numbers against the records (json) path with both backends."""
import copy
import decimal
import json
import math

import numpy as np
import pytest
import torch
from tiny_coco import TINY_CATEGORY_IDS, prediction

from detector.evaluation import (
    RESULTS_FILE_NAME,
    STAT_NAMES,
    VALID_BACKENDS,
    COCOEvaluator,
    CocoResultArrays,
    build_coco_api,
    check_result_arrays,
    coco_results_json,
    float32_decimals,
    instances_to_arrays,
    instances_to_coco_json,
    load_coco_results,
    make_synthetic_coco,
    run_coco_eval,
    synthetic_model_outputs,
)
from detector.structures import Boxes

SPECIAL_VALUES = [0.0, -0.0, 1e-4, 9.999e-5, 1e-5, 1e15, 9.99e14, 1e16, 3e38, 1e-45, 0.1, 0.5,
                  0.125, 9.96, 99.96, 999.5, 16777216.0, 16777218.0, 1234567.9, -640.25, 2.5e-7]


def _float32_sample(size, seed=0):
    """Every float32 exponent (random bit patterns), typical box / score values and edge
    cases."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2 ** 32, size=size, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([
        bits[np.isfinite(bits)], rng.uniform(-1000, 1000, size).astype(np.float32),
        np.round(rng.uniform(0, 640, size), 2).astype(np.float32),
        rng.uniform(0, 1, size).astype(np.float32), np.float32(SPECIAL_VALUES)])


def test_float32_decimals_equal_numpy_shortest_repr():
    values = _float32_sample(40000)
    decimals = float32_decimals(values)
    expected = np.array([float(str(v)) for v in values])
    assert np.array_equal(decimals.values, expected)
    assert np.array_equal(np.signbit(decimals.values), np.signbit(values))
    assert np.array_equal(decimals.values.astype(np.float32), values)  # float32 precision kept
    for i in range(0, len(values), 37):  # the decimal itself is numpy's shortest one
        number = decimal.Decimal(int(decimals.significands[i])).scaleb(int(decimals.exponents[i]))
        assert number == abs(decimal.Decimal(str(values[i]))), values[i]
        assert decimals.significands[i] % 10 != 0 or decimals.significands[i] == 0
    with pytest.raises(ValueError, match="finite"):
        float32_decimals(np.float32([1.0, np.nan]))


def _random_results(num, seed, with_masks=False):
    rng = np.random.default_rng(seed)
    pool = _float32_sample(num, seed)
    boxes = rng.choice(pool, size=(num, 4))
    boxes[: num // 2] = np.round(rng.uniform(0, 640, (num // 2, 4)), 2)  # typical boxes too
    masks = None
    if with_masks:
        masks = [{"size": [8, 9], "counts": "".join(chr(48 + k % 64) for k in range(i % 70))}
                 for i in range(num)]  # includes the characters json escapes (backslash)
    return CocoResultArrays(rng.integers(-3, 10 ** 6, num), boxes.astype(np.float32),
                            rng.choice(pool, size=num), rng.integers(1, 91, num), masks)


@pytest.mark.parametrize("with_masks", [False, True])
def test_results_json_is_what_json_dumps_writes(with_masks):
    results = _random_results(3000, seed=1, with_masks=with_masks)
    boxes, scores = float32_decimals(results.boxes_xywh), float32_decimals(results.scores)
    records = [{"image_id": i, "category_id": c, "bbox": b, "score": s}
               for i, c, b, s in zip(results.image_ids.tolist(), results.category_ids.tolist(),
                                     boxes.values.reshape(-1, 4).tolist(), scores.values.tolist())]
    if with_masks:
        for record, rle in zip(records, results.segmentations):
            record["segmentation"] = rle
    text = coco_results_json(results, boxes, scores, chunk=1000)  # several chunks
    assert text == json.dumps(records).encode("ascii")
    reloaded = json.loads(text)
    assert reloaded == records
    assert [r["bbox"] for r in reloaded] == boxes.values.reshape(-1, 4).tolist()
    assert coco_results_json(CocoResultArrays.empty(), float32_decimals(np.zeros(0)),
                             float32_decimals(np.zeros(0))) == b"[]"


def test_check_result_arrays_one_line_errors():
    gt = {"images": [{"id": 5}, {"id": 9}], "categories": [{"id": 3}, {"id": 7}]}
    good = CocoResultArrays(np.array([5, 9, 9]), np.ones((3, 4), np.float32),
                            np.float32([0.5, 0.4, 0.3]), np.array([3, 7, 3]))
    assert check_result_arrays(good, gt, "predictions") is good
    cases = [
        (lambda r: r.boxes_xywh.__setitem__((1, 2), np.nan),
         "predictions: record 1 (image_id 9) has bbox [1.0, 1.0, nan, 1.0]; expected [x, y, "
         "width, height] finite numbers"),
        (lambda r: r.scores.__setitem__(2, np.inf),
         "predictions: record 2 (image_id 9) has score inf; scores must be finite numbers"),
        (lambda r: r.category_ids.__setitem__(slice(1, 3), [0, 1]),
         "predictions: results reference 2 category id(s) that are not in the ground truth, "
         "e.g. [0, 1] (contiguous ids instead of dataset ids?)"),
        (lambda r: r.image_ids.__setitem__(0, 77),
         "predictions: results reference 1 image id(s) that are not in the ground truth, "
         "e.g. [77]"),
    ]
    for change, message in cases:
        bad = copy.deepcopy(good)
        change(bad)
        with pytest.raises(ValueError) as excinfo:
            check_result_arrays(bad, gt, "predictions")
        assert str(excinfo.value) == message


def test_evaluator_reports_non_finite_outputs(tiny_gt_json):
    evaluator = COCOEvaluator(gt_json=tiny_gt_json,
                              contiguous_id_to_dataset_id=dict(enumerate(TINY_CATEGORY_IDS)))
    out = prediction(9)
    boxes = out["instances"].pred_boxes.tensor.clone()
    boxes[1, 3] = float("nan")
    out["instances"].pred_boxes = Boxes(boxes)
    evaluator.process([{"image_id": 5}], [prediction(5)])
    evaluator.process([{"image_id": 9}], [out])
    with pytest.raises(ValueError) as excinfo:
        evaluator.evaluate()
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith("predictions: record 3 (image_id 9) has bbox [70.0, 70.0, 40.0, nan]")


def test_instances_to_arrays_matches_the_records():
    out = prediction(5, extra=[([1.1, 2.2, 33.3, 44.4], 2)])["instances"]
    out.scores = torch.tensor([0.9, 0.123456789, 1e-6])
    table = np.asarray(TINY_CATEGORY_IDS)
    arrays = instances_to_arrays(out, 5, table)
    records = instances_to_coco_json(out, 5, dict(enumerate(TINY_CATEGORY_IDS)))
    assert arrays.image_ids.tolist() == [5, 5, 5]
    assert arrays.category_ids.tolist() == [r["category_id"] for r in records] == [3, 7, 11]
    assert float32_decimals(arrays.boxes_xywh).values.reshape(-1, 4).tolist() == [
        r["bbox"] for r in records]
    assert [r["score"] for r in records] == [0.9, 0.12345679, 1e-6]
    assert records[2]["bbox"] == [1.1, 2.2, 32.2, 42.2]  # float32 differences, shortest decimals
    with pytest.raises(ValueError, match="image_id 5: predicted class 3 has no entry"):
        out.pred_classes = torch.tensor([0, 1, 3])
        instances_to_arrays(out, 5, table)


def _records_path_run(gt, records, iou_type, backend):
    """The records path: what the evaluator did before results were arrays."""
    if iou_type == "segm":
        records = [{k: v for k, v in r.items() if k != "bbox"} for r in records]
    coco_gt = build_coco_api(copy.deepcopy(gt), backend)
    coco_dt = load_coco_results(coco_gt, copy.deepcopy(records), backend)
    return run_coco_eval(coco_gt, coco_dt, iou_type, backend,
                         img_ids=[img["id"] for img in gt["images"]])


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_array_path_equals_records_path_and_backends_agree(tmp_path, iou_type):
    gt, results = make_synthetic_coco(num_images=8 if iou_type == "segm" else 30,
                                      dets_per_image=25, seed=5)
    gt_json = tmp_path / "gt.json"
    gt_json.write_text(json.dumps(gt))
    categories = sorted(c["id"] for c in gt["categories"])
    id_map = dict(enumerate(categories))
    pairs = list(synthetic_model_outputs(gt, results, with_masks=iou_type == "segm"))
    records = [r for inp, out in pairs
               for r in instances_to_coco_json(out["instances"], inp["image_id"], id_map)]
    names = {c["id"]: c["name"] for c in gt["categories"]}
    got = {}
    for backend in VALID_BACKENDS:
        evaluator = COCOEvaluator(gt_json=str(gt_json), contiguous_id_to_dataset_id=id_map,
                                  backend=backend, iou_types=(iou_type,),
                                  output_dir=str(tmp_path / backend))
        for inp, out in pairs:
            evaluator.process([inp], [out])
        metrics = evaluator.evaluate()[iou_type]
        reference = _records_path_run(gt, records, iou_type, backend)
        expected = [v * 100 if v >= 0 else math.nan for v in reference.stats]
        assert 5 < metrics["AP"] < 95
        assert np.allclose([metrics[n] for n in STAT_NAMES], expected, rtol=0, atol=1e-12,
                           equal_nan=True)
        for cat_id, ap in reference.per_category_ap.items():
            value = metrics[f"AP-{names[cat_id]}"]
            assert (math.isnan(ap) and math.isnan(value)) or abs(value - ap * 100) <= 1e-12
        # the file holds the records path's records, exactly, in json.dumps' own format
        written = (tmp_path / backend / RESULTS_FILE_NAME).read_bytes()
        assert written == json.dumps(records).encode("ascii")
        got[backend] = metrics
    first, second = (got[b] for b in VALID_BACKENDS)
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert (math.isnan(value) and math.isnan(second[key])) or abs(value - second[key]) <= 1e-12


def test_faster_coco_eval_is_the_default(tiny_gt_json):
    from detector.config import get_cfg

    evaluator = COCOEvaluator(gt_json=tiny_gt_json,
                              contiguous_id_to_dataset_id=dict(enumerate(TINY_CATEGORY_IDS)))
    assert evaluator._backend == "faster_coco_eval"
    assert get_cfg().TEST.COCO_EVAL_BACKEND == "faster_coco_eval"
