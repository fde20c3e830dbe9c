"""Registers the built-in datasets (imported by ``detector.data``).

COCO splits and coco128 live under ``$DETECTOR_DATASETS`` (default ``./datasets``), resolved when a
dataset is used, not at import; layout in datasets/README.md. ``shapes_train`` / ``shapes_val``
are generated into ``$DETECTOR_CACHE`` on first use (detector/data/datasets/synthetic.py)."""
import os

from ..catalog import DatasetCatalog, MetadataCatalog
from .coco import load_coco_json, register_coco_instances
from .synthetic import (
    SHAPES_CLASSES,
    ensure_shapes_dataset,
    shapes_image_root,
    shapes_json_file,
)

__all__ = ["get_datasets_root", "COCO_CATEGORIES", "PREDEFINED_COCO_SPLITS", "register_all"]

# COCO's 80 thing categories as (dataset id, name); ids are not contiguous
COCO_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)

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


def _coco_metadata():
    ids = [cid for cid, _ in COCO_CATEGORIES]
    return {
        "thing_classes": [name for _, name in COCO_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {cid: i for i, cid in enumerate(ids)},
        "thing_contiguous_id_to_dataset_id": dict(enumerate(ids)),
    }


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
            _coco_metadata(),
            _existing_path(name, json_rel, "annotation file"),
            _existing_path(name, image_dir, "folder"),
        )
    for split in ("train", "val"):
        if f"shapes_{split}" not in DatasetCatalog:
            _register_shapes(split)


register_all()
