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
from .scaling import scale_for_world_size
from .train_loop import AMPTrainer, HookBase, SimpleTrainer, TrainerBase

__all__ = [
    "hooks", "DefaultTrainer", "default_argument_parser", "default_setup", "setup_cfg",
    "launch_from_args", "expected_world_size", "launch", "scale_for_world_size",
    "AMPTrainer", "HookBase", "SimpleTrainer", "TrainerBase",
]
