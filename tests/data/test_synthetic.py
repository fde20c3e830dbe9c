import contextlib
import io
import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from detector.data import DatasetCatalog, MetadataCatalog, ensure_shapes_dataset
from detector.data.datasets import synthetic
from detector.data.datasets.synthetic import SHAPES_CLASSES, generate_shapes_dataset


def test_generation_is_deterministic(tmp_path):
    a = generate_shapes_dataset(str(tmp_path / "a"), num_images=12, seed=4)
    b = generate_shapes_dataset(str(tmp_path / "b"), num_images=12, seed=4)
    c = generate_shapes_dataset(str(tmp_path / "c"), num_images=12, seed=5)
    assert open(a).read() == open(b).read()
    assert open(a).read() != open(c).read()
    for name in ("000001.png", "000012.png"):
        pa = np.asarray(Image.open(tmp_path / "a" / "images" / name))
        pb = np.asarray(Image.open(tmp_path / "b" / "images" / name))
        assert np.array_equal(pa, pb)


def test_sanity_boxes_masks_classes(tmp_path):
    json_file = generate_shapes_dataset(str(tmp_path), num_images=60, seed=1, image_size=(128, 112))
    data = json.load(open(json_file))
    assert [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert [c["name"] for c in data["categories"]] == list(SHAPES_CLASSES)
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3}
    per_image = {}
    for a in data["annotations"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert len(per_image) == 60 and set(per_image.values()) <= {1, 2, 3, 4}
    assert len(set(per_image.values())) >= 3
    for img in data["images"]:
        assert (img["height"], img["width"]) == (128, 112)
        pixels = np.asarray(Image.open(tmp_path / "images" / img["file_name"]))
        assert pixels.shape == (128, 112, 3)
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 112 and y + h <= 128
        assert 8 <= max(w, h) <= 58 and a["iscrowd"] == 0
        visible = mask_util.decode(a["segmentation"])
        ys, xs = np.nonzero(visible)
        # the box is tight around the visible mask, and the area is the mask's
        assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == a["bbox"]
        assert visible.sum() == a["area"]


def test_json_usable_by_pycocotools(tmp_path):
    json_file = generate_shapes_dataset(str(tmp_path), num_images=5, seed=0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(json_file)
    assert sorted(coco.getCatIds()) == [1, 2, 3]
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
    assert coco.annToMask(ann).sum() == ann["area"]


def test_ensure_builds_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTOR_CACHE", str(tmp_path))
    monkeypatch.setitem(synthetic.SHAPES_SPLITS, "val", (6, 2))
    # leftovers of a run killed mid-generation: removed once old, kept while possibly in progress
    stale = tmp_path / "shapes_v1" / ".val-incomplete-old"
    fresh = tmp_path / "shapes_v1" / ".val-incomplete-new"
    stale.mkdir(parents=True)
    fresh.mkdir()
    os.utime(stale, (0, 0))
    json_file = ensure_shapes_dataset("val")
    assert not stale.exists() and fresh.exists()
    fresh.rmdir()
    assert json_file == str(tmp_path / "shapes_v1" / "val" / "instances_val.json")
    mtime = os.path.getmtime(json_file)
    assert ensure_shapes_dataset("val") == json_file and os.path.getmtime(json_file) == mtime
    # nothing half-written is left next to the split
    assert os.listdir(tmp_path / "shapes_v1") == ["val"]
    assert len(os.listdir(tmp_path / "shapes_v1" / "val" / "images")) == 6


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTOR_CACHE", str(tmp_path))
    monkeypatch.setitem(synthetic.SHAPES_SPLITS, "train", (3, 1))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate_shapes_dataset", interrupted)
    try:
        ensure_shapes_dataset("train")
    except KeyboardInterrupt:
        pass
    assert os.listdir(tmp_path / "shapes_v1") == []


def test_catalog_generates_and_metadata_points_to_json(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTOR_CACHE", str(tmp_path))
    monkeypatch.setitem(synthetic.SHAPES_SPLITS, "val", (8, 2))
    dicts = DatasetCatalog.get("shapes_val")
    meta = MetadataCatalog.get("shapes_val")
    assert len(dicts) == 8 and os.path.isfile(meta.json_file)
    assert meta.json_file.startswith(str(tmp_path))
    assert meta.thing_classes == list(SHAPES_CLASSES)
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    assert all(0 <= o["category_id"] < 3 for d in dicts for o in d["annotations"])
