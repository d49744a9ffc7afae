"""Leader election with a coordination.k8s.io/v1 Lease, the way client-go's leaderelection does it.

One `Elector` per shared route. `tick()` is one try-acquire-or-renew, run every `renew_seconds` by the caller:
- no Lease: create it holding it (a 409 AlreadyExists means another replica created it first);
- held by us: renew (renewTime = now);
- held by another whose renewTime + leaseDurationSeconds has passed, or by nobody (a released Lease): take it
  (holderIdentity = us, acquireTime = renewTime = now, leaseTransitions + 1);
- held by another and not expired: follow.
Every update carries the resourceVersion read, so of two replicas that read the same expired Lease exactly one
update lands; the other gets a 409, re-reads and follows.

A leader counts itself leader until its last successful renewal + lease_seconds - renew_seconds: strictly before
another replica may take the Lease (times are compared across replicas, so their clocks must agree, as with
client-go). `leaseTransitions` at acquisition is the leader's term: writers of shared state use it as a fencing
token. This module owns the protocol only; `KubeLeaseStore` adapts the official client (a thread per call).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import kubernetes.client as k8s

from proxy.clock import Clock
from proxy.kube.client import KubeApi, api_error, call
from proxy.logs import event

log = logging.getLogger("aml_auth_proxy.share")


@dataclass(frozen=True, kw_only=True)
class LeaseRecord:
    """The Lease fields the election uses; times are epoch seconds."""

    holder: str | None
    lease_seconds: int
    acquire_time: float | None
    renew_time: float | None
    transitions: int
    resource_version: str | None = None

    def expired(self, now: float) -> bool:
        if not self.holder or self.renew_time is None:
            return True
        return self.renew_time + self.lease_seconds <= now


class Conflict(Exception):
    """409: the object changed since it was read, or another replica created it first."""


class KubeUnavailable(Exception):
    """Any other failure to read or write an object (network, 5xx, 403); `reason` is safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def store_call(
    api: Callable[[], Any],
    kube: KubeApi,
    *,
    verb: str,
    what: str,
    seconds: float,
    func: Callable[[Any, str, float], Any],
) -> Any:
    """One call of a store over the official client: `func(api(), namespace, seconds)` (the request's timeout) in
    a thread, given up a second later. A 409 raises Conflict, a 404 of a get answers None, any other failure raises
    KubeUnavailable naming `what`."""

    def run() -> Any:
        return func(api(), kube.namespace, seconds)

    try:
        async with asyncio.timeout(seconds + 1):
            return await call(run)
    except Exception as exc:
        error = api_error(exc, verb=verb, what=what)
        if error.status == 409:
            raise Conflict(error.reason) from None
        if error.status == 404 and verb == "get":
            return None
        raise KubeUnavailable(error.reason) from None


class LeaseStore(Protocol):
    async def get(self) -> LeaseRecord | None:
        """The Lease, or None when there is none."""

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        """Create the Lease; Conflict when it exists."""

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        """Replace the Lease if its resourceVersion is still `record.resource_version`; Conflict otherwise."""


