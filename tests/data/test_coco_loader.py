import json
import logging
import math
import os

import pytest

from detector.data import (
    DatasetCatalog,
    DatasetFormatError,
    MetadataCatalog,
    get_detection_dataset_dicts,
    load_coco_json,
    register_coco_instances,
)

from data_helpers import ann, write_coco

IMAGES = [
    {"id": 10, "file_name": "a.jpg", "height": 40, "width": 60},
    {"id": 4, "file_name": "b.jpg", "height": 50, "width": 30},
    {"id": 22, "file_name": "empty.jpg", "height": 20, "width": 20},
]
CROWD_RLE = {"size": [40, 60], "counts": "kl02n00O1O1N2"}
POLYGON = [[5.0, 5.0, 25.0, 5.0, 25.0, 15.0, 5.0, 15.0]]


def _good_annotations():
    return [
        ann(1, 10, [5, 5, 20, 10], category_id=12, segmentation=POLYGON),
        ann(2, 10, [30, 10, 10, 20], category_id=3),
        ann(3, 4, [1.5, 2.5, 10, 20], category_id=7),
        ann(4, 10, [0, 0, 60, 40], category_id=3, iscrowd=1, segmentation=CROWD_RLE),
    ]


def test_load_converts_boxes_and_maps_ids(tmp_path):
    json_file, root = write_coco(tmp_path, IMAGES, _good_annotations(), write_images=False)
    name = "_test_coco_load"
    stats = {}
    try:
        dicts = load_coco_json(json_file, root, name, stats=stats)
        meta = MetadataCatalog.get(name)
        # sorted dataset ids 3, 7, 12 -> 0, 1, 2
        assert meta.thing_classes == ["cat", "dog", "bird"]
        assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 12: 2}
        assert meta.thing_contiguous_id_to_dataset_id == {0: 3, 1: 7, 2: 12}
    finally:
        MetadataCatalog.remove(name)
    assert [d["image_id"] for d in dicts] == [4, 10, 22]
    by_id = {d["image_id"]: d for d in dicts}
    a = by_id[10]
    assert a["file_name"] == os.path.join(os.path.abspath(root), "a.jpg")
    assert (a["height"], a["width"]) == (40, 60)
    assert [o["bbox"] for o in a["annotations"]] == [
        [5, 5, 25, 15], [30, 10, 40, 30], [0, 0, 60, 40]]
    assert [o["category_id"] for o in a["annotations"]] == [2, 0, 0]
    assert a["annotations"][0]["segmentation"] == POLYGON
    assert a["annotations"][2]["iscrowd"] == 1 and a["annotations"][2]["segmentation"] == CROWD_RLE
    assert by_id[4]["annotations"][0]["bbox"] == [1.5, 2.5, 11.5, 22.5]
    assert by_id[22]["annotations"] == []  # images without annotations are kept
    assert stats["images"] == 3 and stats["annotations"] == 4 and stats["empty_images"] == 1


def test_contiguous_ids_round_trip_to_dataset_ids(tmp_path):
    json_file, root = write_coco(tmp_path, IMAGES, _good_annotations(), write_images=False)
    name = "_test_coco_roundtrip"
    register_coco_instances(name, {}, json_file, root)
    try:
        dicts = DatasetCatalog.get(name)
        meta = MetadataCatalog.get(name)
        assert meta.json_file == json_file and meta.evaluator_type == "coco"
        back = meta.thing_contiguous_id_to_dataset_id
        original = {a["id"]: a["category_id"] for a in json.load(open(json_file))["annotations"]}
        loaded = [o["category_id"] for d in dicts for o in d["annotations"]]
        assert sorted(back[c] for c in loaded) == sorted(original.values())
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_degenerate_boxes_dropped_and_counted(tmp_path, caplog):
    anns = [
        ann(1, 10, [5, 5, 0, 10]),                 # zero width
        ann(2, 10, [5, 5, 10, 0]),                 # zero height
        ann(3, 10, [5, 5, -3, 10]),                # negative width
        ann(4, 10, [5, 5, 10, float("nan")]),      # NaN
        ann(5, 10, [float("inf"), 5, 10, 10]),     # inf
        ann(6, 10, [70, 5, 10, 10]),               # right of the 60 px wide image
        ann(7, 10, [-30, -30, 10, 10]),            # above-left of the image
        ann(8, 10, [50, 30, 20, 20]),              # partly outside: clipped
        ann(9, 10, [1, 1, 5, 5]),                  # fine
    ]
    json_file, root = write_coco(tmp_path, IMAGES[:1], anns, write_images=False)
    stats = {}
    with caplog.at_level(logging.WARNING, logger="detector.data"):
        dicts = load_coco_json(json_file, root, stats=stats)
    assert stats["zero_size"] == 2
    assert stats["negative_size"] == 1
    assert stats["non_finite"] == 2
    assert stats["outside_image"] == 2
    assert stats["clipped"] == 1
    boxes = [o["bbox"] for o in dicts[0]["annotations"]]
    assert boxes == [[50, 30, 60, 40], [1, 1, 6, 6]]
    assert all(math.isfinite(v) for b in boxes for v in b)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one summary, not one line per box
    msg = warnings[0].getMessage()
    assert "zero_size=2" in msg and "outside_image=2" in msg and json_file in msg


