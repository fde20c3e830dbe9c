"""COCOEvaluator: Instances -> COCO records -> COCOeval, id mapping, results file, edge cases."""
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from tiny_coco import TINY_CATEGORY_IDS, TINY_OBJECTS, prediction

from detector.evaluation import (
    RESULTS_FILE_NAME,
    COCOEvaluator,
    evaluate_coco_json,
    instances_to_coco_json,
)
from detector.evaluation.coco_evaluation import _float32_values
from detector.structures import Boxes, Instances

ID_MAP = {k: cat for k, cat in enumerate(TINY_CATEGORY_IDS)}  # contiguous -> dataset id


def run(evaluator, outputs_by_image):
    evaluator.reset()
    for image_id, output in outputs_by_image.items():
        evaluator.process([{"image_id": image_id, "file_name": f"{image_id}.jpg"}], [output])
    return evaluator.evaluate()


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_perfect_predictions_round_trip(tiny_gt_json, tmp_path, backend):
    evaluator = COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id=ID_MAP,
                              class_names=["Cat", "Dog", "Bird"], output_dir=str(tmp_path / "out"),
                              backend=backend)
    results = run(evaluator, {i: prediction(i) for i in TINY_OBJECTS})
    bbox = results["bbox"]
    assert bbox["AP"] == pytest.approx(100.0)
    assert bbox["AP50"] == pytest.approx(100.0) and bbox["AR100"] == pytest.approx(100.0)
    assert math.isnan(bbox["APs"]) and math.isnan(bbox["APl"])  # no small / large objects
    assert {k: v for k, v in bbox.items() if k.startswith("AP-")} == pytest.approx(
        {"AP-Cat": 100.0, "AP-Dog": 100.0, "AP-Bird": 100.0})
    # the results file holds dataset category ids and XYWH boxes
    path = tmp_path / "out" / RESULTS_FILE_NAME
    records = json.loads(path.read_text())
    assert not os.path.exists(str(path) + ".tmp")
    assert {r["category_id"] for r in records} == set(TINY_CATEGORY_IDS)
    assert {(r["image_id"], r["category_id"], tuple(r["bbox"])) for r in records} == {
        (i, c, tuple(b)) for i, objs in TINY_OBJECTS.items() for c, b in objs}


def test_per_category_ap_and_default_names(tiny_gt_json):
    evaluator = COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id=ID_MAP)
    bbox = run(evaluator, {i: prediction(i, shift_dog=8.0) for i in TINY_OBJECTS})["bbox"]
    assert bbox["AP-dog"] == pytest.approx(40.0)  # IoU 2/3 matches at 4 of 10 thresholds
    assert bbox["AP-cat"] == pytest.approx(100.0) and bbox["AP-bird"] == pytest.approx(100.0)
    assert bbox["AP"] == pytest.approx(80.0)


def test_wrong_class_mapping_is_visible(tiny_gt_json):
    swapped = {0: 7, 1: 3, 2: 11}  # cat and dog swapped
    evaluator = COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id=swapped)
    bbox = run(evaluator, {i: prediction(i) for i in TINY_OBJECTS})["bbox"]
    assert bbox["AP-bird"] == pytest.approx(100.0)
    assert bbox["AP-cat"] == pytest.approx(0.0) and bbox["AP-dog"] == pytest.approx(0.0)


def test_results_file_reproduces_in_memory_numbers(tiny_gt_json, tmp_path):
    """Boxes and scores with many float32 digits evaluate the same from the json file."""
    gen = torch.Generator().manual_seed(0)
    outputs = {}
    for i in TINY_OBJECTS:
        out = prediction(i, extra=[([5.0, 5.0, 50.0, 50.0], 0)])
        inst = out["instances"]
        jitter = torch.rand(len(inst), 4, generator=gen) * 6
        inst.pred_boxes = Boxes(inst.pred_boxes.tensor + jitter)
        inst.scores = torch.rand(len(inst), generator=gen)
        outputs[i] = out
    evaluator = COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id=ID_MAP,
                              output_dir=str(tmp_path))
    in_memory = run(evaluator, outputs)["bbox"]
    stats, per_category = evaluate_coco_json(tiny_gt_json, str(tmp_path / RESULTS_FILE_NAME))
    assert 0 < in_memory["AP"] < 100
    assert [in_memory[k] for k in ("AP", "AP50", "AP75", "APm", "AR1", "AR10", "AR100")] == [
        stats[i] * 100 for i in (0, 1, 2, 4, 6, 7, 8)]
    assert in_memory["AP-dog"] == per_category["dog"] * 100


