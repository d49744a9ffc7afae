"""`aml-auth-proxy demo`: the emulator, the proxy and a few scoring calls in one process, then stop.

It shows the whole loop a user gets on a cluster: a caller sends plain HTTP with no credential, the proxy adds
the key from kubelet-style Secret files, the scoring front end checks it, and a key regeneration through the
control plane does not fail a call.
"""

from __future__ import annotations

import asyncio
import json
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
from proxy.emulator.runner import start_emulator
from proxy.logs import setup as setup_logging

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


async def _regenerate_primary(client: aiohttp.ClientSession, control_url: str, token: str) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    url = f"{control_url}{V1_WORKSPACE}/services/demo/regenerateKeys"
    async with client.post(url, json={"keyType": "Primary", "keyValue": None}, headers=auth) as resp:
        location = resp.headers["Operation-Location"]
        operation = location.rsplit("/", 1)[1]
        say(f"  POST .../services/demo/regenerateKeys -> {resp.status} (Operation-Location .../{operation})")
    async with client.get(location, headers=auth) as resp:
        say(f"  GET  .../operations/... -> {(await resp.json())['state']}")


async def _run(azmlinfsrv: str | None) -> int:
    started = time.monotonic()
    backend: AzmlinfsrvProcess | None = None
    with tempfile.TemporaryDirectory(prefix="aml-auth-proxy-demo-") as tmp:
        keys = Path(tmp) / "keys"
        if azmlinfsrv:
            say("Starting the real AML scoring server (azmlinfsrv) with the sample score.py ...")
            backend = await start_azmlinfsrv(executable=azmlinfsrv)
            say(f"  azmlinfsrv is healthy at {backend.url}")
        emulator_config: dict[str, Any] = {
            "latency": {"eastus": 0.02},
            "services": [
                {
                    "name": "demo",
                    "api": "v1",
                    "region": "eastus",
                    "deployments": {"blue": backend.url if backend else "echo"},
                }
            ],
            "keys_dir": str(keys),
        }
        emu = await start_emulator(emulator_config)
        upstream = emu.service_urls["demo"]
        say(f"Emulator: scoring front end {upstream}, control plane {emu.control_url}")
        say(f"  the service's keys are mounted like a Kubernetes Secret in {keys / 'demo'}")
        settings = parse(
            {
                "listen": {"host": "127.0.0.1", "port": 0},
                "admin": {"host": "127.0.0.1", "port": 0},
                "routes": [
                    {
                        "name": "demo",
                        "region": "eastus",
                        "upstream": upstream,
                        "auth": {
                            "type": "key",
                            "primary_file": str(keys / "demo" / "primary"),
                            "secondary_file": str(keys / "demo" / "secondary"),
                            "reload_seconds": 0.2,
                        },
                    }
                ],
            },
            {},
        )
        proxy = ProxyService(settings, registry=CollectorRegistry())
        await proxy.start()
        base = f"http://127.0.0.1:{proxy.proxy_port}"
        say(f"Proxy: {base} -> {upstream} (admin on 127.0.0.1:{proxy.admin_port})")
        try:
            async with aiohttp.ClientSession() as client:
                say("\nCalling the scoring front end directly, without a key:")
                async with client.post(upstream + "/score", json={"data": [1]}) as resp:
                    say(f"  -> {resp.status} {(await resp.text()).strip()}")
                say("\nCalling through the proxy (plain HTTP, no credential from the caller):")
                for data in ([1, 2, 3], [10, 20], [0.5]):
                    await _score(client, base + "/score", data)
                say("\nRegenerating the primary key through the AML v1 control plane:")
                await _regenerate_primary(client, emu.control_url, emu.control_plane_token)
                say("Calling through the proxy again (the old primary now gets 401 upstream):")
                for data in ([4, 5], [6]):
                    await _score(client, base + "/score", data)
                async with client.get(f"http://127.0.0.1:{proxy.admin_port}/readyz") as resp:
                    say(f"\nGET /readyz -> {resp.status} {(await resp.text()).strip()}")
                async with client.get(f"http://127.0.0.1:{proxy.admin_port}/metrics") as resp:
                    metrics = await resp.text()
                say("A few lines of GET /metrics:")
                for line in metrics.splitlines():
                    if line.startswith(SHOWN_METRICS):
                        say("  " + line)
        finally:
            await proxy.stop()
            await emu.close()
            if backend is not None:
                await backend.stop()
    say(f"\nDemo finished in {time.monotonic() - started:.1f} s; everything is stopped.")
    return 0


def main(*, azmlinfsrv: str | None) -> int:
    setup_logging("error", stream=sys.stderr)
    return asyncio.run(_run(azmlinfsrv))
