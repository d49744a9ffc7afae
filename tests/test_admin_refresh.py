"""POST /refresh on the admin port is accepted from loopback only unless `admin.allow_remote_refresh` opens it:
forcing refreshes from the network is a way to get the pod's identity throttled by the control plane."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from proxy.config.reader import parse
from proxy.health import AdminHandler, Lifecycle
from proxy.metrics import Metrics
from tests.support.servers import ProxyFactory
from tests.support.session import new_key


class FakeTransport:
    def __init__(self, peer: tuple[Any, ...] | None) -> None:
        self.peer = peer

    def get_extra_info(self, name: str) -> Any:
        return self.peer if name == "peername" else None


class FakeRequest:
    """What AdminHandler reads of a request, and the answer it gives."""

    def __init__(self, peer: tuple[Any, ...] | None, path: str = "/refresh?route=nope") -> None:
        self.raw_path = path
        self.method = "POST"
        self.transport = FakeTransport(peer)
        self.answers: list[tuple[int, dict[str, Any]]] = []

    def answer(self, status: int, headers: list[tuple[str, str]], body: bytes = b"", **_: Any) -> None:
        self.answers.append((status, json.loads(body)))


def handler(*, allow: bool = False) -> AdminHandler:
    return AdminHandler(
        routes=[], metrics=Metrics(CollectorRegistry()), lifecycle=Lifecycle(), allow_remote_refresh=allow
    )


async def answer(h: AdminHandler, request: FakeRequest) -> tuple[int, dict[str, Any]]:
    pending = h(request)  # type: ignore[arg-type]
    if pending is not None:
        await pending
    (got,) = request.answers
    return got


@pytest.mark.parametrize(
    "peer",
    [("10.1.2.3", 40000), ("192.168.0.7", 40000), ("2001:db8::1", 40000, 0, 0), ("::ffff:10.0.0.1", 1, 0, 0), None],
    ids=["pod network", "private", "IPv6", "IPv4-mapped", "unknown peer"],
)
async def test_refresh_from_beyond_loopback_is_refused_with_a_json_403(peer: tuple[Any, ...] | None) -> None:
    status, body = await answer(handler(), FakeRequest(peer))
    assert status == 403 and "loopback only" in body["error"] and body["request_id"]


@pytest.mark.parametrize(
    "peer",
    [("127.0.0.1", 1), ("127.8.9.10", 1), ("::1", 1, 0, 0), ("::ffff:127.0.0.1", 1, 0, 0)],
    ids=["127.0.0.1", "127/8", "::1", "IPv4-mapped loopback"],
)
async def test_refresh_from_loopback_goes_through(peer: tuple[Any, ...]) -> None:
    status, body = await answer(handler(), FakeRequest(peer))
    assert status == 404 and body["error"].startswith("unknown route")  # past the check: the route is looked up


async def test_allow_remote_refresh_opens_it_and_the_other_paths_are_open_anyway() -> None:
    status, _ = await answer(handler(allow=True), FakeRequest(("10.1.2.3", 1)))
    assert status == 404
    request = FakeRequest(("10.1.2.3", 1), "/healthz")
    request.method = "GET"
    assert (await answer(handler(), request))[0] == 200
    route = {"upstream": "http://127.0.0.1:1", "auth": {"primary_file": "/k"}}
    settings = parse({"admin": {"allow_remote_refresh": True}, "routes": [route]}, {})
    assert settings.admin_allow_remote_refresh is True
    default = parse({"routes": [route]}, {})
    assert default.admin_allow_remote_refresh is False


async def test_refresh_over_loopback_refreshes_the_route(make_proxy: ProxyFactory, key_dir: Any) -> None:
    svc = await make_proxy({"name": "r", "upstream": "http://127.0.0.1:9", "auth": key_dir(new_key("refresh"))})
    url = f"http://127.0.0.1:{svc.admin_port}/refresh?route=r"
    async with aiohttp.ClientSession() as client, client.post(url) as resp:
        assert resp.status == 200, await resp.text()
