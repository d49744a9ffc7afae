"""The admin app: /healthz (the event loop answers), /readyz (every route has a usable credential), /metrics.

Nothing here is per-request data or secret: readiness reasons name routes, slots and file problems only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.forwarding import RouteRuntime
from proxy.metrics import Metrics

if TYPE_CHECKING:
    from proxy.workers import WorkerPool


@dataclass(eq=False)
class Lifecycle:
    """Process-wide state the probes read."""

    shutting_down: bool = False
    workers: WorkerPool | None = None  # the worker processes, when `workers` > 1 (this is the primary)


def readiness(routes: Sequence[RouteRuntime], lifecycle: Lifecycle) -> tuple[bool, dict[str, object]]:
    not_ready: dict[str, str] = {}
    detail: dict[str, object] = {}
    for rt in routes:
        ok, why = rt.provider.readiness()
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


def create_admin_app(*, routes: Sequence[RouteRuntime], metrics: Metrics, lifecycle: Lifecycle) -> web.Application:
    by_name = {rt.name: rt for rt in routes}

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ready, body = readiness(routes, lifecycle)
        return web.Response(status=200 if ready else 503, text=json.dumps(body), content_type="application/json")

    async def metrics_handler(_request: web.Request) -> web.Response:
        pool = lifecycle.workers
        source = metrics.registry if pool is None else pool.collector(metrics.registry)  # totals of all processes
        return web.Response(body=generate_latest(source), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def refresh(request: web.Request) -> web.Response:
        """Force one refresh of a route's credential (joins one already in flight)."""
        name = request.query.get("route")
        rt = by_name.get(name or "")
        if rt is None:
            return web.json_response(
                {"error": "unknown route; pass ?route=NAME", "routes": sorted(by_name)}, status=404
            )
        await rt.provider.refresh_now("operator")
        if lifecycle.workers is not None:
            lifecycle.workers.push_changes()  # workers get the new credential now, not at the next check
        ok, why = rt.provider.readiness()
        return web.json_response(
            {"route": rt.name, "ready": ok, "reason": why, **rt.provider.details()}, status=200 if ok else 503
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_post("/refresh", refresh)
    return app
