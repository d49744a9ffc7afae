"""Keys from a Kubernetes Secret read and watched through the API: the proxy in-process against the Kubernetes API
stand-in (proxy/emulator/kube.py) and a real upstream on 127.0.0.1. Every wait is bounded in time and count."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.app import ProxyService
from proxy.config.reader import parse
from proxy.emulator.kube import RunningKubeApi, start_kube_api
from proxy.emulator.kube_store import SUPERUSER, Rule, resource_by_name
from tests.support.servers import KUBE_NS as NS
from tests.support.servers import KUBE_SA as SA
from tests.support.session import new_key

SECRETS = resource_by_name("secrets")
KUBE = {"backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.3}


def put_secret(kube: RunningKubeApi, name: str, **data: str) -> None:
    body = {"metadata": {"name": name}, "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
    try:
        kube.store.replace(SECRETS, NS, name, body, user=SUPERUSER)
    except Exception:
        kube.store.create(SECRETS, NS, body, user=SUPERUSER)


def seed_key(kube: RunningKubeApi, label: str) -> str:
    """A new primary key, put in the Secret aml-keys (before the proxy starts)."""
    key = new_key(label)
    put_secret(kube, "aml-keys", primary=key)
    return key


async def wait_for(condition: Callable[[], bool], *, what: str, seconds: float = 5.0) -> float:
    """Poll every 10 ms, at most `seconds`; returns the time it took."""
    started = time.monotonic()
    for _ in range(int(seconds / 0.01)):
        if condition():
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def route(upstream: str, *, secondary: bool = False) -> dict[str, Any]:
    auth: dict[str, Any] = {"type": "key", "primary_secret_ref": {"name": "aml-keys", "key": "primary"}}
    if secondary:
        auth["secondary_secret_ref"] = {"name": "aml-keys", "key": "secondary"}
    return {"name": "scoring", "upstream": upstream, "auth": auth}


@contextlib.asynccontextmanager
async def running_proxy(
    upstream: str, kubernetes: dict[str, str], environ: dict[str, str] | None = None, **kw: Any
) -> AsyncIterator[ProxyService]:
    """A started proxy with one key route (`route`) reading the Secret through the Kubernetes API, which it reaches
    as `kubernetes` (and `environ`) say; stopped after the block."""
    doc = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "kubernetes": {**KUBE, **kubernetes},
        "routes": [route(upstream, **kw)],
    }
    service = ProxyService(parse(doc, environ or {}), registry=CollectorRegistry())
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def proxy(
    kube: RunningKubeApi, tmp_path: Path, upstream: str, *, user: str = SA, **kw: Any
) -> contextlib.AbstractAsyncContextManager[ProxyService]:
    """`running_proxy` reaching the stand-in through a kubeconfig, as `user`."""
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig", user=user, namespace=NS)
    return running_proxy(upstream, {"kubeconfig": str(kubeconfig)}, **kw)


async def rotate(kube: RunningKubeApi, service: ProxyService, *, after: str, seconds: float) -> None:
    """Put a new primary key in the Secret and wait until the proxy holds it."""
    rotated = new_key("b")
    put_secret(kube, "aml-keys", primary=rotated)
    await wait_for(lambda: current(service) == rotated, what=f"the rotation after {after}", seconds=seconds)


class Upstream:
    """Accepts any key in `accepted`; records the key of every request."""

    def __init__(self) -> None:
        self.accepted: set[str] = set()
        self.seen: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.seen.append(key)
        return web.Response(status=200 if key in self.accepted else 401, text="ok")


@pytest.fixture
async def upstream(serve: Callable[..., Any]) -> tuple[Upstream, str]:
    up = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", up.handle)
    return up, await serve(app)


def current(service: ProxyService) -> str | None:
    cred = service.routes[0].provider.current
    return None if cred is None else cred.value.removeprefix("Bearer ")


def sample(service: ProxyService, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


async def readyz(service: ProxyService) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{service.admin_port}/readyz") as resp:
        return resp.status, await resp.json()


# -- rotation ----------------------------------------------------------------------------------------------------


async def test_a_rotation_under_a_request_loop_fails_no_request_and_is_used_within_one_second(
    kube: RunningKubeApi, tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    up, url = upstream
    old, new = new_key("old"), new_key("new")
    up.accepted = {old, new}
    put_secret(kube, "aml-keys", primary=old + "\n")
    async with proxy(kube, tmp_path, url) as service:
        assert current(service) == old  # whitespace trimmed
        statuses: list[int] = []
        rotated_at: float | None = None
        first_new: float | None = None
        async with aiohttp.ClientSession() as client:
            for i in range(400):  # bounded: at most 400 requests, stops 1 s after the new key is first seen
                async with client.post(f"http://127.0.0.1:{service.proxy_port}/score", data=b"{}") as resp:
                    statuses.append(resp.status)
                if i == 20:
                    put_secret(kube, "aml-keys", primary=new)
                    rotated_at = time.monotonic()
                if rotated_at is not None and first_new is None and up.seen[-1] == new:
                    first_new = time.monotonic()
                if first_new is not None and time.monotonic() - first_new > 1.0:
                    break
        assert rotated_at is not None and first_new is not None, "the new key was never used"
        assert first_new - rotated_at < 1.0, f"rotation picked up after {first_new - rotated_at:.3f} s"
        assert set(statuses) == {200}, statuses
        assert up.seen[up.seen.index(new) :] == [new] * len(up.seen[up.seen.index(new) :])  # never back to old
        assert sample(service, "aml_auth_proxy_credential_reloads_total", route="scoring", outcome="success") == 2
        print(f"rotation pickup: {first_new - rotated_at:.3f} s")


async def test_a_bad_update_keeps_the_last_good_key_and_a_good_one_replaces_it(
    kube: RunningKubeApi, tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    _, url = upstream
    good, better = seed_key(kube, "good"), new_key("better")
    async with proxy(kube, tmp_path, url) as service:
        put_secret(kube, "aml-keys", primary="bad\x00value")
        await wait_for(
            lambda: sample(service, "aml_auth_proxy_credential_reloads_total", route="scoring", outcome="error") >= 1,
            what="the bad value to be refused",
        )
        assert current(service) == good
        status, body = await readyz(service)
        assert status == 200 and "control characters" in str(body)
        put_secret(kube, "aml-keys", other="x")  # the key is gone from the Secret
        await wait_for(lambda: "has no key" in str(service.routes[0].provider.details()), what="missing key")
        assert current(service) == good
        put_secret(kube, "aml-keys", primary=better)
        await wait_for(lambda: current(service) == better, what="the good update", seconds=1.0)


async def test_a_missing_secret_is_unready_with_a_reason_until_it_is_created(
    kube: RunningKubeApi, tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    _, url = upstream
    async with proxy(kube, tmp_path, url, secondary=True) as service:
        status, body = await readyz(service)
        assert status == 503
        assert "Secret ml/aml-keys not found" in body["not_ready"]["scoring"]
        primary, secondary = new_key("p"), new_key("s")
        put_secret(kube, "aml-keys", primary=primary, secondary=secondary)
        await wait_for(lambda: current(service) == primary, what="the created Secret", seconds=1.0)
        assert (await readyz(service))[0] == 200


# -- the watch's failures ----------------------------------------------------------------------------------------


async def test_an_expired_watch_lists_again_and_sees_the_next_rotation(
    kube: RunningKubeApi, tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    _, url = upstream
    seed_key(kube, "a")
    async with proxy(kube, tmp_path, url) as service:
        put_secret(kube, "unrelated", x="y")  # the history moves past the watch's resourceVersion...
        kube.store.compact()  # ...and is compacted
        kube.store.close_watches()  # the watch resumes from its old resourceVersion: 410 Expired
        await wait_for(
            lambda: (
                sample(service, "aml_auth_proxy_kubernetes_watch_restarts_total", route="scoring", reason="expired")
                >= 1
            ),
            what="a relist after 410",
        )
        await rotate(kube, service, after="the relist", seconds=1.0)


async def test_an_api_server_restart_is_survived_with_the_last_key_and_the_watch_comes_back(
    kube: RunningKubeApi, tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    _, url = upstream
    first = seed_key(kube, "a")
    async with proxy(kube, tmp_path, url) as service:
        await kube.restart(down_seconds=0.5, compact=True)
        assert current(service) == first and (await readyz(service))[0] == 200
        await rotate(kube, service, after="the restart", seconds=3.0)
        restarts = sum(
            sample(service, "aml_auth_proxy_kubernetes_watch_restarts_total", route="scoring", reason=r)
            for r in ("unreachable", "expired", "closed")
        )
        assert restarts >= 1


async def test_rbac_denial_is_unready_naming_the_secret_and_verb_and_recovers_when_granted(
    kube: RunningKubeApi, tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    _, url = upstream
    key = seed_key(kube, "k")
    kube.set_rules([Rule(user=SA, verbs=("get",), api_groups=("",), resources=("pods",))])
    async with proxy(kube, tmp_path, url) as service:
        status, body = await readyz(service)
        assert status == 503
        reason = body["not_ready"]["scoring"]
        assert "forbidden" in reason and "list" in reason and "Secret ml/aml-keys" in reason and "RBAC" in reason
        assert sample(service, "aml_auth_proxy_kubernetes_watch_restarts_total", route="scoring", reason="forbidden")
        grant = Rule(user=SA, verbs=("get", "list", "watch"), api_groups=("",), resources=("secrets",))
        kube.set_rules([Rule(user=SA, verbs=("get",), api_groups=("",), resources=("pods",)), grant])
        await wait_for(lambda: current(service) == key, what="recovery after the grant", seconds=3.0)
        assert (await readyz(service))[0] == 200


# -- client configuration ----------------------------------------------------------------------------------------


async def test_the_in_cluster_service_account_is_used_without_a_kubeconfig(
    tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    _, url = upstream
    async with await start_kube_api(tls=True, namespace=NS, directory=tmp_path / "server") as kube:
        key = seed_key(kube, "k")
        files = kube.write_incluster(tmp_path / "serviceaccount", user=SA, namespace=NS)
        async with running_proxy(url, {"service_account_dir": str(files.directory)}, files.environ) as service:
            assert current(service) == key
            assert {c["user"] for c in kube.store.calls} == {SA}
