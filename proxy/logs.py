"""Structured JSON logging with a last-line-of-defence redactor.

Code never passes a secret to a logger on purpose. The redactor is the net under that rule: every credential
value the proxy loads is registered here, and any formatted line that still contains one has it replaced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any, Final, TextIO

LOGGER_NAME: Final = "aml_auth_proxy"
REDACTED: Final = "[REDACTED]"
_MIN_SECRET_LEN: Final = 8  # shorter values would redact ordinary words


GENERATIONS: Final = 8  # renewed secrets of one owner kept for redaction: the current one and the 7 before it


class Redactor:
    """Holds the secret values currently known to the process.

    Fixed secrets (keys, client secrets, passwords) stay for the process's life. Renewed ones (tokens) are added
    with an `owner` (a route's refresher, an identity) and only that owner's last GENERATIONS additions are kept:
    a token renewed every few seconds would otherwise make the set, and the cost of scrubbing every log line,
    grow for as long as the process runs.
    """

    def __init__(self) -> None:
        self._fixed: set[str] = set()
        self._renewed: dict[str, deque[tuple[str, ...]]] = {}
        self._secrets: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def add(self, *values: str, owner: str | None = None) -> None:
        kept = tuple(v for v in values if len(v) >= _MIN_SECRET_LEN)
        with self._lock:
            if owner is None:
                self._fixed.update(kept)
            else:
                self._renewed.setdefault(owner, deque(maxlen=GENERATIONS)).append(kept)
            renewed = {v for generations in self._renewed.values() for added in generations for v in added}
            self._secrets = frozenset(self._fixed | renewed)

    def __len__(self) -> int:
        return len(self._secrets)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


REDACTOR: Final = Redactor()
_json_str: Final = encode_basestring_ascii  # the C escaper json.dumps uses (Final: compiled, no lookup per call)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, event/message, and any `extra` fields given as `fields`.

    `redact=False` exists for the test suite's own log capture, which must see what the code really logged.
    """

    def __init__(self, *, redact: bool = True) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        event = getattr(record, "event", None)
        if event is not None:
            doc["event"] = event
        try:
            msg = record.getMessage()
        except Exception:  # a library's arguments that do not fit its message: still one line, not a traceback
            msg = f"{record.msg} (the library's arguments did not fit its message)"
        if msg and msg != event:
            doc["message"] = msg  # newlines in it are escaped: a multi-line message is still one line
        fields = getattr(record, "fields", None)
        if fields:
            doc.update(fields)
        # Libraries pass exc_info=False as well as None (azure-identity does): anything but a tuple is no exception.
        # Read untyped: compiled, a typed read checks the value against typeshed's type and raises on False.
        exc_info: Any = getattr(record, "exc_info", None)
        if isinstance(exc_info, tuple) and exc_info[0] is not None:
            doc["error_type"] = exc_info[0].__name__
            doc["traceback"] = self.formatException(exc_info)
        line = json.dumps(doc, default=str, separators=(",", ":"))
        return REDACTOR.scrub(line) if self.redact else line


LIBRARY_LOGGERS: Final = ("azure", "msal", "urllib3")  # azure-identity, azure-core, msal and requests' pool
REPEAT_WINDOW_SECONDS: Final = 60.0
_REPEAT_KEYS: Final = 256  # distinct library messages remembered before starting over


class LibraryRepeats(logging.Filter):
    """Writes a library's record again only a minute after the last one written with the same logger, level and
    message template, and then says how many were left out (`repeats_not_logged`).

    azure-identity logs a WARNING for every failed token call, its message carrying the Entra ID error with a new
    trace id each time: one line per retry while Entra ID is down. The proxy's own lines (`aml_auth_proxy.*`) are
    never held back: they are written once per change of state already.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}  # key -> (written at, left out since)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(LOGGER_NAME):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < REPEAT_WINDOW_SECONDS:
                self._last[key] = (last[0], last[1] + 1)
                return False
            if last is None and len(self._last) >= _REPEAT_KEYS:
                self._last.clear()  # many distinct messages: start over rather than grow
            self._last[key] = (now, 0)
        if last is not None and last[1]:
            fields = getattr(record, "fields", None) or {}
            record.__dict__["fields"] = {**fields, "repeats_not_logged": last[1]}  # what `extra=` would have set
        return True


class AccessLog:
    """The access log: one JSON line per request in the same shape as JsonFormatter's, formatted from a fixed
    template (no LogRecord, no handler lock, no generic JSON encoder) and written in batches: at most
    `interval` seconds after a line is made, or at once when `max_lines` wait, and at shutdown (flush()).

    At thousands of requests a second the stdlib path (a LogRecord, a lock, a format and a flushed write per
    line) cost about a third of the proxy's CPU, and json.dumps of the line about a tenth. At a steady 1,000
    requests a second a write per loop turn was still a write per request; batching by time makes it about ten
    a second. A process killed outright loses at most the last `interval` of lines.
    """

    def __init__(self, stream: TextIO | None = None, *, interval: float = 0.1, max_lines: int = 1024) -> None:
        self._stream = stream  # None: sys.stdout as it is at write time
        self._interval = interval
        self._max_lines = max_lines
        self._lines: list[str] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def request(
        self,
        *,
        route: str,
        method: str,
        path: str,
        status: int,
        seconds: float,
        request_id: str,
        bytes_in: int | None,
        bytes_out: int,
        upstream_seconds: float,
        ttfb_seconds: float = -1.0,
    ) -> None:
        """One request's line; strings are JSON-escaped (a caller chooses the path and the request id).
        `ttfb_seconds`: from the request's start to its answer's head written to the caller (negative: no answer
        was written, logged as null)."""
        # Times with a fixed 3 decimals: one float formatting each, where round() then repr() took three. They are
        # formatted apart from the line: compiled, an f-string with a format spec becomes a str.format() call that
        # parses the whole template on every line; without one it is a single concatenation.
        ts = format(time.time(), ".3f")
        duration_ms = format(seconds * 1000, ".3f")
        upstream_ms = format(upstream_seconds * 1000, ".3f")
        ttfb_ms = "null" if ttfb_seconds < 0 else format(ttfb_seconds * 1000, ".3f")
        line = (
            f'{{"ts":{ts},"level":"info","logger":"aml_auth_proxy.access","event":"access",'
            f'"route":{_json_str(route)},"method":{_json_str(method)},"path":{_json_str(path)},"status":{status},'
            f'"duration_ms":{duration_ms},"ttfb_ms":{ttfb_ms},"request_id":{_json_str(request_id)},'
            f'"bytes_in":{"null" if bytes_in is None else bytes_in},"bytes_out":{bytes_out},'
            f'"upstream_ms":{upstream_ms}}}'
        )
        lines = self._lines
        lines.append(REDACTOR.scrub(line))
        if len(lines) >= self._max_lines:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            loop = self._loop
            if loop is None or loop.is_closed():
                # Looked up once: get_running_loop() costs a getpid() system call on every call (Python 3.11).
                loop = self._loop = asyncio.get_running_loop()
            loop.call_later(self._interval, self._due)

    def _due(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write the lines made so far."""
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        stream = self._stream or sys.stdout
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stdout must not fail requests
            pass


def setup(level: str = "info", *, stream: TextIO | None = None) -> None:
    """Every logger's records as JSON lines on stdout: ours at `level`, the libraries' at WARNING and above."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(LibraryRepeats())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # No caller lookup, thread or process names per record: our lines do not show them.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # aiohttp's own access logger is off; ours writes one line per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # azure-identity writes an INFO line for every token call and azure-core a multi-line INFO trace of every HTTP
    # exchange (DEBUG: more); the proxy logs what matters of those calls itself (token_refreshed, token_refresh_failed).
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log a structured lifecycle event."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"event": name, "fields": fields})
