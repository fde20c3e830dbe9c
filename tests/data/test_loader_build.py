import itertools
import logging
import os

import pytest
import torch

from detector.data import (
    ImageLoadError,
    ImageSizeMismatchError,
    build_detection_test_loader,
    build_detection_train_loader,
    load_coco_json,
)
from detector.data.build import per_process_batch_size
from detector.data.common import DataLoader, MapDataset

from data_helpers import ann, write_coco, write_image


def _dataset(tmp_path, n_landscape=4, n_portrait=4, n_empty=0):
    """Landscape then portrait images with one box each, then ``n_empty`` without any."""
    images, anns = [], []
    for i in range(n_landscape + n_portrait + n_empty):
        h, w = (48, 64) if i < n_landscape else (64, 48)
        images.append({"id": i + 1, "file_name": f"{i + 1}.jpg", "height": h, "width": w})
        if i < n_landscape + n_portrait:
            anns.append(ann(i + 1, i + 1, [4, 4, 20, 20], category_id=[3, 7, 12][i % 3]))
    return write_coco(tmp_path, images, anns)


def _register(temp_catalog, name, json_file, root):
    return temp_catalog(name, lambda: load_coco_json(json_file, root))


@pytest.mark.parametrize("grouping", [True, False])
def test_train_loader_yields_per_process_batches(tmp_path, temp_catalog, tiny_cfg, grouping):
    # images 9 and 10 have no annotation: FILTER_EMPTY_ANNOTATIONS (default on) leaves them out
    name = _register(temp_catalog, "_test_build_train", *_dataset(tmp_path, n_empty=2))
    tiny_cfg.DATASETS.TRAIN = (name,)
    tiny_cfg.SOLVER.IMS_PER_BATCH = 3
    tiny_cfg.DATALOADER.ASPECT_RATIO_GROUPING = grouping
    loader = build_detection_train_loader(tiny_cfg)
    batches = list(itertools.islice(iter(loader), 10))  # more than one pass: the loader is endless
    ids = []
    for batch in batches:
        assert isinstance(batch, list) and len(batch) == 3
        landscape = {d["image"].shape[-1] > d["image"].shape[-2] for d in batch}
        if grouping:
            assert len(landscape) == 1
        for d in batch:
            assert d["image"].dtype == torch.uint8 and min(d["image"].shape[-2:]) == 64
            assert len(d["instances"]) == 1
            ids.append(d["image_id"])
    assert set(ids) == set(range(1, 9))


def test_train_loader_is_reproducible_with_seed(tmp_path, temp_catalog, tiny_cfg):
    name = _register(temp_catalog, "_test_build_seed", *_dataset(tmp_path))
    tiny_cfg.DATASETS.TRAIN = (name,)

    def run():
        loader = build_detection_train_loader(tiny_cfg)
        return [(d["image_id"], d["instances"].gt_boxes.tensor.tolist())
                for b in itertools.islice(iter(loader), 6) for d in b]

    assert run() == run()


def test_train_loader_with_workers(tmp_path, temp_catalog, tiny_cfg):
    name = _register(temp_catalog, "_test_build_workers", *_dataset(tmp_path))
    tiny_cfg.DATASETS.TRAIN = (name,)
    tiny_cfg.DATALOADER.NUM_WORKERS = 2
    tiny_cfg.SOLVER.IMS_PER_BATCH = 2
    batches = list(itertools.islice(iter(build_detection_train_loader(tiny_cfg)), 8))
    ids = [d["image_id"] for b in batches for d in b]
    assert len(ids) == 16 and set(ids) == set(range(1, 9))


def test_failed_images_are_skipped_and_counted(tmp_path, temp_catalog, tiny_cfg, caplog):
    json_file, root = _dataset(tmp_path)
    os.remove(os.path.join(root, "2.jpg"))
    with open(os.path.join(root, "5.jpg"), "wb") as f:
        f.write(b"garbage bytes, not an image")
    name = _register(temp_catalog, "_test_build_skip", json_file, root)
    tiny_cfg.DATASETS.TRAIN = (name,)
    tiny_cfg.DATALOADER.ASPECT_RATIO_GROUPING = False
    loader = build_detection_train_loader(tiny_cfg)
    with caplog.at_level(logging.WARNING, logger="detector.data"):
        batches = list(itertools.islice(iter(loader), 12))
    ids = [d["image_id"] for b in batches for d in b]
    assert len(ids) == 24 and set(ids) == {1, 3, 4, 6, 7, 8}
    skips = [r.getMessage() for r in caplog.records if "Skipping training image" in r.getMessage()]
    assert skips and any("2.jpg" in m for m in skips) and any("5.jpg" in m for m in skips)
    assert loader.num_skipped == len(skips)


def test_a_replaced_image_is_replaced_alike_with_workers(tmp_path, temp_catalog, tiny_cfg):
    """The replacement is drawn from the sample's position: the same batches with 0 and 2
    workers, in the same order."""
    json_file, root = _dataset(tmp_path)
    os.remove(os.path.join(root, "3.jpg"))
    name = _register(temp_catalog, "_test_build_replace_workers", json_file, root)
    tiny_cfg.DATASETS.TRAIN = (name,)
    tiny_cfg.SOLVER.IMS_PER_BATCH = 2

    def run(workers):
        tiny_cfg.DATALOADER.NUM_WORKERS = workers
        loader = build_detection_train_loader(tiny_cfg)
        batches = list(itertools.islice(iter(loader), 10))
        return ([(d["image_id"], d["instances"].gt_boxes.tensor.tolist())
                 for b in batches for d in b], loader.num_skipped)

    (in_process, skipped), (with_workers, skipped_workers) = run(0), run(2)
    assert in_process == with_workers and skipped == skipped_workers > 0
    assert 3 not in {i for i, _ in in_process}