def test_float32_values_keep_float32_precision():
    values = np.random.default_rng(0).uniform(-1000, 1000, size=1000).astype(np.float32)
    short = _float32_values(values)
    assert np.array_equal(np.asarray(short, dtype=np.float32), values)
    assert max(len(repr(v)) for v in short) <= 16  # shorter than float64's 17-18 digits
    assert _float32_values(np.array([0.1], dtype=np.float32)) == [0.1]


def test_instances_to_coco_json_converts_boxes_and_ids():
    inst = Instances((50, 60), pred_boxes=Boxes(torch.tensor([[1.5, 2.0, 11.5, 32.0]])),
                     scores=torch.tensor([0.25]), pred_classes=torch.tensor([2]))
    assert instances_to_coco_json(inst, 42, ID_MAP) == [
        {"image_id": 42, "category_id": 11, "bbox": [1.5, 2.0, 10.0, 30.0], "score": 0.25}]
    with pytest.raises(ValueError, match="image_id 42: predicted class 5 has no entry"):
        instances_to_coco_json(Instances((5, 5), pred_boxes=Boxes(torch.zeros(1, 4)),
                                         scores=torch.ones(1), pred_classes=torch.tensor([5])),
                               42, ID_MAP)
    # a map with a gap: the missing class is unknown, not category 0
    with pytest.raises(ValueError, match=r"predicted class 1 has no entry .*known: \[0, 2\]"):
        instances_to_coco_json(Instances((5, 5), pred_boxes=Boxes(torch.zeros(1, 4)),
                                         scores=torch.ones(1), pred_classes=torch.tensor([1])),
                               42, {0: 1, 2: 11})
    with pytest.raises(ValueError, match="image_id 7: predicted Instances lack 'scores'"):
        instances_to_coco_json(Instances((5, 5), pred_boxes=Boxes(torch.zeros(1, 4)),
                                         pred_classes=torch.tensor([0])), 7, ID_MAP)


def test_segm_with_pred_masks(tiny_gt_json):
    outputs = {}
    for i in TINY_OBJECTS:
        out = prediction(i)
        masks = torch.zeros(len(out["instances"]), 120, 120, dtype=torch.bool)
        for k, (x1, y1, x2, y2) in enumerate(out["instances"].pred_boxes.tensor.int().tolist()):
            masks[k, y1:y2, x1:x2] = True
        out["instances"].pred_masks = masks
        outputs[i] = out
    evaluator = COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id=ID_MAP,
                              iou_types=("bbox", "segm"))
    results = run(evaluator, outputs)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_empty_predictions_give_zeros(tiny_gt_json, tmp_path, backend, caplog):
    evaluator = COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id=ID_MAP,
                              output_dir=str(tmp_path), backend=backend)
    empty = {"instances": Instances((120, 120), pred_boxes=Boxes(torch.zeros(0, 4)),
                                    scores=torch.zeros(0),
                                    pred_classes=torch.zeros(0, dtype=torch.long))}
    with caplog.at_level(logging.WARNING):
        results = run(evaluator, {5: empty, 9: empty})
    assert "no detections" in caplog.text
    bbox = results["bbox"]
    assert all(v == 0.0 for v in bbox.values())
    assert {"AP", "AR100", "AP-cat", "AP-bird"} <= bbox.keys()
    assert json.loads((tmp_path / RESULTS_FILE_NAME).read_text()) == []
    # no images at all (empty loader) is the same
    assert run(evaluator, {})["bbox"]["AP"] == 0.0


def test_subset_and_duplicate_images(tiny_gt_json, caplog):
    evaluator = COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id=ID_MAP)
    evaluator.reset()
    # image 5 only, processed twice (as a padded distributed sampler may do)
    for _ in range(2):
        evaluator.process([{"image_id": 5}], [prediction(5)])
    with caplog.at_level(logging.INFO):
        bbox = evaluator.evaluate()["bbox"]
    assert "dropped 1 duplicate" in caplog.text
    assert bbox["AP-cat"] == pytest.approx(100.0) and bbox["AP-dog"] == pytest.approx(100.0)
    assert math.isnan(bbox["AP-bird"])  # bird only appears in the unprocessed image 9
    assert bbox["AP"] == pytest.approx(100.0)


