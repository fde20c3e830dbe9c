"""Fixtures of the evaluation tests."""
import os

import pytest
from tiny_coco import tiny_gt_dict, write_json


@pytest.fixture
def tiny_gt_json(tmp_path):
    return write_json(tmp_path / "tiny_gt.json", tiny_gt_dict())


@pytest.fixture
def reference_dir(datasets_root):
    """$DETECTOR_DATASETS/coco2014_eval_reference, or skip."""
    path = os.path.join(datasets_root, "coco2014_eval_reference")
    if not os.path.isdir(path):
        pytest.skip(f"{path} is missing (COCO evaluation reference data)")
    return path
