"""The process's logging as `aml-auth-proxy run` sets it up (proxy/logs.py `setup`), into a buffer, and put back
afterwards: conftest's own capture (every logger at DEBUG, unredacted, to a file the session scans) returns."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from proxy.logs import LOGGER_NAME, setup

LIBRARIES = ("azure", "msal", "urllib3")


@contextmanager
def logging_as_run(level: str = "info") -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    ours = logging.getLogger(LOGGER_NAME)
    ours_level = ours.level
    libraries = {name: logging.getLogger(name).level for name in LIBRARIES}
    ours.setLevel(logging.NOTSET)  # conftest keeps the proxy's loggers at DEBUG for its capture; `run` does not
    buffer = io.StringIO()
    setup(level, stream=buffer)
    try:
        yield buffer
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(root_level)
        ours.setLevel(ours_level)
        for name, lib_level in libraries.items():
            logging.getLogger(name).setLevel(lib_level)


class ErrorRecords(logging.Handler):
    """Collects the ERROR records logged while it is attached (a fuzzer's rig fails a case that logged one)."""

    def __init__(self, sink: list[logging.LogRecord]) -> None:
        super().__init__(level=logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


class Captured(logging.Handler):
    """Every record at DEBUG and above, while it is attached (`captured`)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, name: str) -> list[logging.LogRecord]:
        """The records of the event `name`."""
        return [r for r in self.records if getattr(r, "event", None) == name]


@contextmanager
def captured(logger_name: str) -> Iterator[Captured]:
    """The records of the logger `logger_name` and those below it, while the block runs."""
    handler = Captured()
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
