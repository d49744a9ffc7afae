"""Scan log files for secrets: known values, anything shaped like a JWT, and words whose SHA-256 digest matches a
known token digest (the emulator keeps only digests of the ML Server tokens it issues). The redactor's marker
counts too: it means code tried to log a secret."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from proxy.logs import REDACTED

JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+")
WORD_RE = re.compile(r"[A-Za-z0-9_\-.~+/=]{20,}")


def scan_logs(log_dir: Path, secrets: Iterable[str], digests: Iterable[str] = ()) -> list[str]:
    """Findings as 'file:line: what'; empty when clean. A secret is never printed, only its length."""
    wanted = [s for s in set(secrets) if len(s) >= 8]
    known_digests = set(digests)
    findings: list[str] = []
    for path in sorted(log_dir.glob("*.log")):
        with path.open(encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                where = f"{path.name}:{number}"
                if REDACTED in line:
                    findings.append(f"{where}: the redactor had to hide a secret")
                if JWT_RE.search(line):
                    findings.append(f"{where}: a JWT")
                findings.extend(f"{where}: a {len(s)}-character secret" for s in wanted if s in line)
                if known_digests:
                    for word in WORD_RE.findall(line):
                        if hashlib.sha256(word.encode()).hexdigest() in known_digests:
                            findings.append(f"{where}: a token the emulator issued")
    return findings
