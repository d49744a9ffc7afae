"""`aml-auth-proxy demo`: the emulator, the proxy and a few scoring calls in one process, then stop.

It shows the whole loop a user gets on a cluster: a caller sends plain HTTP with no credential, the proxy adds
the key from kubelet-style Secret files, the scoring front end checks it, a key regeneration through the
control plane does not fail a call, and tokens are renewed while requests flow. The proxy runs on the config
that `aml-auth-proxy emulator --proxy-config` writes; its log lines go to a file, and the screen gets the story
in about 50 lines, each step saying what happened as the proxy's own /metrics and /readyz report it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml
from prometheus_client import CollectorRegistry

from proxy.app import ProxyService
from proxy.config.reader import parse
from proxy.emulator.azmlinfsrv import AzmlinfsrvProcess, start_azmlinfsrv
from proxy.emulator.proxyconfig import build_proxy_config, with_dev_client
from proxy.emulator.runner import RunningEmulator, parse_config, start_emulator
from proxy.logs import setup as setup_logging
from proxy.metrics import histogram_quantile

V1_WORKSPACE = (
    "/modelmanagement/v1.0/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg"
    "/providers/Microsoft.MachineLearningServices/workspaces/ws"
)
FAR_REGION_SECONDS = 0.15
TOKEN_LIFETIME, TOKEN_REFRESH_AFTER = 4, 2
TOKEN_ROUTES = (("east", "eastus", "an AML v2 online endpoint"), ("west", "westeurope", "an AML v1 AKS web service"))
DURATION = "aml_auth_proxy_token_refresh_duration_seconds"


class Screen:
    """What the user reads: the terminal the demo started on, whatever stdout is redirected to meanwhile."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)


def emulator_config(backend: str) -> dict[str, Any]:
    token = {
        "auth_mode": "aml_token",
        "token_lifetime_seconds": TOKEN_LIFETIME,
        "token_refresh_after_seconds": TOKEN_REFRESH_AFTER,
    }
    return {
        "tls": True,
        "latency": {"eastus": 0.01, "westeurope": FAR_REGION_SECONDS},
        "services": [
            {"name": "demo", "api": "v1", "region": "eastus", "deployments": {"blue": backend}},
            {"name": "east", "api": "v2", "region": "eastus", "deployments": {"blue": backend}, **token},
            {"name": "west", "api": "v1", "region": "westeurope", "deployments": {"blue": backend}, **token},
        ],
    }


