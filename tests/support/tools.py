"""Where the real tools live: .tools/bin (installed by scripts/install-tools.sh via `make test`), then PATH."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    """The path of a real tool; fails loudly (never skips) when `make tools` has not installed it."""
    local = ROOT / ".tools" / "bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed: run `make tools` (scripts/install-tools.sh)")
    return found
