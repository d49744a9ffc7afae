"""Plumbing shared by the scripts that run Microsoft's client SDKs in their own venvs (tests/test_sdk_clients.py).

A script reads one JSON object on stdin and writes one JSON line on stdout, nothing else: whatever an SDK prints
goes to stderr. Steps run in order; the first one that raises ends the run, and the answer then carries
`{"failed": {"step", "type", "message"}}` next to what the earlier steps read, so the pytest side can fail with
the SDK's own words. Runs on the SDK venv's Python only (no imports from this repository).
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any

MAX_MESSAGE = 4000


class Run:
    def __init__(self) -> None:
        self.params: dict[str, Any] = json.loads(sys.stdin.read())
        self.out: dict[str, Any] = {}
        self._stdout = sys.stdout

    def step(self, name: str, work: Callable[[], Any], *, record: bool = True) -> Any:
        """Run one SDK step; record its answer under `name` (unless None or `record` is false) and return it;
        stop the run if it raises."""
        try:
            value = work()
        except BaseException as exc:
            self.out["failed"] = {
                "step": name,
                "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "message": str(exc)[:MAX_MESSAGE],
            }
            traceback.print_exc(file=sys.stderr)
            raise _Stop from exc
        if record and value is not None:
            self.out[name] = value
        return value

    @contextlib.contextmanager
    def answering(self) -> Iterator[Run]:
        """Send SDK output to stderr; on the way out write the one JSON answer line to the real stdout."""
        sys.stdout = sys.stderr
        try:
            yield self
        except _Stop:
            pass
        finally:
            sys.stdout = self._stdout
            self._stdout.write(json.dumps(self.out, default=str) + "\n")
            self._stdout.flush()


class _Stop(Exception):
    """A step failed; its failure is already recorded."""


@contextlib.contextmanager
def sdk_run(distribution: str) -> Iterator[Run]:
    """A Run that answers (`Run.answering`) with the installed version of `distribution` as `sdk_version`."""
    run = Run()
    with run.answering():
        run.out["sdk_version"] = metadata.version(distribution)
        yield run


def expect_failure(work: Callable[[], Any]) -> dict[str, str]:
    """Run `work`, which must raise; returns the exception's type and message (raises if it did not fail)."""
    try:
        value = work()
    except Exception as exc:
        return {"type": type(exc).__qualname__, "message": str(exc)[:MAX_MESSAGE]}
    raise AssertionError(f"expected the SDK call to fail, it returned {value!r}")


def attributes(obj: Any, *names: str) -> dict[str, Any]:
    """The named attributes of an SDK object, by name."""
    return {name: getattr(obj, name) for name in names}
