"""Which of the proxy's modules run compiled (mypyc, `make compiled`), and a guard against stale builds.

A compiled module shadows its .py file, so a test run after editing a source without rebuilding would test the
old code. The guard (called from tests/__init__.py) stops the session before anything imports the package.
bench/run.py imports tests.support.emulated, and so runs this guard too: pytest is imported only when there is
something stale to stop for (the bench would measure the old code as well).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"


def compiled_modules() -> dict[str, Path]:
    """Module name -> its compiled extension, for each module of the package built in place."""
    found: dict[str, Path] = {}
    for ext in PACKAGE.glob("*.cpython-*.so"):
        name = ext.name.split(".", 1)[0]
        if (PACKAGE / f"{name}.py").exists():
            found[name] = ext
    return found


def stale_modules() -> list[str]:
    """Compiled modules whose source changed after they were built."""
    return sorted(
        name
        for name, ext in compiled_modules().items()
        if (PACKAGE / f"{name}.py").stat().st_mtime > ext.stat().st_mtime
    )


def check_not_stale() -> None:
    stale = stale_modules()
    if stale:
        import pytest

        pytest.exit(
            f"proxy/{', '.join(stale)}: the compiled module is older than its source; run `make compiled` "
            "(or delete proxy/*.so to test pure Python)",
            returncode=4,
        )


def describe() -> str:
    names = sorted(compiled_modules())
    if not names:
        return "aml-auth-proxy: pure Python (no compiled modules in proxy/)"
    return f"aml-auth-proxy: compiled with mypyc: {', '.join(names)}"