def sample(metrics: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _get(client: aiohttp.ClientSession, url: str) -> Any:
    async with client.get(url) as resp:
        return await (resp.json() if resp.content_type == "application/json" else resp.text())


async def _score(client: aiohttp.ClientSession, say: Screen, base: str, data: Sequence[float]) -> int:
    async with client.post(base + "/demo/score", json={"data": list(data)}) as resp:
        body = (await resp.text()).strip()
        say(f'     POST /demo/score {{"data": {list(data)}}} -> {resp.status} {body}')
        return resp.status


async def _key_part(client: aiohttp.ClientSession, say: Screen, emu: RunningEmulator, base: str, admin: str) -> None:
    ssl_ctx = ssl.create_default_context(cafile=emu.ca_file)
    say("1. Keys, read from files laid out the way kubelet mounts a Kubernetes Secret")
    async with client.post(emu.service_urls["demo"] + "/score", json={"data": [1]}, ssl=ssl_ctx) as resp:
        say(f"   Straight to the AML scoring front end, without a key: {resp.status} {(await resp.text()).strip()}")
    say("   Through the proxy, plain HTTP with no credential from the caller:")
    for data in ([1, 2, 3], [10, 20]):
        await _score(client, say, base, data)

    auth = {"Authorization": f"Bearer {emu.control_plane_token}"}
    url = f"{emu.control_url}{V1_WORKSPACE}/services/demo/regenerateKeys"
    async with client.post(url, json={"keyType": "Primary"}, headers=auth, ssl=ssl_ctx) as resp:
        accepted = resp.status
        location = resp.headers["Operation-Location"]
    async with client.get(location, headers=auth, ssl=ssl_ctx) as resp:
        state = (await resp.json())["state"]
    say(f"   The primary key is regenerated through the AML v1 control plane: regenerateKeys {accepted}, {state}.")
    say("   The old primary stops working at once; the new keys reach the files, which the proxy checks every 1 s.")
    before = await _get(client, admin + "/metrics")
    await _score(client, say, base, [4, 5])
    after = await _get(client, admin + "/metrics")
    failovers = sample(after, "aml_auth_proxy_key_failovers_total", route="demo") - sample(
        before, "aml_auth_proxy_key_failovers_total", route="demo"
    )
    active = (await _get(client, admin + "/readyz"))["routes"]["demo"]["active"]
    if failovers:
        say("     The scoring front end refused the old primary with 401; the proxy resent the call with the")
        say(f"     {active} key, which answered 200 (key_failovers_total +{failovers:.0f}; the caller saw one 200).")
    else:
        say(f"     The proxy had already read the new keys from the files: the {active} key answered, no 401 upstream.")
    reloads = sample(after, "aml_auth_proxy_credential_reloads_total", route="demo", outcome="success")
    reloaded = False
    deadline = time.monotonic() + 3
    while not reloaded and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        metrics = await _get(client, admin + "/metrics")
        reloaded = sample(metrics, "aml_auth_proxy_credential_reloads_total", route="demo", outcome="success") > reloads
    route = (await _get(client, admin + "/readyz"))["routes"]["demo"]
    if reloaded:
        say(
            f"   The proxy then re-read the files: it holds the new primary, and keeps the {route['active']} key in use"
        )
        say("   while it works.")
    else:
        say(f"   The proxy has not re-read the files within 3 s; the {route['active']} key stays in use.")
    await _score(client, say, base, [6])


async def _token_part(client: aiohttp.ClientSession, say: Screen, base: str, admin: str, seconds: float) -> None:
    say()
    say("2. Tokens, fetched with the proxy's own Entra ID identity and renewed before they are needed")
    for name, region, what in TOKEN_ROUTES:
        say(f"   /{name}: {what} in {region}")
    say(
        f"   Tokens live {TOKEN_LIFETIME} s and may be renewed after {TOKEN_REFRESH_AFTER} s; the emulator adds "
        f"{FAR_REGION_SECONDS * 1000:.0f} ms to each westeurope control-plane"
    )
    say("   call, as a far region's control plane would take (scoring calls are not delayed).")
    say(f"   Sending requests through both routes for {seconds:g} s ...")
    counts = {name: dict[int, int]() for name, _, _ in TOKEN_ROUTES}
    slowest = {name: 0.0 for name, _, _ in TOKEN_ROUTES}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, _, _ in TOKEN_ROUTES:
            started = time.monotonic()
            async with client.post(f"{base}/{name}/score", json={"data": [1, 2]}) as resp:
                await resp.read()
                counts[name][resp.status] = counts[name].get(resp.status, 0) + 1
            slowest[name] = max(slowest[name], time.monotonic() - started)
        await asyncio.sleep(0.005)
    metrics = await _get(client, admin + "/metrics")
    for name, region, _ in TOKEN_ROUTES:
        renewals = sample(metrics, "aml_auth_proxy_token_refreshes_total", route=name, outcome="success")
        labels = {"region": region, "outcome": "success"}
        p50, p95 = (histogram_quantile(metrics, DURATION, labels, q) or 0.0 for q in (0.5, 0.95))
        statuses = ", ".join(f"{n} x {code}" for code, n in sorted(counts[name].items()))
        say(
            f"     {name:<4} {region:<10} {statuses}; {renewals:.0f} token fetches, refresh latency p50 "
            f"{p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms; slowest call {slowest[name] * 1000:.0f} ms"
        )
    say("   No call waited for a token: renewals run in the background, ahead of the refresh time.")
    say(f"   (Latency per region is the histogram {DURATION}; p50/p95 from its buckets.)")


async def _run(azmlinfsrv: str | None, token_seconds: float, say: Screen) -> int:
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="aml-auth-proxy-demo-"))
    config_path, log_path = folder / "proxy.yaml", folder / "proxy.log"
    backend: AzmlinfsrvProcess | None = None
    say("aml-auth-proxy demo: the AML emulator, the proxy and a caller, in one process.")
    if azmlinfsrv:
        backend = await start_azmlinfsrv(executable=azmlinfsrv)
        say(f"The model is the real AML scoring server (azmlinfsrv) at {backend.url}, with a score.py that doubles.")
    else:
        say("The model is the emulator's echo backend, which doubles its input.")
    cfg = parse_config({**emulator_config(backend.url if backend else "echo"), "keys_dir": str(folder / "secrets")})
    client_secret = secrets.token_urlsafe(24)
    cfg = with_dev_client(cfg, client_secret)
    emu = await start_emulator(cfg)
    assert cfg.keys_dir is not None
    doc = build_proxy_config(emu, cfg, cfg.keys_dir, client_secret=client_secret)
    doc["listen"]["port"] = doc["admin"]["port"] = 0  # any free port: the demo must not collide with anything
    config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    proxy = ProxyService(parse(doc, {}), registry=CollectorRegistry())
    with log_path.open("w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        setup_logging("info", stream=log)
        await proxy.start()
        base = f"http://127.0.0.1:{proxy.proxy_port}"
        admin = f"http://127.0.0.1:{proxy.admin_port}"
        say(
            "The emulator serves the AML control planes, the scoring front ends and Entra ID over TLS (a throwaway CA)."
        )
        say(f"The proxy listens on {base}: /demo (key), /east and /west (tokens); admin port {admin}.")
        say()
        try:
            async with aiohttp.ClientSession() as client:
                await _key_part(client, say, emu, base, admin)
                await _token_part(client, say, base, admin, token_seconds)
                ready = await _get(client, admin + "/readyz")
        finally:
            await proxy.stop()
            await emu.close()
            if backend is not None:
                await backend.stop()
    say()
    say(
        f"3. GET /readyz -> ready={str(ready['ready']).lower()}: "
        + ", ".join(
            f"{name} ({r['kind']}) {'ready' if r['ready'] else r['reason']}" for name, r in ready["routes"].items()
        )
    )
    lines = len(log_path.read_bytes().splitlines())
    shutil.rmtree(folder / "secrets", ignore_errors=True)  # the stopped emulator's keys and client secret
    say()
    say(f"Done in {time.monotonic() - started:.1f} s; everything is stopped.")
    say(f"  The config the proxy ran on: {config_path} (its secrets folder is removed)")
    say(f"  The proxy's log ({lines} JSON lines: one per request, and events): {log_path}")
    say("Next: the same loop on your machine, with the emulator left running (README, 'Local development'):")
    say("  .venv/bin/aml-auth-proxy emulator --proxy-config dev/proxy.yaml")
    say("  .venv/bin/aml-auth-proxy run --config dev/proxy.yaml           # in a second terminal")
    say("  curl -d '{\"data\": [1, 2, 3]}' http://127.0.0.1:8080/demo/score")
    say("Then point a route at your own endpoint: README, 'Running it', and docs/configuration.md.")
    return 0 if ready["ready"] else 1


def main(*, azmlinfsrv: str | None, token_seconds: float = 8.0) -> int:
    say = Screen(sys.stdout)
    return asyncio.run(_run(azmlinfsrv, token_seconds, say))
