import pytest

from detector.data import DatasetCatalog, DatasetNotFoundError, MetadataCatalog
from detector.data.catalog import Metadata


def test_register_get_list(temp_catalog):
    dicts = [{"file_name": "a.jpg", "image_id": 1, "height": 2, "width": 3, "annotations": []}]
    temp_catalog("_test_catalog_a", lambda: dicts)
    assert "_test_catalog_a" in DatasetCatalog.list()
    assert DatasetCatalog.get("_test_catalog_a") == dicts
    with pytest.raises(ValueError, match="already registered"):
        DatasetCatalog.register("_test_catalog_a", lambda: [])


def test_builtin_names_registered():
    names = set(DatasetCatalog.list())
    assert {"coco_2014_train", "coco_2014_val", "coco_2014_minival", "coco_2017_train",
            "coco_2017_val", "coco128", "shapes_train", "shapes_val"} <= names


def test_unknown_name_suggests_close_names():
    with pytest.raises(DatasetNotFoundError) as info:
        DatasetCatalog.get("coco_2017_vall")
    msg = str(info.value)
    assert "coco_2017_vall" in msg and "'coco_2017_val'" in msg
    assert "\n" not in msg


def test_loader_must_return_list(temp_catalog):
    temp_catalog("_test_catalog_bad", lambda: {"not": "a list"})
    with pytest.raises(TypeError, match="_test_catalog_bad"):
        DatasetCatalog.get("_test_catalog_bad")


def test_metadata_fields_and_immutability():
    meta = Metadata("_m")
    meta.thing_classes = ["a", "b"]
    meta.thing_classes = ["a", "b"]  # equal value is fine
    with pytest.raises(ValueError, match="thing_classes"):
        meta.thing_classes = ["a", "c"]
    meta.set(json_file="x.json", evaluator_type="coco")
    assert meta.as_dict()["json_file"] == "x.json"
    with pytest.raises(AttributeError, match="image_root"):
        meta.image_root
    assert meta.get("image_root", "default") == "default"


def test_metadata_lazy_field_follows_its_source(monkeypatch):
    meta = Metadata("_lazy")
    monkeypatch.setenv("_DETECTOR_TEST_ROOT", "/one")
    import os

    meta.set_lazy("image_root", lambda: os.environ["_DETECTOR_TEST_ROOT"] + "/img")
    assert meta.image_root == "/one/img"
    monkeypatch.setenv("_DETECTOR_TEST_ROOT", "/two")
    assert meta.image_root == "/two/img"
    with pytest.raises(ValueError):
        meta.image_root = "/elsewhere"


def test_metadata_catalog_get_creates_once():
    name = "_test_meta_catalog"
    try:
        a = MetadataCatalog.get(name)
        a.evaluator_type = "coco"
        assert MetadataCatalog.get(name) is a
        assert MetadataCatalog.get(name).evaluator_type == "coco"
    finally:
        MetadataCatalog.remove(name)


def test_builtin_coco_metadata_maps_are_inverse():
    meta = MetadataCatalog.get("coco_2017_val")
    fwd = meta.thing_dataset_id_to_contiguous_id
    back = meta.thing_contiguous_id_to_dataset_id
    assert len(meta.thing_classes) == 80 and sorted(fwd.values()) == list(range(80))
    assert all(back[c] == d for d, c in fwd.items())
    assert fwd[1] == 0 and fwd[90] == 79  # person first, toothbrush last


def test_builtin_coco_missing_files_says_set_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTOR_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        DatasetCatalog.get("coco_2014_minival")
    msg = str(info.value)
    assert "DETECTOR_DATASETS" in msg and "instances_minival2014.json" in msg and "\n" not in msg


def test_builtin_coco_resolves_root_lazily(tmp_path, monkeypatch):
    from data_helpers import ann, write_coco

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    json_file, _ = write_coco(tmp_path, [{"id": 1, "file_name": "x.jpg", "height": 8, "width": 8}],
                              [ann(1, 1, [1, 1, 2, 2], category_id=1)],
                              categories=[{"id": 1, "name": "person"}], write_images=False)
    (root / "annotations" / "instances_val2017.json").write_text(open(json_file).read())
    (root / "val2017").mkdir()
    monkeypatch.setenv("DETECTOR_DATASETS", str(tmp_path))
    with pytest.raises(Exception, match="person"):
        # the json declares 1 class, the built-in metadata 80: the conflict is reported
        DatasetCatalog.get("coco_2017_val")
    assert MetadataCatalog.get("coco_2017_val").json_file == str(
        root / "annotations" / "instances_val2017.json")
