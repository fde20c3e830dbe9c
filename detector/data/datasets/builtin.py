"""Registers the built-in datasets (imported by ``detector.data``).

COCO splits and coco128 live under ``$DETECTOR_DATASETS`` (default ``./datasets``), resolved when a
dataset is used, not at import; layout in datasets/README.md. ``shapes_train`` / ``shapes_val``
are generated into ``$DETECTOR_CACHE`` on first use (detector/data/datasets/synthetic.py)."""
import os

from ..catalog import DatasetCatalog, MetadataCatalog
from .coco import load_coco_json, register_coco_instances
from .coco_categories import coco_metadata
from .synthetic import (
    SHAPES_CLASSES,
    ensure_shapes_dataset,
    shapes_image_root,
    shapes_json_file,
)

__all__ = ["get_datasets_root", "PREDEFINED_COCO_SPLITS", "register_all"]

# name -> (image folder, annotation json), relative to $DETECTOR_DATASETS
PREDEFINED_COCO_SPLITS = {
    "coco_2014_train": ("coco/train2014", "coco/annotations/instances_train2014.json"),
    "coco_2014_val": ("coco/val2014", "coco/annotations/instances_val2014.json"),
    "coco_2014_minival": ("coco/val2014", "coco/annotations/instances_minival2014.json"),
    "coco_2014_valminusminival": (
        "coco/val2014", "coco/annotations/instances_valminusminival2014.json"),
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
    "coco128": ("coco128/train2017", "coco128/annotations/instances_train2017.json"),
}


def get_datasets_root() -> str:
    """$DETECTOR_DATASETS, or ``datasets`` relative to the current directory."""
    return os.environ.get("DETECTOR_DATASETS") or "datasets"


def _existing_path(dataset_name: str, relative: str, kind: str):
    """A callable resolving ``relative`` under the datasets root now, or failing with the fix."""

    def resolve() -> str:
        root = get_datasets_root()
        path = os.path.join(root, relative)
        exists = os.path.isdir(path) if kind == "folder" else os.path.isfile(path)
        if not exists:
            env = os.environ.get("DETECTOR_DATASETS")
            where = (f"DETECTOR_DATASETS={env}" if env
                     else f"the default root '{root}' (cwd {os.getcwd()})")
            raise FileNotFoundError(
                f"Dataset '{dataset_name}': {kind} '{relative}' not found under {where}; "
                f"set DETECTOR_DATASETS to the folder holding coco/ and coco128/ "
                f"(layout in datasets/README.md)"
            )
        return os.path.abspath(path)

    return resolve


def _load_shapes(split: str, dataset_name: str):
    json_file = ensure_shapes_dataset(split)
    return load_coco_json(json_file, shapes_image_root(split), dataset_name)


def _register_shapes(split: str) -> None:
    name = f"shapes_{split}"
    DatasetCatalog.register(name, lambda: _load_shapes(split, name))
    MetadataCatalog.get(name).set(
        thing_classes=list(SHAPES_CLASSES),
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPES_CLASSES))},
        thing_contiguous_id_to_dataset_id={i: i + 1 for i in range(len(SHAPES_CLASSES))},
        evaluator_type="coco",
    ).set_lazy("json_file", lambda: shapes_json_file(split)).set_lazy(
        "image_root", lambda: shapes_image_root(split)
    )


def register_all() -> None:
    """Register every built-in dataset (once; called on import)."""
    for name, (image_dir, json_rel) in PREDEFINED_COCO_SPLITS.items():
        if name in DatasetCatalog:
            continue
        register_coco_instances(
            name,
            coco_metadata(),
            _existing_path(name, json_rel, "annotation file"),
            _existing_path(name, image_dir, "folder"),
        )
    for split in ("train", "val"):
        if f"shapes_{split}" not in DatasetCatalog:
            _register_shapes(split)


register_all()
