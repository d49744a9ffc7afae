"""Soak through a token endpoint outage: 3 s tokens (renewed after 2 s), 16 caller connections, and the emulated
control plane's token endpoint answering 503 for 10 s. The emulator and the proxy run in their own processes, as
users run them. No request may reach the upstream with a token it refuses (0 upstream 401s), the outage must look
the same to every caller (a JSON 503 with Retry-After, nothing else), service must be back within 2 s of the token
endpoint answering again, and the log must mark the outage's start and end."""

from __future__ import annotations

import asyncio
import secrets
import signal
import ssl
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import NS
from tests.support.emulated import control_plane_auth, short_token_service
from tests.support.procs import ProxyProcess, start_emulator_process
from tests.support.session import LOG_DIR, remember

CONNECTIONS = 16
BEFORE_SECONDS = 5.0  # steady state before the outage
OUTAGE_SECONDS = 10.0
AFTER_SECONDS = 6.0
MAX_REQUESTS = 400_000  # the loop is bounded in count as well as in time
CLIENT = "44444444-4444-4444-4444-444444444444"


def counter(metrics_text: str, name: str, labels: dict[str, str]) -> float:
    """A counter's value from the exposition text (0 when the series does not exist)."""
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def test_a_10_s_token_endpoint_outage_costs_no_upstream_401_and_service_is_back_within_2_s(
    tmp_path: Path,
) -> None:
    secret = "outage-client-secret-" + secrets.token_urlsafe(16)
    remember(secret)
    emulator_config = {
        "tls": True,
        "entra": {"clients": {CLIENT: secret}},
        "services": [short_token_service("east", "v2", "eastus")],
    }
    emulator, ready = await start_emulator_process(emulator_config, tmp_path)
    samples: list[tuple[float, float, int, str | None, bool]] = []  # t0, t1, status, Retry-After, JSON body
    try:
        (tmp_path / "secret").write_text(secret + "\n")
        route = {
            "name": "east",
            "region": "eastus",
            "tls": {"ca_file": ready["ca_file"]},
            "upstream": ready["service_urls"]["east"],
            "auth": {
                "type": "aml-endpoint-token",
                "endpoint": "east",
                "arm_url": ready["control_url"],
                **control_plane_auth(ready, CLIENT, tmp_path / "secret"),
            },
        }
        config = {"routes": [route], "access_log": False}
        proxy = await ProxyProcess.start(config, tmp_path, name="outage-proxy")
        ssl_ctx = ssl.create_default_context(cafile=ready["ca_file"])
        faults_url = ready["control_url"] + "/_emulator/faults"
        stop_at = time.monotonic() + BEFORE_SECONDS + OUTAGE_SECONDS + AFTER_SECONDS

        async def worker() -> None:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as client:
                while time.monotonic() < stop_at and len(samples) < MAX_REQUESTS:
                    t0 = time.time()
                    async with client.post(proxy.proxy_url + "/score", json={"data": [1, 2]}) as resp:
                        body = await resp.read()
                        is_json = resp.content_type == "application/json" and body.startswith(b"{")
                        samples.append((t0, time.time(), resp.status, resp.headers.get("Retry-After"), is_json))

        async def outage() -> tuple[float, float]:
            async with aiohttp.ClientSession() as admin:
                await asyncio.sleep(BEFORE_SECONDS)
                fault = {"target": "token", "action": "status", "status": 503}
                async with admin.post(faults_url, json=fault, ssl=ssl_ctx) as resp:
                    assert resp.status == 201
                began = time.time()
                await asyncio.sleep(OUTAGE_SECONDS)
                async with admin.delete(faults_url, ssl=ssl_ctx) as resp:
                    assert resp.status in (200, 204)
                return began, time.time()

        results = await asyncio.gather(outage(), *(worker() for _ in range(CONNECTIONS)))
        began, ended = results[0]
        async with aiohttp.ClientSession() as client, client.get(proxy.admin_url + "/metrics") as resp:
            metrics_text = await resp.text()
        assert await proxy.stop() == 0
    finally:
        emulator.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await emulator.wait()

    upstream_401 = counter(metrics_text, f"{NS}_upstream_auth_failures_total", {"route": "east", "code": "401"})
    statuses = [status for _, _, status, _, _ in samples]
    refused = [(t0, t1) for t0, t1, status, _, _ in samples if status == 503]
    first_503 = min(t0 for t0, _ in refused) if refused else None
    # Service is back once every request that started after that moment was answered 200.
    last_503_start = max((t0 for t0, _ in refused), default=0.0)
    back_after = max(0.0, last_503_start - ended)
    events = proxy.events()
    expired = [e for e in events if e.get("event") == "token_expired"]
    restored = [e for e in events if e.get("event") == "token_restored"]
    summary = (
        f"outage soak: {len(samples)} requests over {CONNECTIONS} connections, {statuses.count(200)} 200, "
        f"{len(refused)} 503, {len(samples) - statuses.count(200) - len(refused)} other; upstream 401s "
        f"{upstream_401:.0f}; token endpoint down {ended - began:.1f} s, 503s from "
        f"{(first_503 or began) - began:.2f} s into it, the last 503 started {back_after:.2f} s after it ended; "
        f"token_expired {len(expired)}, token_restored {len(restored)} "
        f"(outage_seconds {restored[0]['outage_seconds'] if restored else None})"
    )
    print("\n" + summary)
    (LOG_DIR / "soak-outage-summary.txt").write_text(summary + "\n")
    assert upstream_401 == 0 and 401 not in statuses
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert refused, "a 10 s outage with 3 s tokens must leave the route without a token for a while"
    assert all(retry is not None and is_json for _, _, status, retry, is_json in samples if status == 503)
    assert back_after <= 2.0, summary
    assert all(status == 200 for t0, _, status, _, _ in samples if t0 > ended + 2.0)
    assert len(expired) == 1 and len(restored) == 1, summary
    assert expired[0]["route"] == restored[0]["route"] == "east"
    # The outage as the log tells it spans the 503s callers saw.
    assert restored[0]["outage_seconds"] >= max(t1 for _, t1 in refused) - (first_503 or 0.0) - 1.0
