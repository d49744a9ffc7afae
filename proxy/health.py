"""The admin port: /healthz (the event loop answers), /readyz (every route has a usable credential), /metrics,
POST /refresh?route=NAME, and POST /quitquitquit (the graceful shutdown SIGTERM starts, asked for by the app of a
Job whose proxy is a plain container: kubelet stops only native sidecars by itself).

It runs on the proxy's own HTTP/1.1 server (proxy/server.py), like the proxy port, so the proxy process does not
load aiohttp's web framework for five fixed paths. Nothing here is per-request data or secret: readiness reasons
name routes, slots and file problems only; errors are JSON with a request id.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from proxy.forwarding import RouteRuntime
from proxy.headers import REQUEST_ID, http_date, new_request_id
from proxy.logs import event
from proxy.metrics import Metrics
from proxy.server import Request


class WorkerView(Protocol):
    """What the admin port and the shutdown use of the worker pool (proxy/workers.py WorkerPool), when there is
    one: the pool is built above this module, so it is known here by this shape only."""

    def status(self) -> dict[str, int]: ...

    def collector(self, registry: CollectorRegistry) -> Collector: ...

    def push_changes(self) -> None: ...

    async def stop(self, grace: float) -> None: ...


log = logging.getLogger("aml_auth_proxy.health")

_JSON = "application/json; charset=utf-8"


@dataclass(eq=False)
class Lifecycle:
    """Process-wide state the probes read."""

    shutting_down: bool = False
    workers: WorkerView | None = None  # the worker processes, when `workers` > 1 (this is the primary)
    # route -> why its credential task is down (proxy/app.py restarts it): the route is unready meanwhile
    failed_tasks: dict[str, str] = field(default_factory=dict)
    # What POST /quitquitquit calls to start the shutdown (proxy/app.py: the same path as SIGTERM); None: not offered
    request_stop: Callable[[], None] | None = None


def readiness(routes: Sequence[RouteRuntime], lifecycle: Lifecycle) -> tuple[bool, dict[str, object]]:
    not_ready: dict[str, str] = {}
    detail: dict[str, object] = {}
    for rt in routes:
        ok, why = rt.provider.readiness()
        failed = lifecycle.failed_tasks.get(rt.name)
        if failed is not None:
            ok, why = False, failed if ok else f"{failed}; {why}"
        rt.metrics.ready.set(1 if ok else 0)
        detail[rt.name] = {"ready": ok, "reason": why, **rt.provider.details()}
        if not ok:
            not_ready[rt.name] = why
    ready = not not_ready and not lifecycle.shutting_down
    body: dict[str, object] = {"ready": ready, "not_ready": not_ready, "routes": detail}
    if lifecycle.shutting_down:
        body["shutting_down"] = True
    if lifecycle.workers is not None:
        # Informational: the primary serves the port and every credential, so it decides readiness; a missing
        # worker is restarted and only lowers capacity.
        body["workers"] = lifecycle.workers.status()
    return ready, body


AdminAnswer = tuple[int, list[tuple[str, str]], bytes]


def _json(status: int, body: object, *, rid: str | None = None) -> AdminAnswer:
    headers = [("Content-Type", _JSON), ("Date", http_date())]
    if rid is not None:
        headers.append((REQUEST_ID, rid))
    return status, headers, json.dumps(body).encode()


def _error(status: int, error: str, **extra: object) -> AdminAnswer:
    rid = new_request_id()
    return _json(status, {"error": error, **extra, "request_id": rid}, rid=rid)


def _from_loopback(request: Request) -> bool:
    """The caller is on this host (127.0.0.0/8, ::1, or an IPv4-mapped loopback address)."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(str(peer[0]).partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class AdminHandler:
    """The admin port's handler for proxy/server.py's HttpServer: five fixed paths, nothing else."""

    def __init__(
        self,
        *,
        routes: Sequence[RouteRuntime],
        metrics: Metrics,
        lifecycle: Lifecycle,
        allow_remote_refresh: bool = False,
    ) -> None:
        self.routes = routes
        self.allow_remote_refresh = allow_remote_refresh
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.by_name = {rt.name: rt for rt in routes}
        get = ("GET", "HEAD")
        self.paths: dict[str, tuple[tuple[str, ...], Callable[[str], AdminAnswer | Awaitable[AdminAnswer]]]] = {
            "/healthz": (get, self.healthz),
            "/readyz": (get, self.readyz),
            "/metrics": (get, self.metrics_text),
            "/refresh": (("POST",), self.refresh),
            "/quitquitquit": (("POST",), self.quitquitquit),
        }

    def refusal(self, status: int, reason: str) -> tuple[list[tuple[str, str]], bytes]:
        """The answer to a request the server's parser refused (fixed reasons, never the request's bytes)."""
        _, headers, body = _error(status, f"bad request: {reason}")
        return headers, body

    def __call__(self, request: Request) -> Awaitable[None] | None:
        path, _, query = request.raw_path.partition("?")
        known = self.paths.get(path)
        if known is None:
            self._send(request, _error(404, "not found", paths=sorted(self.paths)))
            return None
        methods, handler = known
        if request.method not in methods:
            status, headers, body = _error(405, f"{path} takes {' or '.join(methods)}")
            self._send(request, (status, [*headers, ("Allow", ", ".join(methods))], body))
            return None
        if path == "/refresh" and not self.allow_remote_refresh and not _from_loopback(request):
            reason = "POST /refresh is accepted from loopback only; admin.allow_remote_refresh opens it"
            self._send(request, _error(403, reason))
            return None
        if path == "/quitquitquit" and not _from_loopback(request):
            # Always: anyone who can reach the admin port (it listens on 0.0.0.0 for the probes) could stop the proxy.
            self._send(request, _error(403, "POST /quitquitquit is accepted from loopback only: it stops the proxy"))
            return None
        result = handler(query)
        if isinstance(result, tuple):
            self._send(request, result)
            return None
        return self._later(request, result)

    async def _later(self, request: Request, result: Awaitable[AdminAnswer]) -> None:
        self._send(request, await result)

    @staticmethod
    def _send(request: Request, answer: AdminAnswer) -> None:
        status, headers, body = answer
        request.answer(status, headers, body)

    def healthz(self, _query: str) -> AdminAnswer:
        return _json(200, {"status": "ok"})

    def readyz(self, _query: str) -> AdminAnswer:
        ready, body = readiness(self.routes, self.lifecycle)
        return _json(200 if ready else 503, body)

    def metrics_text(self, _query: str) -> AdminAnswer:
        pool = self.lifecycle.workers
        source = self.metrics.registry if pool is None else pool.collector(self.metrics.registry)  # all processes
        return 200, [("Content-Type", CONTENT_TYPE_LATEST), ("Date", http_date())], generate_latest(source)

    def quitquitquit(self, _query: str) -> AdminAnswer:
        """Start the graceful shutdown, as SIGTERM does: 202 now, then readiness off, the drain within
        shutdown_grace_seconds, exit 0. The stop is scheduled after this answer is written."""
        stop = self.lifecycle.request_stop
        if stop is None:
            return _error(503, "POST /quitquitquit is not available in this process (nothing to stop)")
        rid = new_request_id()
        event(log, logging.INFO, "quit_requested", request_id=rid)
        self.lifecycle.shutting_down = True  # unready from this answer on, before the signal is even handled
        asyncio.get_running_loop().call_soon(stop)
        return _json(202, {"shutting_down": True, "request_id": rid}, rid=rid)

    async def refresh(self, query: str) -> AdminAnswer:
        """Force one refresh of a route's credential (joins one already in flight)."""
        names = parse_qs(query).get("route") or [""]
        rt = self.by_name.get(names[0])
        if rt is None:
            return _error(404, "unknown route; pass ?route=NAME", routes=sorted(self.by_name))
        await rt.provider.refresh_now("operator")
        if self.lifecycle.workers is not None:
            self.lifecycle.workers.push_changes()  # workers get the new credential now, not at the next check
        ok, why = rt.provider.readiness()
        return _json(200 if ok else 503, {"route": rt.name, "ready": ok, "reason": why, **rt.provider.details()})
