from .checkpointer import (
    CheckpointError,
    DetectionCheckpointer,
    PeriodicCheckpointer,
    atomic_torch_save,
    load_checkpoint_file,
)
from .torchvision_retinanet import convert_torchvision_retinanet_state_dict

__all__ = [
    "CheckpointError", "DetectionCheckpointer", "PeriodicCheckpointer", "load_checkpoint_file",
    "atomic_torch_save", "convert_torchvision_retinanet_state_dict",
]
