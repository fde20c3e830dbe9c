"""Dataset loaders and the built-in dataset registrations."""
from .coco import DROP_REASONS, DatasetFormatError, load_coco_json, register_coco_instances
from .coco_categories import (
    COCO_CATEGORIES,
    COCO_CATEGORY_IDS,
    COCO_CATEGORY_NAMES,
    EFFDET_COCO80_INDICES,
    TORCHVISION_COCO80_INDICES,
    coco80_head_indices,
    coco_metadata,
)
from .synthetic import SHAPES_CLASSES, ensure_shapes_dataset, generate_shapes_dataset
from . import builtin  # registers coco_*, coco128, shapes_train, shapes_val

__all__ = [
    "DROP_REASONS", "DatasetFormatError", "load_coco_json", "register_coco_instances",
    "COCO_CATEGORIES", "COCO_CATEGORY_IDS", "COCO_CATEGORY_NAMES", "coco_metadata",
    "coco80_head_indices", "TORCHVISION_COCO80_INDICES", "EFFDET_COCO80_INDICES",
    "SHAPES_CLASSES", "ensure_shapes_dataset", "generate_shapes_dataset", "builtin",
]
