"""Kubernetes Events about the pod: a token route driven into failure and back on a ManualClock, the Events read
back from the Kubernetes API stand-in; aggregation (count patched, not a new Event) and the token bucket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import ManualClock
from proxy.config.settings import Kubernetes
from proxy.credentials.tokens import NothingToWatch, Token, TransientError
from proxy.emulator.kube import RunningKubeApi, start_kube_api
from proxy.emulator.kube_store import SUPERUSER, Selector, resource_by_name
from proxy.kube.client import KubeApi
from proxy.kube.events import BURST, REFILL_SECONDS, EventRecorder
from proxy.metrics import Metrics
from tests.support.refresh import bearer_refresher, manual_policy

NS = "ml"
POD = "scorer-0"
POLICY = manual_policy(jitter_seconds=0, safety_seconds=5, backoff_max_seconds=2, timeout_seconds=1)


@pytest.fixture
async def kube() -> AsyncIterator[RunningKubeApi]:
    server = await start_kube_api(namespace=NS)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": POD, "namespace": NS}}
    pod["spec"] = {"containers": [{"name": "proxy", "image": "aml-auth-proxy"}]}
    server.store.create(resource_by_name("pods"), NS, pod, user=SUPERUSER, verb="seed")
    try:
        yield server
    finally:
        await server.close()


class FlakySource(NothingToWatch):
    auth_type = "aml-endpoint-token"

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.failing = False
        self.n = 0

    async def fetch(self, previous: Token | None) -> Token:
        if self.failing:
            raise TransientError("AML v2 token endpoint: HTTP 503")
        self.n += 1
        return Token(value=f"token-value-{self.n:04d}", expires_at=self.clock.time() + 20, refresh_at=None)

    async def revoke(self, token: Token) -> None:
        return None

    async def close(self) -> None:
        return None


def recorder(kube: RunningKubeApi, tmp_path: Path, clock: ManualClock, metrics: Metrics) -> EventRecorder:
    api = KubeApi(Kubernetes(kubeconfig=str(kube.write_kubeconfig(tmp_path / "kc", namespace=NS))))
    return EventRecorder(
        api=api,
        pod_name=POD,
        namespace=NS,
        clock=clock,
        count=lambda reason, outcome: metrics.kube_events.labels(reason, outcome).inc(),
    )


def events(kube: RunningKubeApi) -> list[dict[str, Any]]:
    selector = Selector.parse(label_selector=None, field_selector=None)
    return kube.store.list_objects(resource_by_name("events"), NS, selector)[0]


async def test_refresh_failure_expiry_and_recovery_become_aggregated_events_on_the_pod(
    kube: RunningKubeApi, tmp_path: Path
) -> None:
    clock = ManualClock()
    metrics = Metrics(CollectorRegistry())
    rec = recorder(kube, tmp_path, clock, metrics)
    sender = asyncio.create_task(rec.run())
    source = FlakySource(clock)
    refresher = bearer_refresher(source, clock, metrics, route="scoring", policy=POLICY, rng=lambda: 1.0, events=rec)
    try:
        await refresher.start()
        for _ in range(2):  # two rounds: fail past expiry, then recover
            source.failing = True
            for _ in range(20):  # bounded: 20 failed attempts at most 2 s apart, 40 s > the 20 s lifetime
                await refresher.refresh_now("scheduled")
                await clock.advance(2)
            source.failing = False
            await refresher.refresh_now("scheduled")
            await asyncio.wait_for(rec.drain(), 10)
        got = {(e["reason"], e["type"]): e for e in events(kube)}
        assert set(got) == {
            ("TokenRefreshFailing", "Warning"),
            ("TokenExpired", "Warning"),
            ("TokenRefreshRecovered", "Normal"),
        }
        for event in got.values():
            assert event["count"] == 2, event  # aggregated: one Event per kind, its count patched
            assert event["involvedObject"]["kind"] == "Pod" and event["involvedObject"]["name"] == POD
            assert (
                event["involvedObject"]["uid"] == kube.store.get(resource_by_name("pods"), NS, POD)["metadata"]["uid"]
            )
            assert event["source"]["component"] == "aml-auth-proxy"
            assert "token-value" not in event["message"]
        assert "HTTP 503" in got[("TokenRefreshFailing", "Warning")]["message"]
        assert got[("TokenExpired", "Warning")]["lastTimestamp"] > got[("TokenExpired", "Warning")]["firstTimestamp"]
        sample = metrics.registry.get_sample_value
        assert sample("aml_auth_proxy_kubernetes_events_total", {"reason": "TokenExpired", "outcome": "created"}) == 1
        assert (
            sample("aml_auth_proxy_kubernetes_events_total", {"reason": "TokenExpired", "outcome": "aggregated"}) == 1
        )
    finally:
        sender.cancel()
        await refresher.close()
        rec._api.close()


async def test_the_token_bucket_allows_a_burst_then_one_event_per_refill(kube: RunningKubeApi, tmp_path: Path) -> None:
    clock = ManualClock()
    metrics = Metrics(CollectorRegistry())
    rec = recorder(kube, tmp_path, clock, metrics)
    sender = asyncio.create_task(rec.run())
    try:
        for i in range(BURST + 5):
            rec.emit(warning=True, reason="KeyFailover", message=f"failover {i}")
        await asyncio.wait_for(rec.drain(), 10)
        assert len(events(kube)) == BURST
        await clock.advance(REFILL_SECONDS)
        rec.emit(warning=True, reason="KeyFailover", message="after the refill")
        rec.emit(warning=True, reason="KeyFailover", message="one too many")
        rec.emit(warning=True, reason="SecretUnavailable", message="another reason has its own bucket")
        await asyncio.wait_for(rec.drain(), 10)
        messages = {e["message"] for e in events(kube)}
        assert "after the refill" in messages and "one too many" not in messages
        assert "another reason has its own bucket" in messages
        value = metrics.registry.get_sample_value(
            "aml_auth_proxy_kubernetes_events_total", {"reason": "KeyFailover", "outcome": "rate_limited"}
        )
        assert value == 6
    finally:
        sender.cancel()
        rec._api.close()
