"""Soak: 3 s tokens refreshed every 2 s on two routes in two regions (one 150 ms away) under a bounded request loop
for 60 s, the emulator and the proxy each in their own process as users run them. No request may see a 401, no
request may wait on a refresh, and the refresh-latency histogram must tell the regions apart."""

from __future__ import annotations

import asyncio
import secrets
import signal
import ssl
import statistics
import sys
import time
from pathlib import Path

import aiohttp

from proxy.metrics import histogram_quantile
from tests.support.emulated import control_plane_auth, short_token_service, token_route
from tests.support.procs import ProxyProcess, start_emulator_process
from tests.support.session import LOG_DIR, SESSION_SECRETS, remember

SOAK_SECONDS = 60.0
CLIENT = "44444444-4444-4444-4444-444444444444"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def test_soak_two_regions_short_tokens_no_401_no_waiting(tmp_path: Path) -> None:
    secret = "soak-client-secret-" + secrets.token_urlsafe(16)
    password = "soak-mls-password-" + secrets.token_urlsafe(12)
    remember(secret, password)
    emulator_config = {
        "tls": True,
        "latency": {"westeurope": 0.15},
        "entra": {"clients": {CLIENT: secret}},
        "mlserver": {"users": {"soak": password}, "backend": "echo"},
        "services": [short_token_service("east", "v2", "eastus"), short_token_service("west", "v1", "westeurope")],
    }
    emulator, ready = await start_emulator_process(emulator_config, tmp_path)
    try:
        (tmp_path / "secret").write_text(secret + "\n")
        (tmp_path / "user").write_text("soak\n")
        (tmp_path / "password").write_text(password + "\n")
        common = control_plane_auth(ready, CLIENT, tmp_path / "secret")
        routes = [
            token_route(ready, "east", "eastus", "aml-endpoint-token", common),
            token_route(ready, "west", "westeurope", "aml-service-token", common),
            {
                "name": "mls",
                "match": "/mls",
                "strip_prefix": True,
                "tls": {"ca_file": ready["ca_file"]},
                "upstream": ready["mlserver_url"],
                "auth": {
                    "type": "mlserver",
                    "username_file": str(tmp_path / "user"),
                    "password_file": str(tmp_path / "password"),
                    "ca_file": ready["ca_file"],
                },
            },
        ]
        proxy = await ProxyProcess.start({"routes": routes, "log_level": "debug"}, tmp_path, name="soak-proxy")
        samples: list[tuple[str, float, float, int]] = []

        async def worker(route: str) -> None:
            async with aiohttp.ClientSession() as client:
                deadline = time.monotonic() + SOAK_SECONDS
                while time.monotonic() < deadline and len(samples) < 200_000:
                    t0 = time.time()
                    async with client.post(f"{proxy.proxy_url}/{route}/score", json={"data": [1, 2]}) as resp:
                        await resp.read()
                    samples.append((route, t0, time.time(), resp.status))

        await asyncio.gather(*(worker(r) for r in ("east", "east", "west", "west")))
        async with aiohttp.ClientSession() as client, client.get(proxy.admin_url + "/metrics") as resp:
            metrics_text = await resp.text()
        assert await proxy.stop() == 0  # SIGTERM: the ML Server refresh token is revoked on the way out
        ssl_ctx = ssl.create_default_context(cafile=ready["ca_file"])
        async with (
            aiohttp.ClientSession() as client,
            client.get(ready["control_url"] + "/_emulator/calls", ssl=ssl_ctx) as resp,
        ):
            calls = await resp.json()
    finally:
        emulator.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await emulator.wait()

    windows = [
        (e["ts"] - e["duration_ms"] / 1000, e["ts"])
        for e in proxy.events()
        if e.get("event") == "token_refreshed" and e.get("route") in ("east", "west")
    ]

    def overlaps(t0: float, t1: float) -> bool:
        return any(a <= t1 and t0 <= b for a, b in windows)

    inside: list[float] = []  # client-observed latency, ms
    outside: list[float] = []
    for route, t0, t1, _status in samples:
        if route != "mls":
            (inside if overlaps(t0, t1) else outside).append((t1 - t0) * 1000)
    # The proxy's own overhead per request, from its access log: total time minus waiting for the upstream.
    over_in: list[float] = []
    over_out: list[float] = []
    for e in proxy.events():
        if e.get("event") == "access" and e.get("route") in ("east", "west"):
            overhead = e["duration_ms"] - e["upstream_ms"]
            (over_in if overlaps(e["ts"] - e["duration_ms"] / 1000, e["ts"]) else over_out).append(overhead)
    statuses = [s for *_rest, s in samples]
    unauthorized = statuses.count(401)
    p50_in, p99_in = statistics.median(inside), pct(inside, 0.99)
    p50_out, p99_out = statistics.median(outside), pct(outside, 0.99)
    o50_in, o99_in = statistics.median(over_in), pct(over_in, 0.99)
    o50_out, o99_out = statistics.median(over_out), pct(over_out, 0.99)
    refresh_p50 = {
        region: (
            histogram_quantile(
                metrics_text,
                "aml_auth_proxy_token_refresh_duration_seconds",
                {"region": region, "outcome": "success"},
                0.5,
            )
            or 0.0
        )
        * 1000
        for region in ("eastus", "westeurope")
    }
    refreshes = {
        r: sum(1 for e in proxy.events() if e.get("event") == "token_refreshed" and e.get("route") == r)
        for r in ("east", "west")
    }
    summary = (
        f"soak: {len(samples)} requests in {SOAK_SECONDS:.0f} s, {unauthorized} got 401, "
        f"{sum(1 for s in statuses if s != 200)} not 200; "
        f"refreshes east {refreshes['east']}, west {refreshes['west']}; "
        f"proxy overhead inside refresh windows p50 {o50_in:.2f} ms p99 {o99_in:.2f} ms (n={len(over_in)}), "
        f"outside p50 {o50_out:.2f} ms p99 {o99_out:.2f} ms (n={len(over_out)}); "
        f"client latency inside p50 {p50_in:.2f} ms p99 {p99_in:.2f} ms, outside p50 {p50_out:.2f} ms "
        f"p99 {p99_out:.2f} ms; "
        f"refresh p50 eastus {refresh_p50['eastus']:.1f} ms, westeurope {refresh_p50['westeurope']:.1f} ms; "
        f"token calls {calls['token']}"
    )
    print("\n" + summary)
    (LOG_DIR / "soak-summary.txt").write_text(summary + "\n")
    assert unauthorized == 0 and set(statuses) == {200}
    assert refreshes["east"] >= SOAK_SECONDS / 2.5 and refreshes["west"] >= SOAK_SECONDS / 2.5
    assert len(over_in) >= 50
    assert o99_in - o99_out <= 2.0, summary
    assert refresh_p50["westeurope"] - refresh_p50["eastus"] >= 100, summary
    assert calls["mlserver"].get("revoke") == 1 and calls["mlserver_revoked"] == 1
    log_text = proxy.log_path.read_text()
    assert not any(s in log_text for s in SESSION_SECRETS)
    assert sys.platform.startswith("linux")