class Elector:
    def __init__(
        self, *, store: LeaseStore, identity: str, lease_seconds: int, renew_seconds: float, clock: Clock
    ) -> None:
        self._store = store
        self.identity = identity
        self._lease_seconds = lease_seconds
        self._renew_seconds = renew_seconds
        self._clock = clock
        self._leading = False
        self._renewed_at = -1e18
        self.term = -1  # leaseTransitions when we took the Lease
        self.holder: str | None = None  # the holder last seen
        self.last_error: str | None = None

    @property
    def leading(self) -> bool:
        """True while our last renewal is recent enough that nobody else can have taken the Lease."""
        deadline = self._renewed_at + self._lease_seconds - self._renew_seconds
        return self._leading and self._clock.time() < deadline

    async def tick(self) -> bool:
        """One try-acquire-or-renew; returns whether we lead afterwards."""
        now = self._clock.time()
        try:
            current = await self._store.get()
        except KubeUnavailable as exc:
            self._unavailable(exc)
            return self.leading
        if current is None:
            mine = LeaseRecord(
                holder=self.identity,
                lease_seconds=self._lease_seconds,
                acquire_time=now,
                renew_time=now,
                transitions=0,
            )
            return await self._write(self._store.create, mine, now)
        if current.holder == self.identity:
            mine = replace(current, renew_time=now, lease_seconds=self._lease_seconds)
        elif current.expired(now):
            mine = replace(
                current,
                holder=self.identity,
                lease_seconds=self._lease_seconds,
                acquire_time=now,
                renew_time=now,
                transitions=current.transitions + 1,
            )
        else:
            self._follow(current)
            return False
        return await self._write(self._store.update, mine, now)

    async def _write(self, write: Any, mine: LeaseRecord, now: float) -> bool:
        try:
            stored: LeaseRecord = await write(mine)
        except Conflict:
            return await self._reread()
        except KubeUnavailable as exc:
            self._unavailable(exc)
            return self.leading
        self.last_error = None
        if not self._leading or stored.transitions != self.term:
            self.term = stored.transitions
            event(log, logging.INFO, "lease_acquired", lease_holder=self.identity, term=self.term)
        self._leading = True
        self._renewed_at = now
        self.holder = self.identity
        return True

    async def _reread(self) -> bool:
        """Someone else wrote the Lease since we read it: see who holds it now."""
        try:
            current = await self._store.get()
        except KubeUnavailable as exc:
            self._unavailable(exc)
            self._leading = False
            return False
        if current is None or current.holder != self.identity or current.transitions != self.term:
            self._follow(current)
            return False
        return self.leading  # an unrelated write (a label, say): our last renewal still stands

    def _follow(self, current: LeaseRecord | None) -> None:
        if self._leading:
            event(log, logging.WARNING, "lease_lost", lease_holder=current.holder if current else None)
        self._leading = False
        self.holder = current.holder if current is not None else None

    def _unavailable(self, exc: KubeUnavailable) -> None:
        if exc.reason != self.last_error:
            event(log, logging.WARNING, "lease_unavailable", reason=exc.reason)
        self.last_error = exc.reason

    async def verify(self) -> bool:
        """Re-read the Lease: still ours, in our term and unexpired? (Before writing shared state.)"""
        if not self.leading:
            return False
        try:
            current = await self._store.get()
        except KubeUnavailable:
            return False
        now = self._clock.time()
        ok = (
            current is not None
            and current.holder == self.identity
            and current.transitions == self.term
            and not current.expired(now)
        )
        if not ok:
            self._follow(current)
        return ok and self.leading

    async def release(self) -> None:
        """At shutdown: give the Lease up so another replica takes over at once (client-go ReleaseOnCancel)."""
        if not self.leading:
            return
        self._leading = False
        try:
            current = await self._store.get()
            if current is not None and current.holder == self.identity:
                now = self._clock.time()
                await self._store.update(replace(current, holder=None, lease_seconds=1, renew_time=now))
        except (Conflict, KubeUnavailable):
            pass  # the Lease expires on its own


# -- the official client ---------------------------------------------------------------------------------------


def _to_time(value: float | None) -> datetime.datetime | None:
    return None if value is None else datetime.datetime.fromtimestamp(value, datetime.UTC)


def _from_time(value: Any) -> float | None:
    return value.timestamp() if isinstance(value, datetime.datetime) else None


class KubeLeaseStore:
    """A LeaseStore over the official client (proxy/kube/client.py); each call in a thread, bounded in time."""

    def __init__(self, *, kube: KubeApi, name: str, timeout: float) -> None:
        self._kube = kube
        self._name = name
        self._timeout = timeout

    async def _call(self, verb: str, func: Callable[[Any, str, float], Any]) -> Any:
        kube = self._kube
        return await store_call(
            lambda: k8s.CoordinationV1Api(kube.api_client()),
            kube,
            verb=verb,
            what=f"lease {self._name}",
            seconds=self._timeout,
            func=func,
        )

    def _record(self, obj: Any) -> LeaseRecord:
        spec = obj.spec
        return LeaseRecord(
            holder=spec.holder_identity or None,
            lease_seconds=int(spec.lease_duration_seconds or 0),
            acquire_time=_from_time(spec.acquire_time),
            renew_time=_from_time(spec.renew_time),
            transitions=int(spec.lease_transitions or 0),
            resource_version=obj.metadata.resource_version,
        )

    def _body(self, record: LeaseRecord) -> Any:
        return k8s.V1Lease(
            metadata=k8s.V1ObjectMeta(name=self._name, resource_version=record.resource_version),
            spec=k8s.V1LeaseSpec(
                holder_identity=record.holder or "",
                lease_duration_seconds=record.lease_seconds,
                acquire_time=_to_time(record.acquire_time),
                renew_time=_to_time(record.renew_time),
                lease_transitions=record.transitions,
            ),
        )

    async def get(self) -> LeaseRecord | None:
        name = self._name
        obj = await self._call("get", lambda api, ns, t: api.read_namespaced_lease(name, ns, _request_timeout=t))
        return None if obj is None else self._record(obj)

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        body = self._body(record)
        obj = await self._call("create", lambda api, ns, t: api.create_namespaced_lease(ns, body, _request_timeout=t))
        return self._record(obj)

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        name, body = self._name, self._body(record)
        obj = await self._call(
            "update", lambda api, ns, t: api.replace_namespaced_lease(name, ns, body, _request_timeout=t)
        )
        return self._record(obj)
