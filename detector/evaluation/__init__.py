"""Evaluation: the evaluator interface, the inference loop and COCO evaluation (two backends)."""
from .coco_backend import (
    IOU_TYPES,
    STAT_NAMES,
    VALID_BACKENDS,
    CocoEvalRun,
    build_coco_api,
    check_backend,
    format_summary,
    get_coco_api,
    load_coco_results,
    run_coco_eval,
)
from .coco_evaluation import (
    RESULTS_FILE_NAME,
    COCOEvaluator,
    instances_to_coco_json,
    load_checked_gt,
)
from .coco_json import check_coco_gt, check_coco_results, evaluate_coco_json, load_json_file
from .evaluator import DatasetEvaluator, DatasetEvaluators, inference_on_dataset
from .synthetic import make_synthetic_coco

__all__ = [
    "DatasetEvaluator", "DatasetEvaluators", "inference_on_dataset",
    "COCOEvaluator", "RESULTS_FILE_NAME", "instances_to_coco_json", "load_checked_gt",
    "evaluate_coco_json", "load_json_file", "check_coco_gt", "check_coco_results",
    "VALID_BACKENDS", "IOU_TYPES", "STAT_NAMES", "CocoEvalRun", "check_backend", "get_coco_api",
    "build_coco_api", "load_coco_results", "run_coco_eval", "format_summary",
    "make_synthetic_coco",
]
