"""Build step for the request path: its modules are compiled to C extensions with mypyc.

mypyc (part of mypy) compiles the same type-annotated source; at run time the compiled modules replace the .py
files of the same names. On this project's bench that cut the proxy's CPU per request by about 15%
(docs/performance.md, "Compiled with mypyc").

AML_AUTH_PROXY_COMPILE chooses:
- "auto" (default): compile when a C compiler and Python's headers are present, else build pure Python;
- "1": compile, and fail the build when that is not possible;
- "0": pure Python (the same behaviour, slower).
Metadata and everything else are in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

# The modules every proxied request runs through. The rest (configuration, credentials, the control plane
# clients, the admin port) runs rarely and stays interpreted.
COMPILED = [
    "proxy/headers.py",
    "proxy/logs.py",
    "proxy/server.py",
    "proxy/upstream.py",
    "proxy/forwarding.py",
    "proxy/metrics.py",
]


def _can_compile() -> str | None:
    """None when compiling is possible, else why not."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        return f"no Python headers ({headers})"
    return None


def ext_modules() -> list[object]:
    mode = os.environ.get("AML_AUTH_PROXY_COMPILE", "auto")
    if mode not in ("auto", "0", "1"):
        sys.exit(f"AML_AUTH_PROXY_COMPILE must be auto, 0 or 1, not {mode!r}")
    if mode == "0":
        return []
    missing = _can_compile()
    if missing is not None:
        if mode == "1":
            sys.exit(f"AML_AUTH_PROXY_COMPILE=1 but {missing}")
        print(f"aml-auth-proxy: building pure Python: {missing}", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    # The shared runtime library goes inside the package (proxy/_compiled__mypyc.*.so), not at the top level.
    return list(mypycify(COMPILED, opt_level="3", group_name="proxy._compiled"))


setup(ext_modules=ext_modules())
