from . import hooks
from .cli import (
    default_argument_parser,
    default_setup,
    expected_world_size,
    launch_from_args,
    setup_cfg,
)
from .defaults import DefaultTrainer
from .launch import launch
from .predictor import DefaultPredictor
from .scaling import scale_for_world_size
from .train_loop import AMPTrainer, HookBase, SimpleTrainer, TrainerBase
from .visualization_hook import (
    EvalImages,
    annotations_to_arrays,
    draw_ground_truth_and_predictions,
    instances_to_arrays,
)

__all__ = [
    "hooks", "DefaultTrainer", "DefaultPredictor", "default_argument_parser", "default_setup",
    "setup_cfg",
    "launch_from_args", "expected_world_size", "launch", "scale_for_world_size",
    "AMPTrainer", "HookBase", "SimpleTrainer", "TrainerBase",
    "EvalImages", "instances_to_arrays", "annotations_to_arrays",
    "draw_ground_truth_and_predictions",
]