def test_bad_inputs(tiny_gt_json, tmp_path):
    with pytest.raises(ValueError, match="Unknown COCO evaluation backend 'fast'; valid backends: "
                                         "pycocotools, faster_coco_eval"):
        COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id=ID_MAP, backend="fast")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        COCOEvaluator(gt_json=str(tmp_path / "missing.json"), contiguous_id_to_dataset_id=ID_MAP)
    with pytest.raises(ValueError, match="Unknown iou_type 'keypoints'"):
        COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id=ID_MAP,
                      iou_types=("keypoints",))
    evaluator = COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id=ID_MAP)
    with pytest.raises(ValueError, match="input without 'image_id'"):
        evaluator.process([{"file_name": "a.jpg"}], [prediction(5)])
    with pytest.raises(ValueError, match=r"evaluated image id\(s\) are not in .*\[77\]"):
        run(evaluator, {5: prediction(5), 77: prediction(9)})
    unmapped = COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id={0: 3, 1: 4, 2: 11})
    with pytest.raises(ValueError, match=r"category id 4 \(contiguous 1\) is not a category"):
        run(unmapped, {5: prediction(5)})


def test_class_names_must_match_the_id_map(tiny_gt_json):
    with pytest.raises(ValueError, match="keys must be 0..1, got"):
        COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id={1: 3, 2: 7})
    with pytest.raises(ValueError, match="2 class_names for 3 entries"):
        COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id=ID_MAP,
                      class_names=["a", "b"])


def test_ground_truth_is_parsed_once_while_unchanged(tiny_gt_json, monkeypatch):
    """Periodic evaluations build a new evaluator each time; the ground-truth json is parsed
    once as long as the file is unchanged, and again once it changes."""
    import detector.evaluation.coco_evaluation as coco_evaluation

    parsed = []
    real_load = coco_evaluation.load_json_file
    monkeypatch.setattr(coco_evaluation, "load_json_file",
                        lambda path, what: parsed.append(path) or real_load(path, what))
    monkeypatch.setattr(coco_evaluation, "_GT_CACHE", {})
    outputs = {image_id: prediction(image_id) for image_id in TINY_OBJECTS}
    for _ in range(3):
        evaluator = COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id=ID_MAP,
                                  backend="faster-coco-eval")
        assert run(evaluator, outputs)["bbox"]["AP"] == pytest.approx(100.0)
    assert parsed == [tiny_gt_json]
    with open(tiny_gt_json) as f:
        data = json.load(f)
    data["images"].append({"id": 99, "width": 120, "height": 120, "file_name": "99.jpg"})
    with open(tiny_gt_json, "w") as f:
        json.dump(data, f)
    evaluator = COCOEvaluator(gt_json=tiny_gt_json, contiguous_id_to_dataset_id=ID_MAP)
    run(evaluator, {99: {}, **outputs})
    assert parsed == [tiny_gt_json, tiny_gt_json]


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_reference_results_through_the_evaluator(reference_dir, backend):
    """The cocoapi reference detections, turned into Instances (masks decoded to full-image
    bitmasks, as the model's pasted masks are), give the published scores through process()."""
    from pycocotools import mask as mask_util

    gt_json = os.path.join(reference_dir, "instances_val2014_100.json")
    with open(gt_json) as f:
        gt = json.load(f)
    category_ids = sorted(c["id"] for c in gt["categories"])
    contiguous = {cat: k for k, cat in enumerate(category_ids)}
    with open(os.path.join(reference_dir, "instances_val2014_fakesegm100_results.json")) as f:
        records = json.load(f)
    with open(os.path.join(reference_dir, "expected_stats.json")) as f:
        expected = json.load(f)["segm"]
    by_image = {image["id"]: [] for image in gt["images"]}  # one image has no detection
    for record in records:
        by_image.setdefault(record["image_id"], []).append(record)
    evaluator = COCOEvaluator(gt_json=gt_json, backend=backend, iou_types=("segm",),
                              contiguous_id_to_dataset_id={k: c for c, k in contiguous.items()})
    evaluator.reset()
    for image_id, image_records in by_image.items():
        if not image_records:
            evaluator.process([{"image_id": image_id}], [{}])
            continue
        rles = [r["segmentation"] for r in image_records]
        masks = torch.from_numpy(mask_util.decode(rles)).permute(2, 0, 1).bool()
        boxes_xywh = torch.tensor(mask_util.toBbox(rles), dtype=torch.float64)
        boxes = torch.cat([boxes_xywh[:, :2], boxes_xywh[:, :2] + boxes_xywh[:, 2:]], dim=1)
        instances = Instances(tuple(masks.shape[1:]), pred_boxes=Boxes(boxes.float()),
                              scores=torch.tensor([r["score"] for r in image_records]),
                              pred_classes=torch.tensor(
                                  [contiguous[r["category_id"]] for r in image_records]),
                              pred_masks=masks)
        evaluator.process([{"image_id": image_id}], [{"instances": instances}])
    results = evaluator.evaluate()["segm"]
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
             "ARl"]
    assert len(records) == 734 and len(by_image) == 100
    for name, want in zip(names, expected):
        assert abs(results[name] / 100 - want) <= 1e-6, (name, results[name], want)
