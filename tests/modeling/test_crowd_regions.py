"""Crowd annotations from a dataset dict to the anchor labels, kept or dropped by INPUT.KEEP_CROWD."""
import numpy as np
import pytest
import torch
from PIL import Image

from detector.data import DatasetMapper
from detector.modeling import build_model

from modeling_testutils import tiny_cfg


def _dataset_dict(tmp_path):
    path = tmp_path / "crowd.png"
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(path)
    return {"file_name": str(path), "image_id": 7, "height": 64, "width": 64, "annotations": [
        {"bbox": [4.0, 4.0, 28.0, 28.0], "category_id": 1, "iscrowd": 0},
        # a crowd of objects over the right half
        {"bbox": [32.0, 0.0, 64.0, 64.0], "category_id": 2, "iscrowd": 1},
    ]}


@pytest.mark.parametrize("keep_crowd", [True, False])
def test_crowd_annotation_ignores_the_anchors_it_covers(tmp_path, keep_crowd):
    cfg = tiny_cfg(**{"INPUT.KEEP_CROWD": str(keep_crowd), "INPUT.MIN_SIZE_TRAIN": "(64,)",
                      "INPUT.MAX_SIZE_TRAIN": "64", "INPUT.RANDOM_FLIP": "none"})
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    inputs = DatasetMapper(**DatasetMapper.from_config(cfg, is_train=True))(
        _dataset_dict(tmp_path))
    instances = inputs["instances"]
    features = [torch.zeros(1, 1, 64 // s, 64 // s) for s in (8, 16, 32)]
    anchors = torch.cat(model.anchor_generator(features))
    labels = model.label_anchors(anchors, model._gt_instances([inputs]))[0][0]
    inside_crowd = (anchors[:, 0] >= 32) & (anchors[:, 2] <= 64) & (anchors[:, 1] >= 0) & \
        (anchors[:, 3] <= 64)
    assert inside_crowd.sum() > 10
    if keep_crowd:
        assert instances.gt_is_crowd.tolist() == [False, True]
        # fully inside the crowd region: never a class, never "no object"
        assert torch.all(labels[inside_crowd] == -1)
    else:
        assert len(instances) == 1
        assert torch.all(labels[inside_crowd] == model.num_classes)
    # the real object keeps its anchors either way, and no anchor learns the crowd's class
    assert (labels == 1).any() and not (labels == 2).any()
    losses = model([inputs])
    assert all(torch.isfinite(v) for v in losses.values())