def test_too_many_failures_in_a_row_raise(tmp_path, temp_catalog, tiny_cfg):
    json_file, root = _dataset(tmp_path)
    for f in os.listdir(root):
        os.remove(os.path.join(root, f))
    name = _register(temp_catalog, "_test_build_allbad", json_file, root)
    tiny_cfg.DATASETS.TRAIN = (name,)
    with pytest.raises(RuntimeError, match="20 training images in a row failed to load "
                                           r"\(sample 0; last: "):
        next(iter(build_detection_train_loader(tiny_cfg)))


def test_test_loader_in_order_with_empty_images(tmp_path, temp_catalog, tiny_cfg):
    json_file, root = _dataset(tmp_path, n_empty=2)
    name = _register(temp_catalog, "_test_build_test", json_file, root)
    loader = build_detection_test_loader(tiny_cfg, name)
    batches = list(loader)
    assert [b[0]["image_id"] for b in batches] == list(range(1, 11))
    assert all(len(b) == 1 and "instances" not in b[0] for b in batches)
    assert (batches[0][0]["height"], batches[0][0]["width"]) == (48, 64)
    assert tuple(batches[0][0]["image"].shape) == (3, 64, 85)


def test_test_loader_propagates_load_errors(tmp_path, temp_catalog, tiny_cfg):
    json_file, root = _dataset(tmp_path)
    os.remove(os.path.join(root, "3.jpg"))
    name = _register(temp_catalog, "_test_build_test_missing", json_file, root)
    with pytest.raises(ImageLoadError, match="3.jpg"):
        list(build_detection_test_loader(tiny_cfg, name))


def test_batch_size_must_divide_across_processes():
    assert per_process_batch_size(16, 4) == 4
    assert per_process_batch_size(3) == 3  # the current (single-process) group
    with pytest.raises(ValueError, match="SOLVER.IMS_PER_BATCH=10 is not divisible by the world "
                                         "size 4"):
        per_process_batch_size(10, 4)
    for bad in (0, -4):
        with pytest.raises(ValueError, match=rf"^SOLVER.IMS_PER_BATCH must be positive, "
                                             rf"got {bad}$"):
            per_process_batch_size(bad, 1)


def _size_mismatch_dataset(tmp_path, temp_catalog, name):
    json_file, root = _dataset(tmp_path)
    write_image(os.path.join(root, "3.jpg"), 30, 30)  # the annotations say 64x48
    return _register(temp_catalog, name, json_file, root), os.path.join(root, "3.jpg")


@pytest.mark.parametrize("train", [False, True])
def test_worker_error_keeps_its_one_line_message(tmp_path, temp_catalog, tiny_cfg, train):
    """torch re-raises a worker's exception as "Caught X in DataLoader worker process 0." plus
    the worker's traceback; the loaders give back the original line naming file and image id."""
    name, bad_file = _size_mismatch_dataset(tmp_path, temp_catalog, f"_test_build_worker_{train}")
    tiny_cfg.DATALOADER.NUM_WORKERS = 1
    tiny_cfg.DATALOADER.ASPECT_RATIO_GROUPING = False
    tiny_cfg.DATASETS.TRAIN = (name,)
    with pytest.raises(ImageSizeMismatchError) as info:
        if train:
            list(itertools.islice(iter(build_detection_train_loader(tiny_cfg)), 20))
        else:
            list(build_detection_test_loader(tiny_cfg, name))
    message = str(info.value)
    assert message.startswith(f"{bad_file} (image_id 3): decoded image is 30x30"), message
    assert "\n" not in message and "Caught" not in message
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "in DataLoader worker process 0" in notes and "_check_size" in notes


class _TwoArgumentError(Exception):
    def __init__(self, what, where):
        super().__init__(f"{what} at {where}")


def _raise_two_argument_error(item):
    raise _TwoArgumentError("bad item", item)


def test_worker_error_of_a_type_torch_cannot_rebuild():
    loader = DataLoader(MapDataset(list(range(4)), _raise_two_argument_error), batch_size=None,
                        num_workers=1)
    with pytest.raises(RuntimeError) as info:
        next(iter(loader))
    assert str(info.value) == "_TwoArgumentError: bad item at 0"
    assert len(iter(loader)) == 4


def test_different_classes_cannot_be_concatenated(tmp_path, temp_catalog, tiny_cfg):
    json_file, root = _dataset(tmp_path)
    a = temp_catalog("_test_build_cls_a", lambda: load_coco_json(json_file, root),
                     thing_classes=["a", "b"])
    b = temp_catalog("_test_build_cls_b", lambda: load_coco_json(json_file, root),
                     thing_classes=["a", "c"])
    tiny_cfg.DATASETS.TRAIN = (a, b)
    with pytest.raises(ValueError, match="different thing_classes"):
        build_detection_train_loader(tiny_cfg)


def test_loader_workers_ignore_sigint():
    import signal

    from detector.data.build import _seed_worker

    previous = signal.getsignal(signal.SIGINT)
    try:
        _seed_worker(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
