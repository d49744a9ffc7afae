"""Kubernetes Events about the proxy's pod, aggregated and rate limited like client-go's recorder.

`EventRecorder.emit()` is the `EventSink` the credential code reports to: it never blocks, never raises and does
no I/O; it queues (a bounded queue: beyond QUEUE_SIZE reports are dropped and counted). A background task takes
each report and:

- rate limits it with a token bucket per (involvedObject, reason): BURST events at once, then one more per
  REFILL_SECONDS (client-go's spam filter: burst 25, one per 5 minutes). A report over the limit is dropped;
- aggregates it: a report with the same (involvedObject, reason, message, type) as an Event sent within
  WINDOW_SECONDS patches that Event's `count` and `lastTimestamp` instead of creating a new one (client-go's
  event logger); a patch that finds the Event gone (expired by the API server's TTL) creates it again;
- sends it with the blocking client in a worker thread. A failure is logged at debug level once per distinct
  reason and never reaches the caller.

The involvedObject is the pod named by POD_NAME/POD_NAMESPACE, with its UID read once from the API (`get` on the
pod; without that permission the Event names the pod without a UID), unless a report names another object
(`about`: the sidecar injector reports on the pods it reviews, in their namespace); buckets and aggregation are
then per object.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kubernetes.client as k8s

from proxy.clock import Clock
from proxy.events import About
from proxy.kube.client import KubeApi, api_error, call

log = logging.getLogger("aml_auth_proxy.kube.events")

COMPONENT = "aml-auth-proxy"
BURST = 25
REFILL_SECONDS = 300.0
WINDOW_SECONDS = 600.0
QUEUE_SIZE = 100
CACHE_SIZE = 4096  # aggregation keys remembered (least recently used dropped)
OUTCOMES = ("created", "aggregated", "rate_limited", "dropped", "failed")


@dataclass(frozen=True, slots=True)
class _Report:
    warning: bool
    reason: str
    message: str
    at: float
    about: About | None = None


@dataclass(slots=True)
class _Sent:
    name: str
    namespace: str
    count: int
    first: float
    last: float


class EventRecorder:
    """An EventSink that writes core/v1 Events on the pod (start with `run()` as a background task)."""

    def __init__(
        self,
        *,
        api: KubeApi,
        pod_name: str,
        namespace: str,
        clock: Clock,
        count: Callable[[str, str], None] = lambda reason, outcome: None,
    ) -> None:
        self._api = api
        self._pod = pod_name
        self._namespace = namespace
        self._clock = clock
        self._count = count
        self._queue: asyncio.Queue[_Report] = asyncio.Queue(QUEUE_SIZE)
        self._buckets: dict[tuple[About | None, str], tuple[float, float]] = {}  # (object, reason) -> (tokens, at)
        self._sent: OrderedDict[tuple[About | None, str, str, str], _Sent] = OrderedDict()
        self._uid: str | None = None
        self._last_failure: str | None = None
        self._seq = 0

    # -- EventSink -----------------------------------------------------------------------------------------------

    def emit(self, *, warning: bool, reason: str, message: str, about: About | None = None) -> None:
        """Queue one report about the pod, or about `about` (in its namespace)."""
        try:
            self._queue.put_nowait(_Report(warning, reason, message[:1024], self._clock.time(), about))
        except asyncio.QueueFull:
            self._count(reason, "dropped")

    # -- the sender ----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            report = await self._queue.get()
            try:
                await self._send(report)
            except Exception as exc:  # sending is best effort: never let it end the task
                self._failed(report, exc)
            finally:
                self._queue.task_done()

    async def drain(self) -> None:
        """Wait until every queued report is handled (tests)."""
        await self._queue.join()

    def _allow(self, about: About | None, reason: str, now: float) -> bool:
        bucket = (about, reason)
        tokens, at = self._buckets.get(bucket, (float(BURST), now))
        tokens = min(float(BURST), tokens + max(0.0, now - at) / REFILL_SECONDS)
        if tokens < 1.0:
            self._buckets[bucket] = (tokens, now)
            return False
        self._buckets[bucket] = (tokens - 1.0, now)
        return True

    async def _send(self, report: _Report) -> None:
        if not self._allow(report.about, report.reason, report.at):
            self._count(report.reason, "rate_limited")
            return
        kind = "Warning" if report.warning else "Normal"
        key = (report.about, report.reason, report.message, kind)
        sent = self._sent.get(key)
        core = await call(self._api.core)
        if sent is not None and report.at - sent.last <= WINDOW_SECONDS:
            body = {"count": sent.count + 1, "lastTimestamp": _iso(report.at)}
            try:
                await call(core.patch_namespaced_event, sent.name, sent.namespace, body)
            except Exception as exc:
                if getattr(exc, "status", None) != 404:
                    raise
            else:
                sent.count += 1
                sent.last = report.at
                self._sent.move_to_end(key)
                self._count(report.reason, "aggregated")
                self._ok()
                return
        await self._create(core, report, kind, key)

    async def _create(self, core: Any, report: _Report, kind: str, key: tuple[About | None, str, str, str]) -> None:
        about = report.about
        if about is None:
            if self._uid is None:
                try:
                    pod = await call(core.read_namespaced_pod, self._pod, self._namespace)
                    self._uid = pod.metadata.uid
                except Exception as exc:  # no `get` on pods: name the pod without its UID
                    self._debug_once(api_error(exc, verb="get", what=f"Pod {self._namespace}/{self._pod}").reason)
            about = About(kind="Pod", api_version="v1", name=self._pod, namespace=self._namespace, uid=self._uid)
        namespace = about.namespace
        self._seq += 1  # two reports in one clock tick (a manual clock) still get distinct names
        name = f"{about.name.rstrip('-.')}.{int(report.at * 1e9) + self._seq:x}"
        at = _time(report.at)
        event = k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(name=name, namespace=namespace),
            involved_object=k8s.V1ObjectReference(
                kind=about.kind, api_version=about.api_version, name=about.name, namespace=namespace, uid=about.uid
            ),
            reason=report.reason,
            message=report.message,
            type=kind,
            count=1,
            first_timestamp=at,
            last_timestamp=at,
            source=k8s.V1EventSource(component=COMPONENT),
            reporting_component=COMPONENT,
            reporting_instance=self._pod,
        )
        await call(core.create_namespaced_event, namespace, event)
        self._sent[key] = _Sent(name=name, namespace=namespace, count=1, first=report.at, last=report.at)
        self._sent.move_to_end(key)
        while len(self._sent) > CACHE_SIZE:
            self._sent.popitem(last=False)
        self._count(report.reason, "created")
        self._ok()

    def _failed(self, report: _Report, exc: BaseException) -> None:
        self._count(report.reason, "failed")
        self._debug_once(api_error(exc, verb="create", what="Events").reason)

    def _debug_once(self, reason: str) -> None:
        if reason != self._last_failure:
            self._last_failure = reason
            log.debug("event_send_failed", extra={"event": "event_send_failed", "fields": {"reason": reason}})

    def _ok(self) -> None:
        self._last_failure = None


def _time(at: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).replace(microsecond=0)


def _iso(at: float) -> str:
    return _time(at).strftime("%Y-%m-%dT%H:%M:%SZ")
