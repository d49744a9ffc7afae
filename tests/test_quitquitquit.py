"""POST /quitquitquit on the admin port: the app of a Job or CronJob asks a plain-container proxy to stop when it is
done (kubelet stops only native sidecars by itself, so without it the pod never completes). It starts the same
graceful shutdown as SIGTERM: readiness off, requests in flight drained within `shutdown_grace_seconds`, exit 0.
Loopback only, always: anyone on the pod network could otherwise stop the proxy.

The proxy runs as users run it (the console script in a subprocess, tests/support/procs.py); the refusal of other
addresses is also checked on the handler with fake peers, as tests/test_admin_refresh.py does for POST /refresh.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.health import AdminHandler, Lifecycle
from proxy.metrics import Metrics
from tests.support.procs import ProxyProcess
from tests.support.servers import start_app
from tests.support.session import new_key
from tests.test_admin_refresh import FakeRequest, answer

GRACE = 5.0  # shutdown_grace_seconds of the proxies below
SLOW = 1.0  # seconds the upstream takes for /slow


class SlowUpstream:
    """Answers /slow after SLOW seconds; `arrived` is set when a request is in the upstream."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.url = ""

    async def slow(self, _request: web.Request) -> web.Response:
        self.arrived.set()
        await asyncio.sleep(SLOW)
        return web.json_response({"done": True})


@pytest.fixture
async def upstream() -> AsyncIterator[SlowUpstream]:
    up = SlowUpstream()
    app = web.Application()
    app.router.add_get("/slow", up.slow)
    runner, up.url = await start_app(app)
    yield up
    await runner.cleanup()


async def start_proxy(
    up: SlowUpstream, tmp_path: Path, key_dir: Callable[..., dict[str, str]], **top: Any
) -> ProxyProcess:
    route = {"name": "job", "upstream": up.url, "auth": key_dir(new_key("quit"))}
    return await ProxyProcess.start({"shutdown_grace_seconds": GRACE, "routes": [route], **top}, tmp_path)


def loopback_admin(proxy: ProxyProcess) -> str:
    return f"http://127.0.0.1:{proxy.admin_url.rsplit(':', 1)[1]}"


@pytest.mark.parametrize("workers", [1, 2])
async def test_quitquitquit_from_loopback_answers_202_drains_and_the_proxy_exits_0(
    upstream: SlowUpstream, tmp_path: Path, key_dir: Callable[..., dict[str, str]], workers: int
) -> None:
    proxy = await start_proxy(upstream, tmp_path, key_dir, workers=workers)
    try:
        async with aiohttp.ClientSession() as client:
            if workers > 1:  # the workers listen too before the test asks anything of them
                async with asyncio.timeout(20):
                    while not any(e.get("event") == "worker_started" for e in proxy.events()):
                        await asyncio.sleep(0.05)
            in_flight = asyncio.create_task(client.get(proxy.proxy_url + "/slow"))
            async with asyncio.timeout(10):
                await upstream.arrived.wait()
            asked = time.monotonic()
            async with client.post(loopback_admin(proxy) + "/quitquitquit") as resp:
                assert resp.status == 202, await resp.text()
                assert resp.content_type == "application/json"
                body = await resp.json()
                assert body["shutting_down"] is True
                assert body["request_id"] == resp.headers["X-Request-Id"]
            async with client.get(loopback_admin(proxy) + "/readyz") as resp:
                # readiness off at once, as on SIGTERM, while the admin port still answers during the drain
                assert resp.status == 503
                assert (await resp.json())["shutting_down"] is True
            # The request in flight when the app asked finishes: the proxy drains before it exits.
            async with await in_flight as resp:
                assert resp.status == 200 and await resp.json() == {"done": True}
        assert await proxy.wait(within=GRACE + 5) == 0
        assert time.monotonic() - asked < GRACE + 5
    finally:
        if proxy.process.returncode is None:
            await proxy.stop()
    events = proxy.events()
    (quit_line,) = [e for e in events if e.get("event") == "quit_requested"]
    assert quit_line["request_id"] == body["request_id"]
    names = [e.get("event") for e in events]
    assert names.index("quit_requested") < names.index("shutting_down") < names.index("stopped")
    assert names.count("worker_stopped") == workers - 1  # the primary stops its workers, as on SIGTERM


async def test_quitquitquit_takes_post_only(
    upstream: SlowUpstream, tmp_path: Path, key_dir: Callable[..., dict[str, str]]
) -> None:
    proxy = await start_proxy(upstream, tmp_path, key_dir)
    try:
        async with aiohttp.ClientSession() as client:
            for method in ("GET", "HEAD", "PUT", "DELETE"):
                async with client.request(method, loopback_admin(proxy) + "/quitquitquit") as resp:
                    assert resp.status == 405, method
                    assert resp.headers["Allow"] == "POST"
                    if method != "HEAD":
                        assert "/quitquitquit takes POST" in (await resp.json())["error"]
            async with client.get(loopback_admin(proxy) + "/readyz") as resp:
                assert resp.status == 200  # still up and ready
        assert proxy.process.returncode is None
    finally:
        assert await proxy.stop() == 0
    assert "quit_requested" not in [e.get("event") for e in proxy.events()]


# --- the handler, with fake peers --------------------------------------------------------------------------------


class Stops:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def handler(stops: Stops | None, *, allow_remote_refresh: bool = False) -> AdminHandler:
    return AdminHandler(
        routes=[],
        metrics=Metrics(CollectorRegistry()),
        lifecycle=Lifecycle(request_stop=stops),
        allow_remote_refresh=allow_remote_refresh,
    )


@pytest.mark.parametrize("allow_remote_refresh", [False, True])
@pytest.mark.parametrize(
    "peer",
    [("10.1.2.3", 40000), ("192.168.0.7", 40000), ("2001:db8::1", 40000, 0, 0), ("::ffff:10.0.0.1", 1, 0, 0), None],
    ids=["pod network", "private", "IPv6", "IPv4-mapped", "unknown peer"],
)
async def test_quitquitquit_beyond_loopback_is_a_json_403_even_with_allow_remote_refresh(
    peer: tuple[Any, ...] | None, allow_remote_refresh: bool
) -> None:
    stops = Stops()
    h = handler(stops, allow_remote_refresh=allow_remote_refresh)
    status, body = await answer(h, FakeRequest(peer, "/quitquitquit"))
    assert status == 403 and "loopback only" in body["error"] and body["request_id"]
    await asyncio.sleep(0.01)
    assert stops.calls == 0
    assert h.lifecycle.shutting_down is False


@pytest.mark.parametrize(
    "peer",
    [("127.0.0.1", 1), ("127.8.9.10", 1), ("::1", 1, 0, 0), ("::ffff:127.0.0.1", 1, 0, 0)],
    ids=["127.0.0.1", "127/8", "::1", "IPv4-mapped loopback"],
)
async def test_quitquitquit_from_loopback_answers_first_then_starts_the_shutdown(peer: tuple[Any, ...]) -> None:
    stops = Stops()
    h = handler(stops)
    status, body = await answer(h, FakeRequest(peer, "/quitquitquit"))
    assert status == 202 and body["shutting_down"] is True and body["request_id"]
    assert h.lifecycle.shutting_down is True  # /readyz says 503 from this answer on
    assert stops.calls == 0  # the 202 is written before the shutdown begins
    await asyncio.sleep(0.01)
    assert stops.calls == 1


async def test_quitquitquit_without_a_shutdown_hook_says_so() -> None:
    status, body = await answer(handler(None), FakeRequest(("127.0.0.1", 1), "/quitquitquit"))
    assert status == 503 and "not available" in body["error"]
