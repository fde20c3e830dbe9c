"""Logging set-up: a coloured terminal handler on rank 0, a log file per rank, short names.

``setup_logger(output_dir)`` configures the "detector" logger; modules log through
``logging.getLogger(__name__)`` and so reach it.
"""
import logging
import os
import sys
import time
from collections import Counter
from typing import Optional

from termcolor import colored

__all__ = ["setup_logger", "log_first_n", "log_every_n_seconds", "colorize"]

_DATE_FORMAT = "%m/%d %H:%M:%S"
_HANDLER_MARK = "_detector_handler"


def colorize(text: str, color: Optional[str] = None, attrs=None) -> str:
    """``text`` wrapped in ANSI colour codes, whatever the terminal: callers decide whether the
    result is shown (the terminal handler of ``setup_logger`` only colours a real terminal)."""
    try:
        return colored(text, color, attrs=attrs, force_color=True)
    except TypeError:  # termcolor < 2.1 has no force_color and always colours
        return colored(text, color, attrs=attrs)


def _stream_wants_color(stream) -> bool:
    """Colour a tty unless NO_COLOR is set; FORCE_COLOR colours anything."""
    if os.environ.get("FORCE_COLOR"):
        return True
    if os.environ.get("NO_COLOR") or os.environ.get("ANSI_COLORS_DISABLED"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _ShortNameFormatter(logging.Formatter):
    """Replaces the root logger name by a short form: detector.engine.hooks -> det.engine.hooks."""

    def __init__(self, *args, root_name: str, abbrev_name: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._root_name = root_name + "."
        self._abbrev_name = abbrev_name + "." if abbrev_name else ""

    def format(self, record):
        original = record.name
        if record.name.startswith(self._root_name):
            record.name = self._abbrev_name + record.name[len(self._root_name):]
        try:
            return super().format(record)
        finally:
            record.name = original


class _ColorfulFormatter(_ShortNameFormatter):
    """Green timestamp/name, a coloured WARNING/ERROR prefix, and a record's pre-coloured
    ``colored_message`` (set by CommonMetricPrinter) instead of the plain message."""

    def formatMessage(self, record):
        coloured = getattr(record, "colored_message", None)
        if coloured is not None:
            record = logging.makeLogRecord({**record.__dict__, "message": coloured})
        log = super().formatMessage(record)
        if record.levelno == logging.WARNING:
            prefix = colorize("WARNING", "red", attrs=["blink"])
        elif record.levelno >= logging.ERROR:
            prefix = colorize("ERROR", "red", attrs=["blink", "underline"])
        else:
            return log
        return prefix + " " + log


def setup_logger(output: Optional[str] = None, distributed_rank: int = 0, name: str = "detector",
                 color: bool = True, abbrev_name: Optional[str] = None) -> logging.Logger:
    """Configure logger ``name`` and return it.

    Args:
        output: a directory (the log goes to ``output/log.txt``) or a file ending in .txt/.log;
            ranks > 0 write to ``<file>.rank<r>``. None: no file.
        distributed_rank: only rank 0 logs to the terminal (stdout).
        color: colour the terminal output when it is a terminal (or FORCE_COLOR is set).
        abbrev_name: short form of ``name`` in printed logger names ("det" for "detector").

    Calling it again replaces the handlers a previous call installed (no duplicated lines).
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            logger.removeHandler(handler)
            handler.close()
    if abbrev_name is None:
        abbrev_name = "det" if name == "detector" else name
    plain = _ShortNameFormatter(
        "[%(asctime)s] %(name)s %(levelname)s: %(message)s", datefmt=_DATE_FORMAT,
        root_name=name, abbrev_name=abbrev_name,
    )
    if distributed_rank == 0:
        console = logging.StreamHandler(stream=sys.stdout)
        console.setLevel(logging.INFO)
        if color and _stream_wants_color(sys.stdout):
            console.setFormatter(_ColorfulFormatter(
                colorize("[%(asctime)s %(name)s]: ", "green") + "%(message)s",
                datefmt=_DATE_FORMAT, root_name=name, abbrev_name=abbrev_name,
            ))
        else:
            console.setFormatter(plain)
        setattr(console, _HANDLER_MARK, True)
        logger.addHandler(console)
    if output:
        if output.endswith(".txt") or output.endswith(".log"):
            filename = output
        else:
            filename = os.path.join(output, "log.txt")
        if distributed_rank > 0:
            filename = f"{filename}.rank{distributed_rank}"
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        file_handler = logging.FileHandler(filename, mode="a", encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(plain)
        setattr(file_handler, _HANDLER_MARK, True)
        logger.addHandler(file_handler)
    return logger


_LOG_COUNTER: Counter = Counter()
_LOG_TIMER: dict = {}


def _caller_key(depth: int = 2):
    """(file, line) and module name of the code that called the public helper."""
    frame = sys._getframe(depth)
    return (frame.f_code.co_filename, frame.f_lineno), frame.f_globals.get("__name__", "detector")


def log_first_n(lvl: int, msg: str, n: int = 1, *, name: Optional[str] = None,
                key: str = "caller") -> None:
    """Log ``msg`` only the first ``n`` times this call site (``key="caller"``), message
    (``key="message"``) or both (``key=("caller", "message")``) is reached."""
    keys = (key,) if isinstance(key, str) else tuple(key)
    caller, module = _caller_key()
    hash_key = tuple(caller if k == "caller" else msg for k in keys)
    _LOG_COUNTER[hash_key] += 1
    if _LOG_COUNTER[hash_key] <= n:
        logging.getLogger(name or module).log(lvl, msg)


def log_every_n_seconds(lvl: int, msg: str, n: float = 1, *, name: Optional[str] = None) -> None:
    """Log ``msg`` from this call site at most once every ``n`` seconds."""
    caller, module = _caller_key()
    last = _LOG_TIMER.get(caller)
    now = time.time()
    if last is None or now - last >= n:
        logging.getLogger(name or module).log(lvl, msg)
        _LOG_TIMER[caller] = now

