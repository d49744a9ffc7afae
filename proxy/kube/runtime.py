"""What the proxy runs against the Kubernetes API for one process: the Secret watches routes read and the Event
recorder, started before the routes load their first credentials and stopped after them. app.py builds one when
the config names a Secret (`*_secret_ref`) or Events are on."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Iterable

from proxy.clock import Clock
from proxy.config.settings import SecretRef, Settings
from proxy.events import NO_EVENTS, EventSink
from proxy.kube.client import KubeApi
from proxy.kube.events import EventRecorder
from proxy.kube.secrets import SecretWatch
from proxy.metrics import Metrics


class KubeRuntime:
    def __init__(self, *, api: KubeApi, metrics: Metrics, events: EventRecorder | None) -> None:
        self.api = api
        self._metrics = metrics
        self.recorder = events
        self.watches: dict[tuple[str, str], SecretWatch] = {}
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def build(cls, settings: Settings, *, api: KubeApi | None, metrics: Metrics, clock: Clock) -> KubeRuntime | None:
        k = settings.kubernetes
        if not settings.uses_kubernetes():
            return None
        api = api or KubeApi(k)
        recorder = None
        if k.events and k.pod_name and k.pod_namespace:
            recorder = EventRecorder(
                api=api,
                pod_name=k.pod_name,
                namespace=k.pod_namespace,
                clock=clock,
                count=lambda reason, outcome: metrics.kube_events.labels(reason, outcome).inc(),
            )
        return cls(api=api, metrics=metrics, events=recorder)

    @property
    def events(self) -> EventSink:
        return self.recorder if self.recorder is not None else NO_EVENTS

    def feeds(self, route: str, refs: Iterable[SecretRef]) -> dict[str, SecretWatch]:
        """One watch per Secret a route names (primary and secondary in one Secret share it)."""
        out: dict[str, SecretWatch] = {}
        for ref in refs:
            key = (route, ref.name)
            if key not in self.watches:
                self.watches[key] = SecretWatch(
                    api=self.api,
                    name=ref.name,
                    route=route,
                    on_restart=functools.partial(self._restarted, route),
                    events=self.events,
                )
            out[ref.name] = self.watches[key]
        return out

    def _restarted(self, route: str, reason: str) -> None:
        self._metrics.kube_watch_restarts.labels(route, reason).inc()

    async def start(self) -> None:
        if self.recorder is not None:
            self._task = asyncio.create_task(self.recorder.run(), name="kubernetes-events")
        for watch in self.watches.values():
            watch.start()

    async def stop(self) -> None:
        await asyncio.gather(*(watch.stop() for watch in self.watches.values()))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.to_thread(self.api.close)
