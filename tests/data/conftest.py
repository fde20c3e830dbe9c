"""Fixtures of the data tests: temporary catalog entries that are removed afterwards, a small
config, and the coco128 location."""
import os

import pytest

from detector.config import get_cfg
from detector.data import DatasetCatalog, MetadataCatalog


@pytest.fixture
def temp_catalog():
    """Register temporary datasets via ``register(name, fn, **metadata)``; removed at teardown."""
    names = []

    def register(name, fn, **metadata):
        DatasetCatalog.register(name, fn)
        MetadataCatalog.get(name).set(**metadata)
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        if name in MetadataCatalog:
            MetadataCatalog.remove(name)


@pytest.fixture
def tiny_cfg():
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SEED = 3
    return cfg


@pytest.fixture
def coco128_root():
    """$DETECTOR_DATASETS/coco128, or skip with the reason."""
    root = os.environ.get("DETECTOR_DATASETS")
    if not root:
        pytest.skip("DETECTOR_DATASETS is not set (see datasets/README.md)")
    path = os.path.join(root, "coco128")
    if not os.path.isfile(os.path.join(path, "annotations", "instances_train2017.json")):
        pytest.skip(f"coco128 not found under DETECTOR_DATASETS={root}")
    return path
