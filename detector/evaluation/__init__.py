"""Evaluation: the evaluator interface, the inference loop and COCO evaluation (two backends)."""
from .coco_backend import (
    IOU_TYPES,
    STAT_NAMES,
    VALID_BACKENDS,
    CocoEvalRun,
    build_coco_api,
    build_results_api,
    check_backend,
    format_summary,
    get_coco_api,
    load_coco_results,
    run_coco_eval,
)
from .coco_evaluation import (
    RESULTS_FILE_NAME,
    COCOEvaluator,
    instances_to_arrays,
    instances_to_coco_json,
    load_checked_gt,
)
from .coco_json import (
    CocoResultArrays,
    Float32Decimals,
    check_coco_gt,
    check_coco_results,
    check_result_arrays,
    coco_results_json,
    evaluate_coco_json,
    float32_decimals,
    load_json_file,
)
from .evaluator import DatasetEvaluator, DatasetEvaluators, inference_on_dataset
from .synthetic import make_synthetic_coco, synthetic_model_outputs

__all__ = [
    "DatasetEvaluator", "DatasetEvaluators", "inference_on_dataset",
    "COCOEvaluator", "RESULTS_FILE_NAME", "instances_to_arrays", "instances_to_coco_json",
    "load_checked_gt", "evaluate_coco_json", "load_json_file", "check_coco_gt",
    "check_coco_results", "CocoResultArrays", "check_result_arrays", "Float32Decimals",
    "float32_decimals", "coco_results_json",
    "VALID_BACKENDS", "IOU_TYPES", "STAT_NAMES", "CocoEvalRun", "check_backend", "get_coco_api",
    "build_coco_api", "build_results_api", "load_coco_results", "run_coco_eval", "format_summary",
    "make_synthetic_coco", "synthetic_model_outputs",
]
