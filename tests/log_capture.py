"""Test helper: collect a logger's records directly, whatever its propagation settings."""
import logging


class CollectLogs(logging.Handler):
    """Collects a logger's records directly (independent of propagation to the root logger)."""

    def __init__(self, name, level=logging.INFO):
        super().__init__(logging.DEBUG)
        self.lines, self._log, self._level = [], logging.getLogger(name), level

    def emit(self, record):
        self.lines.append(record.getMessage())

    @property
    def text(self):
        return "\n".join(self.lines)

    def __enter__(self):
        self._old_level = self._log.level
        self._log.setLevel(self._level)
        self._log.addHandler(self)
        return self

    def __exit__(self, *exc):
        self._log.removeHandler(self)
        self._log.setLevel(self._old_level)
