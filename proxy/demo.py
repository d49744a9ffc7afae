"""`aml-auth-proxy demo`: the emulator, the proxy and a few scoring calls in one process, then stop.

It shows the whole loop a user gets on a cluster: a caller sends plain HTTP with no credential, the proxy adds
the key from kubelet-style Secret files, the scoring front end checks it, and a key regeneration through the
control plane does not fail a call.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from proxy.app import ProxyService
from proxy.config import parse
from proxy.emulator.azmlinfsrv import AzmlinfsrvProcess, start_azmlinfsrv
from proxy.emulator.runner import RunningEmulator, start_emulator
from proxy.emulator.secretdir import write_private
from proxy.logs import setup as setup_logging
from proxy.metrics import histogram_quantile

V1_WORKSPACE = (
    "/modelmanagement/v1.0/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg"
    "/providers/Microsoft.MachineLearningServices/workspaces/ws"
)
SHOWN_METRICS = (
    "aml_auth_proxy_requests_total",
    "aml_auth_proxy_request_duration_seconds_count",
    "aml_auth_proxy_key_failovers_total",
    'aml_auth_proxy_credential_reloads_total{outcome="success"',
    "aml_auth_proxy_route_ready",
)


def say(text: str) -> None:
    print(text, flush=True)


async def _score(client: aiohttp.ClientSession, url: str, data: Sequence[float]) -> None:
    async with client.post(url, json={"data": list(data)}) as resp:
        body = await resp.text()
        say(
            f"  POST /score {json.dumps({'data': list(data)})} -> {resp.status} {body.strip()}"
            f"  (request id {resp.headers.get('x-request-id')})"
        )


async def _regenerate_primary(
    client: aiohttp.ClientSession, control_url: str, token: str, ssl_ctx: ssl.SSLContext
) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    url = f"{control_url}{V1_WORKSPACE}/services/demo/regenerateKeys"
    async with client.post(url, json={"keyType": "Primary", "keyValue": None}, headers=auth, ssl=ssl_ctx) as resp:
        location = resp.headers["Operation-Location"]
        operation = location.rsplit("/", 1)[1]
        say(f"  POST .../services/demo/regenerateKeys -> {resp.status} (Operation-Location .../{operation})")
    async with client.get(location, headers=auth, ssl=ssl_ctx) as resp:
        say(f"  GET  .../operations/... -> {(await resp.json())['state']}")


DEMO_CLIENT = "d3m0d3m0-0000-4000-8000-000000000001"
SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
TOKEN_ROUTES = (("east", "eastus"), ("west", "westeurope"))


def _emulator_config(backend: str, keys: Path, client_secret: str) -> dict[str, Any]:
    token = {"auth_mode": "aml_token", "token_lifetime_seconds": 4, "token_refresh_after_seconds": 2}
    return {
        "tls": True,
        "latency": {"eastus": 0.01, "westeurope": 0.15},
        "entra": {"clients": {DEMO_CLIENT: client_secret}},
        "services": [
            {"name": "demo", "api": "v1", "region": "eastus", "deployments": {"blue": backend}},
            {"name": "east", "api": "v2", "region": "eastus", "deployments": {"blue": backend}, **token},
            {"name": "west", "api": "v1", "region": "westeurope", "deployments": {"blue": backend}, **token},
        ],
        "keys_dir": str(keys),
    }


def _proxy_config(emu: RunningEmulator, keys: Path, secret_file: Path) -> dict[str, Any]:
    tls = {"ca_file": emu.ca_file}
    identity = {
        "type": "client_secret",
        "client_id": DEMO_CLIENT,
        "tenant_id": emu.tenant,
        "authority_host": emu.entra_url,
        "client_secret_file": str(secret_file),
    }
    plane = {
        "subscription_id": SUBSCRIPTION,
        "resource_group": "rg",
        "workspace": "ws",
        "ca_file": emu.ca_file,
        "identity": identity,
    }
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "log_level": "error",
        "routes": [
            {
                "name": "demo",
                "region": "eastus",
                "match": "/keyed",
                "strip_prefix": True,
                "tls": tls,
                "upstream": emu.service_urls["demo"],
                "auth": {
                    "type": "key",
                    "primary_file": str(keys / "demo" / "primary"),
                    "secondary_file": str(keys / "demo" / "secondary"),
                    "reload_seconds": 0.2,
                },
            },
            {
                "name": "east",
                "region": "eastus",
                "match": "/east",
                "strip_prefix": True,
                "tls": tls,
                "upstream": emu.service_urls["east"],
                "auth": {"type": "aml-endpoint-token", "endpoint": "east", "arm_url": emu.control_url, **plane},
            },
            {
                "name": "west",
                "region": "westeurope",
                "match": "/west",
                "strip_prefix": True,
                "tls": tls,
                "upstream": emu.service_urls["west"],
                "auth": {"type": "aml-service-token", "service": "west", "mms_url": emu.control_url, **plane},
            },
        ],
    }


async def _key_part(client: aiohttp.ClientSession, emu: RunningEmulator, base: str) -> None:
    ssl_ctx = ssl.create_default_context(cafile=emu.ca_file)
    say("\n== Key auth (keys from files mounted like a Kubernetes Secret) ==")
    say("Calling the scoring front end directly, without a key:")
    async with client.post(emu.service_urls["demo"] + "/score", json={"data": [1]}, ssl=ssl_ctx) as resp:
        say(f"  -> {resp.status} {(await resp.text()).strip()}")
    say("Calling through the proxy (plain HTTP, no credential from the caller):")
    for data in ([1, 2, 3], [10, 20], [0.5]):
        await _score(client, base + "/keyed/score", data)
    say("Regenerating the primary key through the AML v1 control plane:")
    await _regenerate_primary(client, emu.control_url, emu.control_plane_token, ssl_ctx)
    say("Calling through the proxy again (the old primary now gets 401 upstream: the proxy fails over to the")
    say("secondary key, or has already reloaded the new primary from the files):")
    for data in ([4, 5], [6]):
        await _score(client, base + "/keyed/score", data)


async def _token_part(client: aiohttp.ClientSession, base: str, admin: str, seconds: float) -> None:
    say("\n== Token auth (AML tokens fetched with the proxy's Entra ID identity, 4 s lifetime, renewed at 2 s) ==")
    say("  east: an AML v2 online endpoint in eastus; west: an AML v1 AKS service in westeurope, 150 ms away")
    counts = {name: dict[int, int]() for name, _ in TOKEN_ROUTES}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, _region in TOKEN_ROUTES:
            async with client.post(f"{base}/{name}/score", json={"data": [1, 2]}) as resp:
                await resp.read()
                counts[name][resp.status] = counts[name].get(resp.status, 0) + 1
        await asyncio.sleep(0.005)
    async with client.get(admin + "/metrics") as resp:
        metrics = await resp.text()
    for name, region in TOKEN_ROUTES:
        refreshed = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("aml_auth_proxy_token_refreshes_total{")
            and f'route="{name}"' in line
            and 'outcome="success"' in line
        )
        p50 = histogram_quantile(
            metrics, "aml_auth_proxy_token_refresh_duration_seconds", {"region": region, "outcome": "success"}, 0.5
        )
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(counts[name].items()))
        say(
            f"  {name:<4} ({region:<10}) requests {{{statuses}}}, token refreshes {refreshed:.0f}, "
            f"refresh latency p50 {0 if p50 is None else p50 * 1000:.0f} ms"
        )
    say("Refresh latency per region, as /metrics has it:")
    for line in metrics.splitlines():
        if line.startswith("aml_auth_proxy_token_refresh_duration_seconds_sum") and "success" in line:
            say("  " + line)


async def _run(azmlinfsrv: str | None, token_seconds: float) -> int:
    started = time.monotonic()
    backend: AzmlinfsrvProcess | None = None
    with tempfile.TemporaryDirectory(prefix="aml-auth-proxy-demo-") as tmp:
        keys = Path(tmp) / "keys"
        secret_file = Path(tmp) / "client-secret"
        client_secret = secrets.token_urlsafe(24)
        write_private(secret_file, client_secret + "\n")
        if azmlinfsrv:
            say("Starting the real AML scoring server (azmlinfsrv) with the sample score.py ...")
            backend = await start_azmlinfsrv(executable=azmlinfsrv)
            say(f"  azmlinfsrv is healthy at {backend.url}")
        emu = await start_emulator(_emulator_config(backend.url if backend else "echo", keys, client_secret))
        say(f"Emulator: control plane {emu.control_url}, Entra ID {emu.entra_url} (TLS with a throwaway CA)")
        proxy = ProxyService(parse(_proxy_config(emu, keys, secret_file), {}), registry=CollectorRegistry())
        await proxy.start()
        base = f"http://127.0.0.1:{proxy.proxy_port}"
        admin = f"http://127.0.0.1:{proxy.admin_port}"
        say(f"Proxy: {base} (routes /keyed, /east, /west; admin on {admin})")
        try:
            async with aiohttp.ClientSession() as client:
                await _key_part(client, emu, base)
                await _token_part(client, base, admin, token_seconds)
                async with client.get(admin + "/readyz") as resp:
                    ready = await resp.json()
                say(
                    f"\nGET /readyz -> {resp.status}: "
                    + ", ".join(f"{name} {r['kind']} ready={r['ready']}" for name, r in ready["routes"].items())
                )
                async with client.get(admin + "/metrics") as resp:
                    metrics = await resp.text()
                say("A few more lines of GET /metrics:")
                for line in metrics.splitlines():
                    if line.startswith(SHOWN_METRICS) and 'route="demo"' in line:
                        say("  " + line)
        finally:
            await proxy.stop()
            await emu.close()
            if backend is not None:
                await backend.stop()
    say(f"\nDemo finished in {time.monotonic() - started:.1f} s; everything is stopped.")
    return 0


def main(*, azmlinfsrv: str | None, token_seconds: float = 8.0) -> int:
    setup_logging("error", stream=sys.stderr)
    return asyncio.run(_run(azmlinfsrv, token_seconds))
