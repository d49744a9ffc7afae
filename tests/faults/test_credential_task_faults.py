"""A route's credential task that dies: the route turns unready with the error named, a Kubernetes Event says so,
and the task is restarted with capped backoff on the injected clock."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from proxy.app import ProxyService
from proxy.clock import ManualClock
from proxy.config.reader import parse
from proxy.credentials.base import Credential
from proxy.credentials.keys import KeyFileProvider
from proxy.emulator.kube import RunningKubeApi
from proxy.emulator.kube_store import SUPERUSER, Selector, resource_by_name
from proxy.metrics import RouteMetrics
from tests.support.logsetup import Captured, captured
from tests.support.servers import KUBE_NS
from tests.support.session import new_key

POD = "scorer-0"


@pytest.fixture
def app_logs() -> Iterator[Captured]:
    with captured("aml_auth_proxy.app") as handler:
        yield handler


async def readyz(svc: ProxyService) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{svc.admin_port}/readyz") as resp,
    ):
        return resp.status, await resp.json()


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


async def test_a_dying_credential_task_makes_the_route_unready_emits_an_event_and_is_restarted(
    kube: RunningKubeApi,
    key_dir: Callable[..., dict[str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    app_logs: Captured,
) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": POD, "namespace": KUBE_NS}}
    pod["spec"] = {"containers": [{"name": "proxy", "image": "aml-auth-proxy"}]}
    kube.store.create(resource_by_name("pods"), KUBE_NS, pod, user=SUPERUSER, verb="seed")
    keys = key_dir(new_key("primary"))
    clock = ManualClock()
    runs: list[float] = []
    reload_loop = KeyFileProvider.run

    async def run(self: KeyFileProvider) -> None:
        runs.append(clock.time())
        if len(runs) <= 2:  # a bug in the reload loop, twice
            await asyncio.sleep(0)
            raise RuntimeError("a bug in the key reload loop")
        await reload_loop(self)

    monkeypatch.setattr(KeyFileProvider, "run", run)
    doc = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "kubernetes": {"kubeconfig": str(kube.write_kubeconfig(tmp_path / "kubeconfig", namespace=KUBE_NS))},
        "routes": [{"name": "r", "upstream": "http://127.0.0.1:9", "auth": {"type": "key", **keys}}],
    }
    svc = ProxyService(
        parse(doc, {"POD_NAME": POD, "POD_NAMESPACE": KUBE_NS}), registry=CollectorRegistry(), clock=clock
    )
    await svc.start()
    try:
        t0 = clock.time()
        await until(lambda: len(runs) == 1, "the credential task")
        for _ in range(5):
            await asyncio.sleep(0)  # it has died
        status, body = await readyz(svc)
        assert status == 503
        why = "credential task failed: RuntimeError; restarting with backoff"
        assert body["not_ready"] == {"r": why} and body["routes"]["r"]["reason"] == why
        ready = svc.metrics.registry.get_sample_value("aml_auth_proxy_route_ready", {"route": "r"})
        assert ready == 0
        failed = app_logs.named("credential_task_failed")[0]
        assert failed.levelno == logging.ERROR
        assert failed.fields["error_type"] == "RuntimeError" and failed.fields["restart_in"] == 1.0  # type: ignore[attr-defined]
        assert "a bug" not in repr(failed.fields)  # type: ignore[attr-defined]  # the type and place, no message
        assert failed.fields["where"].startswith("test_credential_task_faults.py:")  # type: ignore[attr-defined]
        # The Event on the pod, through the Kubernetes API stand-in.
        assert svc.kube_runtime is not None and svc.kube_runtime.recorder is not None
        await asyncio.wait_for(svc.kube_runtime.recorder.drain(), 10)
        selector = Selector.parse(label_selector=None, field_selector=None)
        events = kube.store.list_objects(resource_by_name("events"), KUBE_NS, selector)[0]
        assert [(e["reason"], e["type"]) for e in events] == [("CredentialTaskFailed", "Warning")]
        assert events[0]["message"] == "route r: the credential task failed with RuntimeError; restarting with backoff"
        assert events[0]["involvedObject"]["name"] == POD
        # Restarted 1 s later on the injected clock; it dies again, and the next restart waits 2 s.
        await clock.advance(0.99)
        assert len(runs) == 1
        await clock.advance(0.02)
        await until(lambda: len(app_logs.named("credential_task_failed")) == 2, "the second failure")
        assert [round(t - t0, 2) for t in runs] == [0.0, 1.0]
        assert app_logs.named("credential_task_failed")[1].levelno == logging.DEBUG  # the same failure again
        assert (await readyz(svc))[0] == 503
        await clock.advance(1.98)
        assert len(runs) == 2
        await clock.advance(0.03)
        await until(lambda: len(runs) == 3, "the second restart")
        assert round(runs[2] - runs[1], 2) == 2.0
        status, body = await readyz(svc)
        assert status == 200 and body["not_ready"] == {}
        assert [r.levelno for r in app_logs.named("credential_task_restarted")] == [logging.INFO] * 2
        assert not app_logs.named("background_task_ended")
    finally:
        await svc.stop()


class _Crashing:
    """A provider whose run() lasts the next scripted number of seconds of the injected clock, then raises."""

    def __init__(self, clock: ManualClock, lasts: list[float]) -> None:
        self.clock = clock
        self.lasts = lasts
        self.started: list[float] = []
        self.cred = Credential(header="Authorization", value="Bearer " + new_key("crashing"), label="primary")

    @property
    def current(self) -> Credential | None:
        return self.cred

    async def unauthorized(self, sent: Credential) -> Credential | None:
        return None

    def readiness(self) -> tuple[bool, str]:
        return True, "ok"

    def details(self) -> dict[str, Any]:
        return {"kind": "test"}

    def retry_after(self) -> int:
        return 1

    async def refresh_now(self, reason: str) -> None:
        return None

    async def start(self) -> None:
        return None

    async def run(self) -> None:
        self.started.append(self.clock.time())
        if not self.lasts:
            await asyncio.Event().wait()
        await self.clock.sleep(self.lasts.pop(0))
        raise KeyError("bug")

    async def close(self) -> None:
        return None


async def test_restarts_back_off_doubling_to_thirty_seconds_and_start_over_after_a_long_run() -> None:
    clock = ManualClock()
    provider = _Crashing(clock, [0.0] * 8 + [600.0, 0.0])

    def factory(route: Any, metrics: RouteMetrics) -> _Crashing:
        return provider

    doc = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "routes": [{"name": "r", "upstream": "http://127.0.0.1:9", "auth": {"type": "key", "primary_file": "k"}}],
    }
    svc = ProxyService(parse(doc, {}), registry=CollectorRegistry(), clock=clock, provider_factory=factory)
    await svc.start()
    try:
        for _ in range(40):
            await clock.advance(60)
        gaps = [round(b - a, 3) for a, b in zip(provider.started, provider.started[1:], strict=False)]
        # 1, 2, 4, 8, 16, then 30 s after each crash; a run of 600 s (over a minute) starts the doubling over.
        assert gaps == [1, 2, 4, 8, 16, 30, 30, 30, 600 + 1, 2]
        assert (await readyz(svc))[0] == 200  # the last run goes on
    finally:
        await svc.stop()
