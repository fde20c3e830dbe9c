"""Dataset loaders and the built-in dataset registrations."""
from .coco import DROP_REASONS, DatasetFormatError, load_coco_json, register_coco_instances
from .synthetic import SHAPES_CLASSES, ensure_shapes_dataset, generate_shapes_dataset
from . import builtin  # registers coco_*, coco128, shapes_train, shapes_val

__all__ = [
    "DROP_REASONS", "DatasetFormatError", "load_coco_json", "register_coco_instances",
    "SHAPES_CLASSES", "ensure_shapes_dataset", "generate_shapes_dataset", "builtin",
]
