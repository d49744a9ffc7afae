"""Real servers on 127.0.0.1 for tests: an aiohttp app on a free port, the proxy factory's type, and the
Kubernetes API stand-in's namespace and service account."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.app import ProxyService

# The Kubernetes API stand-in (proxy/emulator/kube.py): its namespace and the proxy's service account user there.
KUBE_NS = "ml"
KUBE_SA = f"system:serviceaccount:{KUBE_NS}:aml-auth-proxy"

ProxyFactory = Callable[..., Awaitable[ProxyService]]


async def start_app(app: web.Application, *, host: str = "127.0.0.1", **site_kw: Any) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, **site_kw)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    scheme = "https" if site_kw.get("ssl_context") else "http"
    return runner, f"{scheme}://127.0.0.1:{port}"
