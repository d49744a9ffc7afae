"""One token per route for all replicas: the Lease holder fetches it and writes it to a Secret; the others adopt it.

`SharedTokenProvider` wraps a route's `Refresher` (which still owns fetching, schedule, backoff and the request
path) and plays one of three roles, shown in /readyz and metrics:
- leader: holds the Lease (proxy/kube/lease.py); the refresher fetches on schedule and every token it fetches is
  written to the Secret, after re-reading the Lease (still ours, same term) and with the Secret's
  resourceVersion (a 409 means another writer: re-read). A Secret written in a later term, or holding a token
  that expires later, is never overwritten: a deposed leader cannot replace a newer token.
- follower: the refresher does not fetch; tokens from the Secret (list + watch, relist on 410) are adopted.
- fallback: not the leader and the shared token is missing, stale (past its refresh time + lease_seconds),
  malformed or was refused by the upstream (401): fetch our own, until a usable shared token arrives.
Not here: how to build the API client (proxy/kube/client.py) or the timing rule (proxy/config/checks.py checks it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import kubernetes.client as k8s

from proxy.clock import Clock
from proxy.config.settings import Share
from proxy.credentials.base import Credential
from proxy.credentials.tokens import Token
from proxy.kube.client import KubeApi, WorkerThread, api_error, list_secret, post, watch_secret
from proxy.kube.lease import Conflict, Elector, KubeLeaseStore, KubeUnavailable, store_call
from proxy.logs import event
from proxy.metrics import Metrics
from proxy.refresher import Refresher

log = logging.getLogger("aml_auth_proxy.share")

LEADER = "leader"
FOLLOWER = "follower"
FALLBACK = "fallback"
ROLES = (LEADER, FOLLOWER, FALLBACK)
MANAGED_BY = "aml-auth-proxy"
ROUTE_LABEL = "aml-auth-proxy/route"


@dataclass(frozen=True, kw_only=True)
class SharedToken:
    """What the Secret holds: the token and its times (epoch seconds), who fetched it, in which Lease term."""

    token: Token
    fetched_at: float
    holder: str
    term: int

    @property
    def stale_after(self) -> float:
        """Past this a leader (this one or its successor) would have written a newer token."""
        token = self.token
        assert token.expires_at is not None
        return token.refresh_at if token.refresh_at is not None else token.expires_at


def encode(shared: SharedToken) -> dict[str, str]:
    """The Secret's data: every value base64, as in any Secret."""
    t = shared.token
    fields = {
        "token": t.value,
        "expires_at": repr(t.expires_at),
        "refresh_at": "" if t.refresh_at is None else repr(t.refresh_at),
        "fetched_at": repr(shared.fetched_at),
        "holder": shared.holder,
        "term": str(shared.term),
    }
    return {k: base64.b64encode(v.encode()).decode() for k, v in fields.items()}


def decode(data: dict[str, str] | None) -> SharedToken | str:
    """A SharedToken, or why the data is unusable (never showing a value)."""
    try:
        raw = {k: base64.b64decode(v, validate=True).decode() for k, v in (data or {}).items()}
        expires_at = float(raw["expires_at"])
        shared = SharedToken(
            token=Token(
                value=raw["token"],
                expires_at=expires_at,
                refresh_at=float(raw["refresh_at"]) if raw.get("refresh_at") else None,
            ),
            fetched_at=float(raw["fetched_at"]),
            holder=raw["holder"],
            term=int(raw["term"]),
        )
    except (KeyError, ValueError, binascii.Error, UnicodeDecodeError) as exc:
        return f"the shared Secret is malformed ({type(exc).__name__})"
    if not math.isfinite(expires_at):
        return "the shared Secret is malformed (expires_at)"
    return shared


Content = SharedToken | str | None  # a token, why it is unusable, or no Secret


