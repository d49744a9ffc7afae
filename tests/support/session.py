"""What a whole test session shares: where every log line goes, and every secret and token digest a test made,
which the session's log scan (conftest.py, tests/support/logscan.py) looks for in those lines."""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path

LOG_DIR = Path(tempfile.mkdtemp(prefix="aml-auth-proxy-test-logs-"))
SESSION_SECRETS: set[str] = set()
SESSION_DIGESTS: set[str] = set()  # SHA-256 hex of tokens only the emulator saw


def remember(*values: str) -> None:
    """Register credential values that must never appear in a log."""
    SESSION_SECRETS.update(v for v in values if v)


def new_key(label: str = "key") -> str:
    value = f"{label}-{secrets.token_urlsafe(24)}"
    remember(value)
    return value


def subprocess_log(name: str) -> Path:
    """A file for a subprocess's stdout/stderr that the session scan will read."""
    return LOG_DIR / f"{name}-{secrets.token_hex(4)}.log"