def test_unknown_category_id_names_file_annotation_and_id(tmp_path):
    anns = _good_annotations() + [ann(77, 10, [1, 1, 5, 5], category_id=99)]
    json_file, root = write_coco(tmp_path, IMAGES, anns, write_images=False)
    with pytest.raises(DatasetFormatError) as info:
        load_coco_json(json_file, root)
    msg = str(info.value)
    assert json_file in msg and "annotation id 77" in msg and "99" in msg and "\n" not in msg


def test_malformed_json_names_file_and_position(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [],\n "categories": [,]}')
    with pytest.raises(DatasetFormatError) as info:
        load_coco_json(str(bad), str(tmp_path))
    msg = str(info.value)
    assert str(bad) in msg and "line 2" in msg and "column" in msg and "\n" not in msg


def test_missing_json_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError) as info:
        load_coco_json(str(missing), str(tmp_path))
    assert str(missing) in str(info.value) and "\n" not in str(info.value)


def test_not_coco_structure(tmp_path):
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2, 3]")
    with pytest.raises(DatasetFormatError, match="images"):
        load_coco_json(str(bad), str(tmp_path))


def test_bad_bbox_shape_names_annotation(tmp_path):
    json_file, root = write_coco(tmp_path, IMAGES, [ann(5, 10, [1, 2, 3])], write_images=False)
    with pytest.raises(DatasetFormatError, match="annotation id 5"):
        load_coco_json(json_file, root)


def test_empty_images_kept_then_filtered_for_training(tmp_path, temp_catalog, caplog):
    anns = [ann(1, 10, [5, 5, 20, 10]), ann(2, 4, [0, 0, 30, 50], iscrowd=1)]
    json_file, root = write_coco(tmp_path, IMAGES, anns, write_images=False)
    name = temp_catalog("_test_coco_empty", lambda: load_coco_json(json_file, root))
    assert len(DatasetCatalog.get(name)) == 3
    with caplog.at_level(logging.INFO, logger="detector.data"):
        kept = get_detection_dataset_dicts([name], filter_empty=True)
    # image 22 has nothing, image 4 only a crowd box: neither can train the detector
    assert [d["image_id"] for d in kept] == [10]
    assert any("Removed 2 of 3 images" in r.getMessage() for r in caplog.records)
    assert len(get_detection_dataset_dicts([name], filter_empty=False)) == 3


def test_coco128(coco128_root):
    json_file = os.path.join(coco128_root, "annotations", "instances_train2017.json")
    stats = {}
    dicts = load_coco_json(json_file, os.path.join(coco128_root, "train2017"), stats=stats)
    assert len(dicts) == 128
    assert stats["annotations"] == 939 and stats["empty_images"] == 2
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    anns = [o for d in dicts for o in d["annotations"]]
    assert sum(o["iscrowd"] for o in anns) == 10
    assert all(isinstance(o["segmentation"], dict) for o in anns if o["iscrowd"])
    present = {o["category_id"] for o in anns}
    assert len(present) == 71 and present <= set(range(80))

    raw = json.load(open(json_file))
    meta = MetadataCatalog.get("coco128")
    fwd, back = meta.thing_dataset_id_to_contiguous_id, meta.thing_contiguous_id_to_dataset_id
    assert sorted(fwd) == sorted(c["id"] for c in raw["categories"])
    assert all(back[fwd[d]] == d for d in fwd) and all(fwd[back[c]] == c for c in back)
    # each loaded annotation maps back to the dataset id it had in the json, in order
    raw_by_image = {}
    for a in raw["annotations"]:
        raw_by_image.setdefault(a["image_id"], []).append(a["category_id"])
    for d in dicts:
        mapped_back = [back[o["category_id"]] for o in d["annotations"]]
        assert mapped_back == raw_by_image.get(d["image_id"], [])


def test_coco128_via_catalog(coco128_root, monkeypatch):
    monkeypatch.setenv("DETECTOR_DATASETS", os.path.dirname(coco128_root))
    dicts = DatasetCatalog.get("coco128")
    assert len(dicts) == 128
    names = MetadataCatalog.get("coco128").thing_classes
    assert names[0] == "person" and len(names) == 80


@pytest.mark.parametrize("images,needle", [
    ([{"id": 1, "file_name": "a.jpg", "height": 0, "width": 5}], "image id 1 has invalid size"),
    ([{"id": 1, "file_name": "a.jpg", "width": 5}], "image id 1 has no 'height'"),
    ([{"id": 1, "file_name": "a.jpg", "height": 5, "width": 5},
      {"id": 1, "file_name": "b.jpg", "height": 5, "width": 5}], "duplicate image id 1"),
])
def test_invalid_image_entries_name_the_image(tmp_path, images, needle):
    json_file, root = write_coco(tmp_path, images, [], write_images=False)
    with pytest.raises(DatasetFormatError, match=needle):
        load_coco_json(json_file, root)
