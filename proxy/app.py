"""Wiring: the only module that builds everything.

`ProxyService` owns the proxy port (proxy/server.py: one catch-all handler, no router), the admin port (the same
server with proxy/health.py's handler), each route's upstream pool and credential task, and the shutdown order:
readiness off, stop listening, let in-flight requests finish within the grace period, then release everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from proxy.clock import Clock, SystemClock
from proxy.config.settings import (
    AmlEndpointTokenAuth,
    AmlKeysAuth,
    AmlServiceTokenAuth,
    JwtFileAuth,
    KeyAuth,
    Listen,
    MlServerAuth,
    Route,
    Settings,
    placeholder_for,
)
from proxy.credentials.base import CredentialProvider
from proxy.credentials.keys import KeyFileProvider
from proxy.credentials.mlserver import MlServerSource
from proxy.credentials.secret_keys import SecretKeyProvider
from proxy.credentials.tokens import TokenSource
from proxy.events import CREDENTIAL_TASK_FAILED, NO_EVENTS, EventSink
from proxy.forwarding import ProxyHandler, Router, RouteRuntime
from proxy.health import AdminHandler, Lifecycle
from proxy.logs import AccessLog, event
from proxy.metrics import Metrics, RouteMetrics
from proxy.refresher import Refresher
from proxy.server import HttpServer
from proxy.workers import METRICS_INTERVAL, WorkerChannel, snapshot

if TYPE_CHECKING:
    from proxy.kube.client import KubeApi
    from proxy.kube.runtime import KubeRuntime

log = logging.getLogger("aml_auth_proxy.app")

# A route's credential task (its provider's `run`) that dies is restarted after RESTART_INITIAL_SECONDS, doubling
# up to RESTART_MAX_SECONDS while it keeps dying; one that ran RESTART_STABLE_SECONDS before dying starts over.
RESTART_INITIAL_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
RESTART_STABLE_SECONDS = 60.0


def _sigterm_self() -> None:
    """POST /quitquitquit: the process sends itself SIGTERM, so whatever runs the service (proxy/cli.py `serve`)
    stops it exactly as it does for kubelet's SIGTERM: readiness off, the workers told, the drain, exit 0."""
    os.kill(os.getpid(), signal.SIGTERM)


def _guard(task: asyncio.Task[None], *, route: str) -> None:
    """The supervisor of a credential task never ends by itself: if it does, that is a bug; say so loudly."""
    if task.cancelled():
        return
    exc = task.exception()
    event(log, logging.CRITICAL, "background_task_ended", route=route, error_type=type(exc).__name__ if exc else None)


def _failure(exc: BaseException | None) -> tuple[str, str | None]:
    """The error's type and where it was raised (file:line in function), never its message, which may hold anything.
    An exception group (a task group's) is named by its first exception."""
    if exc is None:
        return "the task returned", None
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    tb = exc.__traceback__
    if tb is None:
        return type(exc).__name__, None
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return type(exc).__name__, f"{os.path.basename(code.co_filename)}:{tb.tb_lineno} in {code.co_name}"


def build_provider(
    route: Route,
    *,
    metrics: Metrics,
    route_metrics: RouteMetrics,
    clock: Clock,
    kube: KubeApi | None = None,
    events: EventSink = NO_EVENTS,
    kube_runtime: KubeRuntime | None = None,
) -> CredentialProvider:
    """The credential provider for one route: key files, or a refresher around the kind's token source (shared
    across replicas through the Kubernetes API when the route has `share`)."""
    auth = route.auth
    if isinstance(auth, KeyAuth):
        if auth.primary_secret_ref is not None and kube_runtime is not None:
            feeds = kube_runtime.feeds(route.name, auth.secret_refs())
            return SecretKeyProvider(route=route.name, auth=auth, metrics=route_metrics, feeds=feeds, events=events)
        return KeyFileProvider(route=route.name, auth=auth, metrics=route_metrics, events=events)
    source: TokenSource
    if isinstance(auth, MlServerAuth):
        source = MlServerSource(auth=auth, base_url=auth.url or str(route.upstream.origin()), clock=clock)
    elif isinstance(auth, JwtFileAuth):
        from proxy.credentials.jwt_file import JwtFileSource  # pyjwt loads cryptography: about 8 MiB, paid here only

        source = JwtFileSource(auth=auth)
    else:
        # Imported here: azure-identity costs several MiB of memory, paid only by routes with an Azure identity.
        from proxy.credentials.aml import AadSource, AmlEndpointTokenSource, AmlKeysSource, AmlServiceTokenSource
        from proxy.credentials.identity import AzureIdentity

        ref = auth.identity.client_secret_ref
        identity = AzureIdentity(
            config=auth.identity,
            ca_file=auth.ca_file,
            metrics=metrics,
            timeout=auth.refresh.timeout_seconds,
            secret_feed=kube_runtime.feeds(route.name, [ref])[ref.name] if ref and kube_runtime else None,
        )
        if isinstance(auth, AmlServiceTokenAuth):
            source = AmlServiceTokenSource(auth=auth, identity=identity, clock=clock)
        elif isinstance(auth, AmlEndpointTokenAuth):
            source = AmlEndpointTokenSource(auth=auth, identity=identity, clock=clock)
        elif isinstance(auth, AmlKeysAuth):
            source = AmlKeysSource(auth=auth, identity=identity, clock=clock)
        else:
            source = AadSource(auth=auth, identity=identity, clock=clock)
    refresher = Refresher(
        route=route.name,
        source=source,
        header=auth.header,
        template=auth.template,
        placeholder=placeholder_for(auth.type),
        policy=auth.refresh,
        metrics=route_metrics,
        clock=clock,
        events=events,
    )
    if route.share is None or kube is None:
        return refresher
    from proxy.kube.share import build_shared  # the kubernetes client loads only when a route shares

    return build_shared(
        route=route.name,
        share=route.share,
        refresher=refresher,
        kube=kube,
        timeout=auth.refresh.timeout_seconds,
        metrics=metrics,
        clock=clock,
    )