class SecretStore(Protocol):
    async def get(self) -> tuple[Content, str | None]:
        """The Secret's content and resourceVersion (None, None when there is no Secret)."""

    async def write(self, data: dict[str, str], resource_version: str | None) -> None:
        """Create (resource_version None) or replace at that resourceVersion; Conflict when it moved."""

    def watch(self, deliver: Callable[[Content], None]) -> None:
        """Start list + watch, calling `deliver` on the loop for each state of the Secret."""

    async def close(self) -> None:
        """Stop the watch."""


class SharedTokenProvider:
    """A CredentialProvider: a Refresher plus the election and the shared Secret."""

    def __init__(
        self,
        *,
        route: str,
        share: Share,
        refresher: Refresher,
        elector: Elector,
        secrets: SecretStore,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self._route = route
        self._share = share
        self._refresher = refresher
        self._elector = elector
        self._secrets = secrets
        self._clock = clock
        self._role = ""
        self._shared: Content = None
        self._rejected: str | None = None  # a shared token value the upstream refused
        self._last_error: str | None = None
        self._publishing: asyncio.Task[None] | None = None
        self._pending: tuple[Token, float] | None = None
        self._arrived = asyncio.Event()
        self._role_gauges = {role: metrics.share_role.labels(route, role) for role in ROLES}
        self._transitions = metrics.share_transitions.labels(route)
        refresher.on_fetched = self._fetched

    # -- the request path and probes: the refresher's, plus the role --------------------------------------------

    @property
    def current(self) -> Credential | None:
        return self._refresher.current

    async def unauthorized(self, sent: Credential) -> Credential | None:
        token = self._refresher.token
        if self._role == FOLLOWER and token is not None and self._refresher.current is sent:
            self._rejected = token.value  # this shared token is refused here: fetch our own
            self._fall_back()
        return await self._refresher.unauthorized(sent)

    def readiness(self) -> tuple[bool, str]:
        return self._refresher.readiness()

    def retry_after(self) -> int:
        return self._refresher.retry_after()

    def details(self) -> dict[str, Any]:
        now = self._clock.time()
        shared = self._shared
        share: dict[str, Any] = {
            "role": self._role,
            "holder": self._elector.holder,
            "lease": self._share.lease,
            "secret": self._share.secret,
            "term": self._elector.term if self._role == LEADER else None,
            "shared_expires_in": None,
            "last_error": self._last_error or self._elector.last_error,
        }
        if isinstance(shared, SharedToken) and shared.token.expires_at is not None:
            share["shared_expires_in"] = round(shared.token.expires_at - now, 3)
            share["shared_by"] = shared.holder
        return {**self._refresher.details(), "share": share}

    async def refresh_now(self, reason: str) -> None:
        await self._refresher.refresh_now(reason)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Elect once; a follower waits up to lease_seconds for a usable shared token, then fetches its own."""
        self._secrets.watch(self._deliver)
        if await self._elector.tick():
            self._set_role(LEADER, "elected")
            await self._refresher.start()
            return
        self._refresher.pause()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._share.lease_seconds):
                while not self._adopt_shared():
                    self._arrived.clear()
                    await self._arrived.wait()
            return
        self._set_role(FALLBACK, self._why_unusable())
        self._refresher.resume()
        await self._refresher.start()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._refresher.run())
            group.create_task(self._elect_loop())

    async def close(self) -> None:
        await self._secrets.close()
        if self._publishing is not None:
            self._publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publishing
        await self._elector.release()
        await self._refresher.close()

    async def _elect_loop(self) -> None:
        while True:
            await self._clock.sleep(self._share.renew_seconds)
            leading = await self._elector.tick()
            if leading:
                if self._role != LEADER:
                    self._set_role(LEADER, "elected")
                    self._refresher.resume()  # from the adopted token: refresh at its time, not at once
            elif self._role == LEADER or (self._role == FOLLOWER and not self._usable()):
                if not self._adopt_shared():
                    self._fall_back()

    # -- roles ---------------------------------------------------------------------------------------------------

    def _set_role(self, role: str, why: str) -> None:
        if role == self._role:
            return
        previous, self._role = self._role, role
        for name, gauge in self._role_gauges.items():
            gauge.set(1 if name == role else 0)
        if previous:
            self._transitions.inc()
        level = logging.WARNING if role == FALLBACK else logging.INFO
        event(log, level, "share_role", route=self._route, role=role, previous=previous or None, why=why)

    def _fall_back(self) -> None:
        self._set_role(FALLBACK, self._why_unusable())
        self._refresher.resume()

    def _usable(self) -> bool:
        shared = self._shared
        if not isinstance(shared, SharedToken) or shared.token.value == self._rejected:
            return False
        return self._clock.time() < min(shared.stale_after + self._share.lease_seconds, shared.token.expires_at or 0)

    def _why_unusable(self) -> str:
        shared = self._shared
        if shared is None:
            return "no shared token"
        if isinstance(shared, str):
            return shared
        if shared.token.value == self._rejected:
            return "the upstream refused the shared token"
        return "the shared token is stale"

    def _adopt_shared(self) -> bool:
        """Become (or stay) a follower with the shared token, if it is usable; False otherwise."""
        if self._elector.leading or not self._usable():
            return False
        assert isinstance(self._shared, SharedToken)
        installed = self._refresher.token
        if installed is None or installed.value != self._shared.token.value:
            why = self._refresher.adopt(self._shared.token)
            if why is not None:
                self._last_error = why
                return False
        self._last_error = None
        self._refresher.pause()
        self._set_role(FOLLOWER, f"token from {self._shared.holder}")
        return True

    def _deliver(self, content: Content) -> None:
        """A new state of the Secret (from the watch)."""
        self._shared = content
        self._arrived.set()
        if self._role in (FOLLOWER, FALLBACK) and not self._adopt_shared() and self._role == FOLLOWER:
            self._fall_back()

    # -- the leader's writes -------------------------------------------------------------------------------------

    def _fetched(self, token: Token) -> None:
        """The refresher fetched a token: publish it if we lead (latest wins; one writer at a time)."""
        if not self._elector.leading:
            return
        self._pending = (token, self._clock.time())
        if self._publishing is None or self._publishing.done():
            self._publishing = asyncio.create_task(self._publish(), name=f"share:{self._route}")

    async def _publish(self) -> None:
        while self._pending is not None:
            (token, fetched_at), self._pending = self._pending, None
            try:
                await self._write(token, fetched_at)
            except KubeUnavailable as exc:
                self._last_error = exc.reason
                event(log, logging.WARNING, "share_write_failed", route=self._route, reason=exc.reason)

    async def _write(self, token: Token, fetched_at: float) -> None:
        for _ in range(3):
            if not await self._elector.verify():
                event(log, logging.INFO, "share_write_skipped", route=self._route, why="not the lease holder")
                return
            content, version = await self._secrets.get()
            if isinstance(content, SharedToken) and (
                content.term > self._elector.term or (content.token.expires_at or 0) > (token.expires_at or 0)
            ):
                event(log, logging.INFO, "share_write_skipped", route=self._route, why="a newer token is there")
                return
            shared = SharedToken(
                token=token, fetched_at=fetched_at, holder=self._elector.identity, term=self._elector.term
            )
            try:
                await self._secrets.write(encode(shared), version)
            except Conflict:
                continue  # another writer since we read: look again
            self._shared = shared
            self._last_error = None
            event(log, logging.DEBUG, "share_written", route=self._route, term=shared.term)
            return


# -- the official client ---------------------------------------------------------------------------------------


def build_shared(
    *, route: str, share: Share, refresher: Refresher, kube: KubeApi, timeout: float, metrics: Metrics, clock: Clock
) -> SharedTokenProvider:
    """The provider for a route with `share`, talking to the API server `kube` points at."""
    settings = kube.settings
    identity = settings.pod_name or f"{socket.gethostname()}-{os.getpid()}"
    return SharedTokenProvider(
        route=route,
        share=share,
        refresher=refresher,
        elector=Elector(
            store=KubeLeaseStore(kube=kube, name=share.lease, timeout=timeout),
            identity=identity,
            lease_seconds=share.lease_seconds,
            renew_seconds=share.renew_seconds,
            clock=clock,
        ),
        secrets=KubeSecretStore(kube=kube, name=share.secret, route=route, timeout=timeout),
        metrics=metrics,
        clock=clock,
    )


class KubeSecretStore:
    """A SecretStore over the official client (proxy/kube/client.py): calls in threads; the watch in a
    WorkerThread whose stream is shut down on stop."""

    def __init__(self, *, kube: KubeApi, name: str, route: str, timeout: float, watch_seconds: int = 300) -> None:
        self._kube = kube
        self._name = name
        self._route = route
        self._timeout = timeout
        self._watch_seconds = watch_seconds
        self._worker: WorkerThread | None = None

    async def _call(self, verb: str, func: Callable[[Any, str, float], Any]) -> Any:
        kube = self._kube
        return await store_call(
            kube.core, kube, verb=verb, what=f"secret {self._name}", seconds=self._timeout, func=func
        )

    async def get(self) -> tuple[Content, str | None]:
        name = self._name
        obj = await self._call("get", lambda api, ns, t: api.read_namespaced_secret(name, ns, _request_timeout=t))
        if obj is None:
            return None, None
        return decode(obj.data), obj.metadata.resource_version

    async def write(self, data: dict[str, str], resource_version: str | None) -> None:
        name = self._name
        labels = {"app.kubernetes.io/managed-by": MANAGED_BY, ROUTE_LABEL: self._route}
        meta = k8s.V1ObjectMeta(name=name, labels=labels, resource_version=resource_version)
        body = k8s.V1Secret(metadata=meta, type="Opaque", data=data)
        if resource_version is None:
            await self._call("create", lambda api, ns, t: api.create_namespaced_secret(ns, body, _request_timeout=t))
        else:
            await self._call(
                "update", lambda api, ns, t: api.replace_namespaced_secret(name, ns, body, _request_timeout=t)
            )

    def watch(self, deliver: Callable[[Content], None]) -> None:
        loop = asyncio.get_running_loop()

        def target(worker: WorkerThread) -> None:
            try:
                self._watch_forever(worker, lambda content: post(loop, deliver, content))
            except BaseException:  # never die with a traceback in a thread
                log.debug("the shared Secret watch ended", exc_info=True)

        worker = WorkerThread(target, name=f"share-watch:{self._route}")
        worker.start()
        self._worker = worker

    async def close(self) -> None:
        if self._worker is not None:
            await self._worker.stop(join_seconds=2.0)
            self._worker = None

    def _watch_forever(self, worker: WorkerThread, put: Callable[[Content], object]) -> None:
        version: str | None = None
        failures = 0
        while not worker.stopping:
            try:
                core, namespace = self._kube.core(), self._kube.namespace
                if version is None:  # list: the state now, and where to watch from
                    secret, version = list_secret(core, namespace, self._name, request_timeout=self._timeout)
                    put(decode(secret.data) if secret is not None else None)
                with watch_secret(
                    worker,
                    core,
                    namespace,
                    self._name,
                    version,
                    timeout_seconds=self._watch_seconds,
                    request_timeout=(self._timeout, self._watch_seconds + self._timeout),
                ) as events:
                    for kind, obj in events:
                        if kind == "ERROR":
                            version = None  # 410 Expired (or worse): relist
                            break
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        if kind in ("ADDED", "MODIFIED"):
                            put(decode(obj.get("data")))
                        elif kind == "DELETED":
                            put(None)
                failures = 0
            except Exception as exc:
                version = None
                failures += 1
                if api_error(exc, verb="watch", what="secret").status != 410:
                    worker.wait(min(30.0, 0.2 * 2**failures))
