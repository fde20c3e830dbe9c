"""Datasets (catalogs, COCO loading, built-in datasets), the dataset mapper, samplers, loaders."""
from .catalog import DatasetCatalog, DatasetNotFoundError, Metadata, MetadataCatalog
from .datasets import builtin  # noqa: F401  registers the built-in datasets
from .datasets import (
    DatasetFormatError,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    load_coco_json,
    register_coco_instances,
)
from .dataset_mapper import DatasetMapper, ImageLoadError, ImageSizeMismatchError, read_image
from .samplers import InferenceSampler, TrainingBatchSampler
from .common import TrainingDataLoader, TrainingSamples
from .build import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from . import transforms

__all__ = [
    "DatasetCatalog", "MetadataCatalog", "Metadata", "DatasetNotFoundError",
    "DatasetFormatError", "load_coco_json", "register_coco_instances",
    "ensure_shapes_dataset", "generate_shapes_dataset",
    "DatasetMapper", "ImageLoadError", "ImageSizeMismatchError", "read_image",
    "TrainingBatchSampler", "InferenceSampler", "TrainingSamples", "TrainingDataLoader",
    "build_detection_train_loader", "build_detection_test_loader", "get_detection_dataset_dicts",
    "transforms",
]