class ProxyService:
    """The running proxy: build with settings, `await start()`, later `await stop()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
        provider_factory: Callable[[Route, RouteMetrics], CredentialProvider] | None = None,
        admin: bool = True,
        reuse_port: bool = False,
    ) -> None:
        """`provider_factory` replaces build_provider (a worker process: credentials come from the primary, and
        nothing Kubernetes runs); `admin=False` serves no admin port; `reuse_port` binds the proxy port with
        SO_REUSEPORT so worker processes can share it (proxy/workers.py)."""
        self.settings = settings
        self.metrics = Metrics(registry)
        # Only the process with the admin port (the primary) can be asked to quit; it stops its workers itself.
        self.lifecycle = Lifecycle(request_stop=_sigterm_self if admin else None)
        self.routes: list[RouteRuntime] = []
        self.clock = clock or SystemClock()
        self._admin = admin
        self._reuse_port = reuse_port
        self.kube: KubeApi | None = None
        self.kube_runtime: KubeRuntime | None = None
        if provider_factory is None and settings.uses_kubernetes():
            # Imported only here: the kubernetes client costs about 15 MiB of memory, paid only when used.
            from proxy.kube.client import KubeApi
            from proxy.kube.runtime import KubeRuntime

            self.kube = KubeApi(settings.kubernetes) if any(r.share for r in settings.routes) else None
            self.kube_runtime = KubeRuntime.build(settings, api=self.kube, metrics=self.metrics, clock=self.clock)
            self.kube = self.kube_runtime.api if self.kube_runtime is not None else self.kube
        events = self.kube_runtime.events if self.kube_runtime is not None else NO_EVENTS
        self._events = events
        for route in settings.routes:
            rm = self.metrics.for_route(route.name, region=route.region, kind=route.auth.type)
            if provider_factory is not None:
                provider = provider_factory(route, rm)
            else:
                provider = build_provider(
                    route,
                    metrics=self.metrics,
                    route_metrics=rm,
                    clock=self.clock,
                    kube=self.kube,
                    events=events,
                    kube_runtime=self.kube_runtime,
                )
            self.routes.append(RouteRuntime(config=route, provider=provider, metrics=rm))
        self.handler = ProxyHandler(
            router=Router(self.routes),
            metrics=self.metrics,
            access_log=AccessLog() if settings.access_log else None,
            limits=settings.limits,
        )
        self.admin_handler = AdminHandler(
            routes=self.routes,
            metrics=self.metrics,
            lifecycle=self.lifecycle,
            allow_remote_refresh=settings.admin_allow_remote_refresh,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._proxy_server: HttpServer | None = None
        self._admin_server: HttpServer | None = None
        self.proxy_port = 0
        self.admin_port = 0

    async def start(self) -> None:
        """Load credentials, then listen. The first credential is loaded before any port reports ready."""
        s = self.settings
        if self._admin:
            self._admin_server = HttpServer(self.admin_handler, self.admin_handler.refusal, s.limits)
            self.admin_port = await self._admin_server.listen(s.admin.host, s.admin.port, backlog=128)
        if self.kube_runtime is not None:
            await self.kube_runtime.start()  # Secret watches first: key routes wait for their first read
        for rt in self.routes:
            rt.pool = rt.make_pool()
            await rt.provider.start()
            task = asyncio.create_task(self._supervise(rt), name=f"credentials:{rt.name}")
            task.add_done_callback(functools.partial(_guard, route=rt.name))
            self._tasks.append(task)
        self._proxy_server = HttpServer(self.handler, self.handler.refusal, s.limits)
        self.proxy_port = await self._proxy_server.listen(
            s.listen.host, s.listen.port, backlog=1024, reuse_port=self._reuse_port
        )
        if not self._admin:
            return  # a worker process: proxy/workers.py logs its own start
        event(
            log,
            logging.INFO,
            "started",
            listen=f"{s.listen.host}:{self.proxy_port}",
            admin=f"{s.admin.host}:{self.admin_port}",
            routes=[rt.name for rt in self.routes],
        )

    async def _supervise(self, rt: RouteRuntime) -> None:
        """Run the route's credential task for the life of the service. When it dies the route turns unready with
        the error named (in /readyz), a Kubernetes Event says so, and the task is restarted with capped backoff.
        The credential already loaded stays in use meanwhile, until it expires like any other."""
        delay = RESTART_INITIAL_SECONDS
        last: str | None = None
        while True:
            started = self.clock.time()
            try:
                await rt.provider.run()
                error, where = _failure(None)
            except Exception as exc:
                error, where = _failure(exc)
            if self.clock.time() - started >= RESTART_STABLE_SECONDS:
                delay, last = RESTART_INITIAL_SECONDS, None
            reason = f"credential task failed: {error}; restarting with backoff"
            self.lifecycle.failed_tasks[rt.name] = reason
            rt.metrics.ready.set(0)
            event(
                log,
                logging.ERROR if error != last else logging.DEBUG,  # a crash loop: one line, not one per restart
                "credential_task_failed",
                route=rt.name,
                error_type=error,
                where=where,
                restart_in=delay,
            )
            last = error
            self._events.emit(
                warning=True,
                reason=CREDENTIAL_TASK_FAILED,
                message=f"route {rt.name}: the credential task failed with {error}; restarting with backoff",
            )
            await self.clock.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_SECONDS)
            del self.lifecycle.failed_tasks[rt.name]
            ready, _ = rt.provider.readiness()
            rt.metrics.ready.set(1 if ready else 0)
            event(log, logging.INFO, "credential_task_restarted", route=rt.name)

    async def stop(self) -> None:
        """Graceful stop: unready at once, refuse new connections, drain within the grace period."""
        self.lifecycle.shutting_down = True
        event(
            log,
            logging.INFO,
            "shutting_down",
            in_flight=self.handler.in_flight,
            grace_seconds=self.settings.shutdown_grace_seconds,
        )
        drains = []
        if self.lifecycle.workers is not None:  # forward SIGTERM; workers drain alongside this process
            drains.append(self.lifecycle.workers.stop(self.settings.shutdown_grace_seconds))
        if self._proxy_server is not None:
            # closes the listener, then waits for the requests in progress
            drains.append(self._proxy_server.shutdown(self.settings.shutdown_grace_seconds))
        await asyncio.gather(*drains)
        self._proxy_server = None
        if self.handler.access_log is not None:
            self.handler.access_log.flush()  # the lines of the last requests, batched by time
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for rt in self.routes:
            await rt.provider.close()
            if rt.pool is not None:
                await rt.pool.close()
                rt.pool = None
        if self.kube is not None:
            self.kube.close()
        if self.kube_runtime is not None:
            await self.kube_runtime.stop()
        if self._admin_server is not None:
            await self._admin_server.shutdown(0.5)  # probes and scrapes answer quickly; one in progress may finish
            self._admin_server = None
        if self._admin:
            event(log, logging.INFO, "stopped")


async def run_worker(settings: Settings, *, fd: int, port: int, index: int) -> int:
    """A worker process: serve the proxy port with credentials from the primary until SIGTERM or the primary goes."""
    channel = await WorkerChannel.open(fd, settings.routes)
    reading = asyncio.create_task(channel.read(), name="worker:channel")

    def provider(route: Route, _rm: RouteMetrics) -> CredentialProvider:
        return channel.providers[route.name]

    settings = dataclasses.replace(settings, listen=Listen(host=settings.listen.host, port=port))
    service = ProxyService(settings, provider_factory=provider, admin=False, reuse_port=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def first_push() -> None:  # every route's state before listening: no 503 for want of a push
        for p in channel.providers.values():
            await p.received.wait()

    received = asyncio.ensure_future(first_push())
    closed = asyncio.ensure_future(channel.closed.wait())
    await asyncio.wait([received, closed], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    received.cancel()
    closed.cancel()
    if channel.closed.is_set() or stop.is_set():
        return 0
    try:
        await service.start()
    except OSError as exc:
        event(log, logging.ERROR, "start_failed", worker=index, reason=str(exc))
        await service.stop()
        return 1
    channel.send({"t": "listening"})
    event(log, logging.INFO, "worker_started", worker=index, pid=os.getpid(), listen=f"{settings.listen.host}:{port}")

    async def report() -> None:
        while True:
            await asyncio.sleep(METRICS_INTERVAL)
            channel.send({"t": "metrics", "samples": snapshot(service.metrics.registry)})

    reporting = asyncio.create_task(report(), name="worker:metrics")
    gone = asyncio.ensure_future(channel.closed.wait())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([gone, stopped], return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    stopped.cancel()
    if channel.closed.is_set():
        event(log, logging.WARNING, "primary_gone", worker=index)
    await service.stop()
    reporting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reporting
    channel.send({"t": "metrics", "samples": snapshot(service.metrics.registry)})
    with contextlib.suppress(ConnectionError):
        await channel.writer.drain()
    channel.writer.close()
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    event(log, logging.INFO, "worker_stopped", worker=index, pid=os.getpid())
    return 0
