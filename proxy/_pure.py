"""`AML_AUTH_PROXY_PURE_PYTHON=1`: import the sources of the compiled modules instead of their C extensions.

An installed wheel holds both `proxy/server.py` and the extension mypyc built from it, and Python imports the
extension first. This switch is the way back to the interpreted code without reinstalling: for a traceback
with line numbers of every frame, a debugger or a profiler that reads Python frames, or to rule the compiler out
when chasing a bug. It costs about 15-25% more CPU per request (docs/performance.md). Worker processes inherit
it through the environment.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

_PACKAGE = Path(__file__).resolve().parent


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Finds `proxy.<module>` in its .py file when one is there; anything else is left to the usual finders."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.partition(".")
        if package != "proxy" or not name or "." in name:
            return None
        source = _PACKAGE / f"{name}.py"
        if not source.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def prefer_sources() -> None:
    if not any(isinstance(finder, _SourcesFirst) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourcesFirst())
