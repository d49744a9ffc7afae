"""No secret in logs, metrics, error bodies, /readyz or exception messages, with every logger at DEBUG and every
error path driven: key failover, a bad key file, token endpoint and Entra ID faults, an ML Server session ended
by its administrator, an unreachable upstream, hostile requests (one carrying a caller's credential in an
oversized header), and a caller that breaks off an upload. Logs are captured without the redactor, so a secret
that reached a log call at all is found; values the redactor had to hide count as findings too."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.credentials.base import Credential
from proxy.credentials.tokens import Token
from proxy.emulator.runner import RunningEmulator
from proxy.emulator.secretdir import write_secret_dir
from proxy.logs import JsonFormatter
from tests.support.logscan import JWT_RE, REDACTED
from tests.support.servers import ProxyFactory
from tests.support.session import new_key, remember
from tests.test_tokens_e2e import emu, ep2_auth, route

__all__ = ["emu"]  # the emulator fixture, shared with the token end-to-end tests


def findings(text: str, values: set[str], where: str) -> list[str]:
    out = [f"{where}: a {len(v)}-character secret" for v in values if len(v) >= 8 and v in text]
    if JWT_RE.search(text):
        out.append(f"{where}: a JWT")
    if REDACTED in text:
        out.append(f"{where}: the redactor had to hide a secret")
    return out


@pytest.fixture
def debug_logs() -> Any:
    """Every proxy and aiohttp logger at DEBUG into a buffer, formatted as in production but without redaction."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter(redact=False))
    handler.setLevel(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("aml_auth_proxy", "aiohttp", "azure", "asyncio")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield buffer
    for lg, level in zip(loggers, old, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


def test_credential_and_token_reprs_never_show_the_value() -> None:
    value = new_key("repr")
    cred = Credential(header="Authorization", value=f"Bearer {value}", label="primary")
    token = Token(value=value, expires_at=1.0, refresh_at=None, secondary=value + "2")
    for text in (repr(cred), str(cred), repr(token), str(token), f"{cred!r} {token!s}", repr([cred, token])):
        assert value not in text


async def test_no_secret_anywhere_with_everything_at_debug_and_every_error_path(
    emu: RunningEmulator, make_proxy: ProxyFactory, key_dir: Any, tmp_path: Path, debug_logs: io.StringIO
) -> None:
    keys4 = emu.state.services["keys4"]
    stale = new_key("stale-primary")
    (tmp_path / "user").write_text("admin\n")
    (tmp_path / "password").write_text(emu.password + "\n")  # type: ignore[attr-defined]
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad_key = new_key("ctl") + "\r\nX-Injected: 1"
    remember(bad_key)
    (bad_dir / "primary").write_text(bad_key)
    down_dir = tmp_path / "down"
    write_secret_dir(down_dir, {"primary": new_key("down")})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    fast = {"min_interval_seconds": 0.01, "backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.05}
    routes = [
        route(emu, "keys", emu.service_urls["keys4"], key_dir(stale, keys4.secondary_key),
              match="/keys", strip_prefix=True),
        {"name": "badkey", "match": "/badkey", "strip_prefix": True, "upstream": emu.service_urls["keys4"],
         "auth": {"type": "key", "primary_file": str(bad_dir / "primary")}},
        route(emu, "ep2", emu.service_urls["ep2"], ep2_auth(emu, tmp_path, refresh=fast),
              match="/ep2", strip_prefix=True),
        route(emu, "mls", emu.mlserver_url or "", {
            "type": "mlserver", "username_file": str(tmp_path / "user"), "password_file": str(tmp_path / "password"),
            "ca_file": emu.ca_file, "refresh": fast}, match="/mls", strip_prefix=True),
        {"name": "down", "match": "/down", "upstream": f"http://127.0.0.1:{closed_port}",
         "auth": {"type": "key", "primary_file": str(down_dir / "primary")}},
    ]  # fmt: skip
    svc = await make_proxy(*routes, log_level="debug")
    base, admin = f"http://127.0.0.1:{svc.proxy_port}", f"http://127.0.0.1:{svc.admin_port}"
    caller_secret = "caller-" + secrets.token_urlsafe(24)
    remember(caller_secret)
    texts: dict[str, str] = {}

    async with aiohttp.ClientSession() as client:

        async def call(method: str, url: str, **kw: Any) -> int:
            async with client.request(method, url, **kw) as resp:
                texts[f"{method} {url} -> {resp.status}"] = (await resp.read()).decode(errors="replace")
                return resp.status

        assert (
            await call("POST", base + "/keys/score", json={"data": [1, 2, 3]}) == 200
        )  # 401 with the stale key, failover
        assert await call("POST", base + "/badkey/score", json={"data": [1, 2, 3]}) == 503
        assert await call("POST", base + "/ep2/score", json={"data": [1, 2, 3]}) == 200
        # A control plane 401 makes the proxy go back to Entra ID, where the Entra faults wait.
        unauthorized = {"target": "token", "action": "status", "status": 401, "count": 1}
        for faults in ([{"target": "token", "action": "status", "status": 500}],
                       [{"target": "token", "action": "invalid_json"}],
                       [{"target": "token", "action": "missing_fields"}],
                       [unauthorized, {"target": "entra", "action": "status", "status": 400}],
                       [unauthorized, {"target": "entra", "action": "invalid_json"}]):  # fmt: skip
            for fault in faults:
                emu.state.add_fault(**fault)
            await call("POST", admin + "/refresh?route=ep2")
            emu.state.clear_faults()
            await asyncio.sleep(0.06)
        assert await call("POST", base + "/mls/score", json={"data": [1, 2, 3]}) == 200
        emu.state.mlserver_revoke_all()
        assert (
            await call("POST", base + "/mls/score", json={"data": [1, 2, 3]}) == 200
        )  # refused refresh -> login again
        assert await call("GET", base + "/down/score") == 502
        assert await call("GET", base + "/nowhere") == 404
        await call("GET", base + "/keys/../admin")
        texts["readyz"] = await (await client.get(admin + "/readyz")).text()
        texts["metrics"] = await (await client.get(admin + "/metrics")).text()

    for raw in (
        b"GET /keys/score HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer " + caller_secret.encode() + b"x" * 40000
        + b"\r\n\r\n",
        b"POST /keys/score HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"CONNECT evil:443 HTTP/1.1\r\nHost: evil\r\nProxy-Authorization: Basic " + caller_secret.encode()
        + b"\r\n\r\n",
        b"POST /keys/score HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"{" * 1000,  # broken off
    ):  # fmt: skip
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.proxy_port)
        writer.write(raw)
        await writer.drain()
        if raw.endswith(b"{" * 1000):
            writer.close()
            continue
        async with asyncio.timeout(5):
            texts[f"raw {raw[:20]!r}"] = (await reader.read(65536)).decode(errors="replace")
        writer.close()
    await asyncio.sleep(0.2)
    await svc.stop()

    values = {stale, keys4.primary_key, keys4.secondary_key, bad_key, caller_secret}
    values |= {emu.secret, emu.password}  # type: ignore[attr-defined]
    problems: list[str] = []
    for where, text in texts.items():
        problems += findings(text, values, where)
    log = debug_logs.getvalue()
    for number, line in enumerate(log.splitlines(), 1):
        problems += findings(line, values, f"log line {number}")
        json.loads(line)  # every line is one JSON document
    assert not problems, problems
    records = [json.loads(line) for line in log.splitlines()]
    reasons = {r.get("reason") for r in records if r.get("event") == "token_refresh_failed"}
    assert {"Entra ID: HTTP 400 (invalid_request)", "Entra ID sent a malformed answer"} < reasons
    assert len(reasons) >= 5  # the token endpoint's faults too
    events = {r.get("event") for r in records}
    assert {"key_failover", "key_file_error", "upstream_failed", "bad_request", "client_disconnected"} < events
    levels = {r["level"] for r in records}
    assert "debug" in levels and "error" in levels and "warning" in levels  # every level was exercised
    assert len(log.splitlines()) > 50
