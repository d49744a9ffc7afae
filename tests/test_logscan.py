"""The log scan itself must find what it looks for, or a clean scan proves nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.support.logscan import scan_logs

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0xyzxyzxy.c2lnbmF0dXJlc2lnbmF0dXJl"


def test_finds_planted_secrets_jwts_digests_and_redactions(tmp_path: Path) -> None:
    opaque = "opaque-refresh-token-0123456789abcdef"
    (tmp_path / "a.log").write_text(
        '{"event":"x","k":"my-secret-key-value"}\n'
        f'{{"event":"y","t":"{JWT}"}}\n'
        f'{{"event":"z","r":"{opaque}"}}\n'
        '{"event":"w","m":"[REDACTED]"}\n'
        '{"event":"clean","route":"r"}\n'
    )
    findings = scan_logs(tmp_path, ["my-secret-key-value"], [hashlib.sha256(opaque.encode()).hexdigest()])
    assert findings == [
        "a.log:1: a 19-character secret",
        "a.log:2: a JWT",
        "a.log:3: a token the emulator issued",
        "a.log:4: the redactor had to hide a secret",
    ]
