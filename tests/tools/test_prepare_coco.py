"""datasets/prepare_coco.py on fake COCO downloads: a few generated JPEGs in zips laid out like the
official ones, small instances files and a minival tgz. The registered coco_* datasets must load
from the prepared folder, and bad downloads must end with one line naming the file."""
import importlib.util
import io
import json
import os
import tarfile
import zipfile

import pytest
from PIL import Image

from detector.data import DatasetCatalog, MetadataCatalog
from detector.data.datasets import COCO_CATEGORIES
from log_capture import CollectLogs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VAL2014_IDS = [42, 73, 74, 133, 136, 139]
MINIVAL_IDS = [42, 133]
TRAIN2014_IDS = [9, 25, 30, 34]
TRAIN2017_IDS = [9, 25, 30]
VAL2017_IDS = [139, 285]


@pytest.fixture(scope="module")
def prepare_coco():
    spec = importlib.util.spec_from_file_location(
        "_prepare_coco", os.path.join(ROOT, "datasets", "prepare_coco.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _file_name(split, image_id):
    return f"COCO_{split}_{image_id:012d}.jpg" if split.endswith("2014") else f"{image_id:012d}.jpg"


def _jpeg(seed):
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (seed * 40 % 256, 90, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _instances(split, ids):
    """A small valid instances file: COCO's 80 categories, one box per image."""
    return {
        "images": [{"id": i, "file_name": _file_name(split, i), "height": 24, "width": 32}
                   for i in ids],
        "annotations": [{"id": 1000 + i, "image_id": i, "category_id": 1 + 2 * (i % 2),
                         "bbox": [2.0, 3.0, 10.0, 8.0], "area": 80.0, "iscrowd": 0}
                        for i in ids],
        "categories": [{"id": cid, "name": name} for cid, name in COCO_CATEGORIES],
    }


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return str(path)


def _image_zip(folder, split, ids, name=None):
    members = {f"{split}/": b"", **{f"{split}/{_file_name(split, i)}": _jpeg(i) for i in ids}}
    return _zip(folder / (name or f"{split}.zip"), members)


def _annotation_zip(folder, year, splits):
    members = {f"annotations/instances_{s}{year}.json": json.dumps(_instances(f"{s}{year}", ids))
               for s, ids in splits.items()}
    members[f"annotations/captions_train{year}.json"] = json.dumps({"annotations": []})
    return _zip(folder / f"annotations_trainval{year}.zip", members)


def _minival_tgz(folder, minival_ids, rest_ids):
    path = folder / "coco_annotations_minival.tgz"
    with tarfile.open(path, "w:gz") as tf:
        for name, ids in (("minival2014", minival_ids), ("valminusminival2014", rest_ids)):
            data = json.dumps(_instances("val2014", ids)).encode()
            info = tarfile.TarInfo(f"annotations/instances_{name}.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def _error_line(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "no error was printed"
    return lines[-1]


def test_prepares_2014_and_2017_and_the_registered_datasets_load(
        prepare_coco, tmp_path, monkeypatch):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    root = tmp_path / "datasets"
    monkeypatch.setenv("DETECTOR_DATASETS", str(root))
    rest_ids = [i for i in VAL2014_IDS if i not in MINIVAL_IDS]
    args = [
        _image_zip(downloads, "train2014", TRAIN2014_IDS),
        _image_zip(downloads, "val2014", VAL2014_IDS),
        _annotation_zip(downloads, 2014, {"train": TRAIN2014_IDS, "val": VAL2014_IDS}),
        _image_zip(downloads, "train2017", TRAIN2017_IDS),
        _image_zip(downloads, "val2017", VAL2017_IDS),
        _annotation_zip(downloads, 2017, {"train": TRAIN2017_IDS, "val": VAL2017_IDS}),
        "--minival", _minival_tgz(downloads, MINIVAL_IDS, rest_ids), "--allow-subset",
    ]
    # a folder an interrupted extraction left behind is replaced
    stale = root / "coco" / ".val2017.partial" / "val2017"
    stale.mkdir(parents=True)
    (stale / "half_written.jpg").write_bytes(b"\xff\xd8")

    with CollectLogs("detector.prepare_coco") as logs:
        assert prepare_coco.main(args) == 0
    assert "(a subset, allowed by --allow-subset)" in logs.text
    for name in ("coco_2014_train", "coco_2014_val", "coco_2014_minival",
                 "coco_2014_valminusminival", "coco_2017_train", "coco_2017_val"):
        assert f"{name}: ready" in logs.text

    coco = root / "coco"
    assert sorted(p.name for p in coco.iterdir()) == [
        "annotations", "train2014", "train2017", "val2014", "val2017"]
    assert (coco / "annotations" / "captions_train2017.json").is_file()
    expected_ids = {
        "coco_2014_train": TRAIN2014_IDS, "coco_2014_val": VAL2014_IDS,
        "coco_2014_minival": MINIVAL_IDS, "coco_2014_valminusminival": rest_ids,
        "coco_2017_train": TRAIN2017_IDS, "coco_2017_val": VAL2017_IDS,
    }
    for name, ids in expected_ids.items():
        dicts = DatasetCatalog.get(name)
        assert sorted(d["image_id"] for d in dicts) == sorted(ids), name
        for d in dicts:
            assert os.path.isfile(d["file_name"]), d["file_name"]
            assert [a["category_id"] for a in d["annotations"]] == [2 * (d["image_id"] % 2)]
        assert len(MetadataCatalog.get(name).thing_classes) == 80
        assert all(f"{os.sep}coco{os.sep}val2014{os.sep}" in d["file_name"] for d in dicts) \
            == ("2014_val" in name or "minival" in name)

    # a re-run extracts nothing again and passes the same checks
    image = coco / "val2014" / _file_name("val2014", 42)
    os.utime(image, (1, 1))
    with CollectLogs("detector.prepare_coco") as logs:
        assert prepare_coco.main(args) == 0
    assert logs.text.count("skipping") == 6
    assert "extracted" not in logs.text and "installed" not in logs.text
    assert os.stat(image).st_mtime == 1


def test_official_counts_are_required_unless_allow_subset(prepare_coco, tmp_path, capsys):
    args = [_image_zip(tmp_path, "val2017", VAL2017_IDS),
            _annotation_zip(tmp_path, 2017, {"val": VAL2017_IDS}),
            "--root", str(tmp_path / "datasets")]
    assert prepare_coco.main(args) == 1
    line = _error_line(capsys)
    json_file = os.path.join(str(tmp_path / "datasets"), "coco", "annotations",
                             "instances_val2017.json")
    assert line.startswith(f"prepare_coco.py: error: {json_file} has 2 images, "
                           f"the official release 5000")
    assert "--allow-subset" in line
    assert prepare_coco.main(args + ["--allow-subset"]) == 0


def test_listed_image_missing_from_the_zip_fails(prepare_coco, tmp_path, capsys):
    args = [_image_zip(tmp_path, "val2017", VAL2017_IDS[:1]),
            _annotation_zip(tmp_path, 2017, {"val": VAL2017_IDS}),
            "--root", str(tmp_path / "datasets"), "--allow-subset"]
    assert prepare_coco.main(args) == 1
    folder = os.path.join(str(tmp_path / "datasets"), "coco", "val2017")
    assert _error_line(capsys) == (
        f"prepare_coco.py: error: {folder}: 1 of the 2 images listed in "
        f"{os.path.join(os.path.dirname(folder), 'annotations', 'instances_val2017.json')} are "
        f"missing (first: {_file_name('val2017', VAL2017_IDS[1])})")


UNSAFE = " (absolute or with '..'); refusing to extract"


@pytest.mark.parametrize("member, message", [
    ("val2017/../../escaped.jpg", "unsafe member path 'val2017/../../escaped.jpg'" + UNSAFE),
    ("/escaped.jpg", "unsafe member path '/escaped.jpg'" + UNSAFE),
    ("train2017/000000000009.jpg", "expected every member under val2017/, found train2017/, "
                                   "val2017/ (not an official COCO zip)"),
])
def test_bad_zip_members_are_refused(prepare_coco, tmp_path, capsys, member, message):
    path = _zip(tmp_path / "val2017.zip", {"val2017/000000000139.jpg": _jpeg(1), member: b"x"})
    root = tmp_path / "datasets"
    assert prepare_coco.main([path, "--root", str(root), "--allow-subset"]) == 1
    assert _error_line(capsys) == f"prepare_coco.py: error: {path}: {message}"
    assert not (tmp_path / "escaped.jpg").exists() and not (root / "coco" / "val2017").exists()


def test_missing_or_corrupt_zip(prepare_coco, tmp_path, capsys):
    root = ["--root", str(tmp_path / "datasets")]
    missing = str(tmp_path / "train2017.zip")
    assert prepare_coco.main([missing, *root]) == 1
    assert _error_line(capsys) == f"prepare_coco.py: error: {missing}: file not found"

    truncated = tmp_path / "val2017.zip"
    full = open(_image_zip(tmp_path, "val2017", VAL2017_IDS), "rb").read()
    truncated.write_bytes(full[: len(full) // 2])
    assert prepare_coco.main([str(truncated), *root]) == 1
    assert _error_line(capsys).startswith(
        f"prepare_coco.py: error: {truncated}: not a readable zip file")


def test_overlapping_minival_ids_are_refused(prepare_coco, tmp_path, capsys):
    root = tmp_path / "datasets"
    zips = [_image_zip(tmp_path, "val2014", VAL2014_IDS),
            _annotation_zip(tmp_path, 2014, {"val": VAL2014_IDS})]
    files = {}
    for name, ids in (("minival2014", MINIVAL_IDS), ("valminusminival2014", VAL2014_IDS[1:])):
        files[name] = tmp_path / f"instances_{name}.json"
        files[name].write_text(json.dumps(_instances("val2014", ids)))
    args = [*zips, "--minival", str(files["minival2014"]), str(files["valminusminival2014"]),
            "--root", str(root), "--allow-subset"]
    assert prepare_coco.main(args) == 1
    ann = root / "coco" / "annotations"
    assert _error_line(capsys) == (
        f"prepare_coco.py: error: {ann / 'instances_minival2014.json'} and "
        f"{ann / 'instances_valminusminival2014.json'} share 1 image ids (first 133); "
        f"they must be disjoint")

    # ids outside val2014 are refused too
    files["valminusminival2014"].write_text(json.dumps(_instances("val2014", [74, 99999])))
    assert prepare_coco.main(args) == 1
    assert _error_line(capsys) == (
        f"prepare_coco.py: error: {ann / 'instances_valminusminival2014.json'}: 1 images are not "
        f"in {ann / 'instances_val2014.json'} (first id 99999)")
