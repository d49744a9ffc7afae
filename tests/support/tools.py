"""Where the real tools live: .tools/bin (installed by scripts/install-tools.sh via `make test`), then PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
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


def proxy_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m proxy ARGS` from the checkout, with this environment minus the AML_AUTH_PROXY_* and POD_*
    variables a test session may carry (they would override a config file), plus `env`."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AML_AUTH_PROXY_", "POD_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
