"""A short training run on the real coco128 sample writes a results JSON that pycocotools accepts."""
import json
import os

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detector.engine import DefaultTrainer
from detector.engine import default_argument_parser, setup_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_tiny_shapes.yaml")


def test_short_coco128_run_writes_valid_results(datasets_root, tmp_path):
    if not os.path.isdir(os.path.join(datasets_root, "coco128")):
        pytest.skip(f"{datasets_root}/coco128 is missing")
    args = default_argument_parser().parse_args([
        "--config-file", CONFIG,
        "DATASETS.TRAIN", "('coco128',)", "DATASETS.TEST", "('coco128',)",
        "MODEL.RETINANET.NUM_CLASSES", "80", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
        "TEST.DETECTIONS_PER_IMAGE", "20",
        "SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "2",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path),
    ])
    cfg = setup_cfg(args)
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert set(results["bbox"]) >= {"AP", "AP50", "AR100"}

    results_file = tmp_path / "inference" / "coco128" / "coco_instances_results.json"
    detections = json.loads(results_file.read_text())
    assert len(detections) > 0
    gt = COCO(os.path.join(datasets_root, "coco128", "annotations", "instances_train2017.json"))
    dt = gt.loadRes(str(results_file))  # asserts image ids are in the ground truth
    assert set(dt.getCatIds()) <= set(gt.getCatIds())  # original, non-contiguous COCO ids


MASK_CONFIG = os.path.join(ROOT, "configs", "demo", "mask_rcnn_tiny_shapes.yaml")


def test_short_mask_rcnn_coco128_run_writes_bbox_and_segm_results(datasets_root, tmp_path):
    if not os.path.isdir(os.path.join(datasets_root, "coco128")):
        pytest.skip(f"{datasets_root}/coco128 is missing")
    args = default_argument_parser().parse_args([
        "--config-file", MASK_CONFIG,
        "DATASETS.TRAIN", "('coco128',)", "DATASETS.TEST", "('coco128',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", "80", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "TEST.DETECTIONS_PER_IMAGE", "10",
        "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path),
    ])
    trainer = DefaultTrainer(setup_cfg(args))
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert set(results) == {"bbox", "segm"} and "AP" in results["segm"]

    results_file = tmp_path / "inference" / "coco128" / "coco_instances_results.json"
    detections = json.loads(results_file.read_text())
    assert len(detections) > 0 and all("segmentation" in d for d in detections)
    gt = COCO(os.path.join(datasets_root, "coco128", "annotations", "instances_train2017.json"))
    for iou_type in ("bbox", "segm"):
        dt = gt.loadRes(str(results_file))  # pycocotools accepts the boxes and the RLEs
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert len(evaluator.stats) == 12
