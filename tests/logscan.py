"""Scan log files for secret values (and for the redactor's marker, which means code tried to log one)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from proxy.logs import REDACTED


def scan_logs(log_dir: Path, secrets: Iterable[str]) -> list[str]:
    """Findings as 'file:line: what'; empty when clean. A secret is never printed, only its length."""
    wanted = [s for s in set(secrets) if len(s) >= 8]
    findings: list[str] = []
    for path in sorted(log_dir.glob("*.log")):
        with path.open(encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if REDACTED in line:
                    findings.append(f"{path.name}:{number}: the redactor had to hide a secret")
                for secret in wanted:
                    if secret in line:
                        findings.append(f"{path.name}:{number}: a {len(secret)}-character secret")
    return findings
