"""setup_logger: terminal on rank 0 only, per-rank files, short names, colour only when wanted."""
import logging

import pytest

from detector.utils.logger import log_every_n_seconds, log_first_n, setup_logger
from log_capture import CollectLogs


@pytest.fixture
def fresh_logger(request):
    """A logger name unique to the test, cleaned up afterwards."""
    name = "detector_test_" + request.node.name.replace("[", "_").replace("]", "_")
    yield name
    log = logging.getLogger(name)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.propagate = True


def test_console_and_file(tmp_path, capsys, fresh_logger, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    log = setup_logger(str(tmp_path), name=fresh_logger, abbrev_name="t")
    logging.getLogger(fresh_logger + ".engine.hooks").info("hello %d", 3)
    logging.getLogger(fresh_logger + ".engine.hooks").debug("debug detail")
    out = capsys.readouterr().out
    assert "t.engine.hooks" in out and "hello 3" in out
    assert "debug detail" not in out
    assert "\x1b[" not in out, "no colour codes when stdout is not a terminal"
    text = (tmp_path / "log.txt").read_text()
    assert "t.engine.hooks INFO: hello 3" in text and "debug detail" in text

    # a second call replaces the handlers instead of duplicating every line
    setup_logger(str(tmp_path), name=fresh_logger)
    log.info("once")
    assert capsys.readouterr().out.count("once") == 1
    assert len(log.handlers) == 2


def test_other_ranks_log_to_their_own_file_only(tmp_path, capsys, fresh_logger):
    log = setup_logger(str(tmp_path / "run.log"), distributed_rank=2, name=fresh_logger)
    log.warning("from rank two")
    assert capsys.readouterr().out == ""
    assert "from rank two" in (tmp_path / "run.log.rank2").read_text()
    assert not (tmp_path / "run.log").exists()


def test_forced_colour_uses_coloured_message(tmp_path, capsys, fresh_logger, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    log = setup_logger(str(tmp_path), name=fresh_logger)
    log.warning("careful")
    log.info("plain text", extra={"colored_message": "\x1b[33mcoloured text\x1b[0m"})
    out = capsys.readouterr().out
    assert "\x1b[" in out and "WARNING" in out and "coloured text" in out
    assert "plain text" not in out
    text = (tmp_path / "log.txt").read_text()
    assert "plain text" in text and "\x1b[" not in text


def test_log_first_n_and_every_n_seconds():
    with CollectLogs("detector.tests") as logs:
        for _ in range(5):
            log_first_n(logging.INFO, "first-n message", n=2, name="detector.tests")
            log_every_n_seconds(logging.INFO, "rate-limited", n=3600, name="detector.tests")
    assert logs.text.count("first-n message") == 2
    assert logs.text.count("rate-limited") == 1
