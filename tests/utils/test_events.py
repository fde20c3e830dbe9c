"""EventStorage and the JSON writer."""
import json

import pytest
import torch

from detector.utils.events import EventStorage, JSONWriter, get_event_storage


def test_storage_history_and_smoothing():
    with EventStorage(start_iter=10) as storage:
        assert get_event_storage() is storage
        for i, value in enumerate([5.0, 1.0, 3.0, 100.0]):
            storage.iter = 10 + i
            storage.put_scalar("loss", value)
            storage.put_scalars(lr=torch.tensor(0.5 * i), smoothing_hint=False)
        hist = storage.history("loss")
        assert hist.latest() == 100.0
        assert hist.median(3) == 3.0 and hist.avg(2) == pytest.approx(51.5)
        assert hist.global_avg() == pytest.approx(27.25)
        assert storage.latest()["loss"] == (100.0, 13)
        smoothed = storage.latest_with_smoothing_hint(window_size=3)
        assert smoothed["loss"] == (3.0, 13)  # median of the window
        assert smoothed["lr"] == (1.5, 13)  # no smoothing: the raw latest value
        with storage.name_scope("val"):
            storage.put_scalar("AP", 40.0, smoothing_hint=False)
        assert "val/AP" in storage.histories()
        with pytest.raises(ValueError, match="smoothing hints"):
            storage.put_scalar("loss", 1.0, smoothing_hint=False)
        with pytest.raises(KeyError, match="no_such"):
            storage.history("no_such")


def test_nested_storages_and_outside_use():
    with EventStorage() as outer:
        with EventStorage() as inner:
            assert get_event_storage() is inner
        assert get_event_storage() is outer
    with pytest.raises(RuntimeError, match="outside"):
        get_event_storage()


def test_json_writer_writes_each_iteration_once(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    writer = JSONWriter(str(path), window_size=2)
    with EventStorage() as storage:
        for it in range(4):
            storage.iter = it
            storage.put_scalars(loss=float(it))
            if it in (1, 3):
                writer.write()
        writer.write()  # nothing new: no line
    writer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    # scalars are only kept per name as the latest value, so iterations 1 and 3 are written
    assert lines == [{"iteration": 1, "loss": 0.5}, {"iteration": 3, "loss": 2.5}]


def test_json_writer_repairs_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"iteration": 0, "loss": 1.0}\n{"iteration": 1, "lo')
    writer = JSONWriter(str(path))
    with EventStorage(start_iter=1) as storage:
        storage.put_scalar("loss", 2.0)
        writer.write()
    writer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"iteration": 0, "loss": 1.0}, {"iteration": 1, "loss": 2.0}]
