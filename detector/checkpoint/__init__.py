from .checkpointer import (
    CheckpointError,
    DetectionCheckpointer,
    PeriodicCheckpointer,
    load_checkpoint_file,
)
from .torchvision_retinanet import convert_torchvision_retinanet_state_dict

__all__ = [
    "CheckpointError", "DetectionCheckpointer", "PeriodicCheckpointer", "load_checkpoint_file",
    "convert_torchvision_retinanet_state_dict",
]
