from .backbone_weights import (
    BackboneWeightsError,
    BackboneWeightsReport,
    load_backbone_weights,
    load_backbone_weights_from_config,
    read_numpy_pickle,
    resolve_pretrained_path,
)
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
    "atomic_torch_save", "convert_torchvision_retinanet_state_dict", "BackboneWeightsError",
    "BackboneWeightsReport", "load_backbone_weights", "load_backbone_weights_from_config",
    "read_numpy_pickle", "resolve_pretrained_path",
]
