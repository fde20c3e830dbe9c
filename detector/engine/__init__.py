from . import hooks
from .defaults import DefaultTrainer, default_argument_parser, default_setup, setup_cfg
from .launch import launch
from .train_loop import AMPTrainer, HookBase, SimpleTrainer, TrainerBase

__all__ = [
    "hooks", "DefaultTrainer", "default_argument_parser", "default_setup", "setup_cfg", "launch",
    "AMPTrainer", "HookBase", "SimpleTrainer", "TrainerBase",
]
