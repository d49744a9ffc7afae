"""Nobody gets in where they don't belong: no other host, no other route, no caller credential, no admin app on
the proxy port, and nothing secret or per-request on the admin port. Raw sockets where a client library would
normalise the attack away."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from tests.support.servers import ProxyFactory
from tests.support.session import new_key
from tests.support.wire import exchange


@pytest.fixture
async def two_routes(serve: Callable[..., Awaitable[str]], make_proxy: ProxyFactory, key_dir: Any) -> Any:
    seen: dict[str, list[tuple[str, str, list[tuple[str, str]]]]] = {"a": [], "b": []}

    def recorder(name: str) -> web.Application:
        async def record(request: web.Request) -> web.Response:
            seen[name].append((request.method, request.raw_path, list(request.headers.items())))
            return web.Response(text=name)

        app = web.Application()
        app.router.add_route("*", "/{t:.*}", record)
        return app

    key = new_key("boundary")
    keys = key_dir(key)
    svc = await make_proxy(
        {"name": "a", "match": "/a", "upstream": await serve(recorder("a")), "auth": keys},
        {"name": "b", "match": "/b", "upstream": await serve(recorder("b")), "auth": keys},
    )
    svc.seen = seen
    svc.key = key
    return svc


def get(target: str, host: str = "a") -> bytes:
    """A GET of `target`, as the request line says it, after which the connection closes."""
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("http://169.254.169.254/metadata/identity/oauth2/token", "169.254.169.254"),
        ("https://evil.example/a/x", "evil.example"),
        ("//evil.example/a/x", "evil.example"),
        ("evil.example:443", "evil.example:443"),
        ("*", "a"),
    ],
)
async def test_no_target_reaches_another_host(two_routes: Any, target: str, host: str) -> None:
    answer = await exchange(two_routes.proxy_port, get(target, host))
    assert status(answer) in (400, 404), answer[:120]
    assert two_routes.seen == {"a": [], "b": []}


@pytest.mark.parametrize("target", ["http://169.254.169.254/x", "https://evil.example/", "evil.example:443", "*"])
async def test_non_origin_targets_get_400_even_behind_a_catch_all_route(
    serve: Any, make_proxy: ProxyFactory, key_dir: Any, target: str
) -> None:
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.Response(text="reached")

    app = web.Application()
    app.router.add_route("*", "/{t:.*}", record)
    svc = await make_proxy({"name": "all", "match": "/", "upstream": await serve(app), "auth": key_dir(new_key("all"))})
    answer = await exchange(svc.proxy_port, get(target))
    assert status(answer) == 400, answer[:120]
    assert seen == []


async def test_the_host_header_never_picks_the_upstream(two_routes: Any) -> None:
    answer = await exchange(two_routes.proxy_port, get("/a/x", "evil.example"))
    assert status(answer) == 200 and answer.endswith(b"a")
    ((_method, _path, headers),) = two_routes.seen["a"]
    assert dict(headers)["Host"].startswith("127.0.0.1:")


@pytest.mark.parametrize(
    "path",
    [
        "/a/../b/x",
        "/a/%2e%2e/b/x",
        "/a/%2E%2E/b/x",
        "/a/.%2e/b/x",
        "/a/%252e%252e/b/x",
        "/a/./../b",
        "/a/..%2fb/x",
        "/a/..\\b/x",
    ],
)
async def test_traversal_never_escapes_the_route_prefix(two_routes: Any, path: str) -> None:
    answer = await exchange(two_routes.proxy_port, get(path))
    assert status(answer) == 400, answer[:120]
    assert two_routes.seen["b"] == [] and two_routes.seen["a"] == []


@pytest.mark.parametrize("path", ["/a%2Fb/x", "/a%252Fb/x", "/ab/x", "/A/x", "/%61/x"])
async def test_encoded_slashes_and_lookalikes_match_no_route(two_routes: Any, path: str) -> None:
    answer = await exchange(two_routes.proxy_port, get(path))
    assert status(answer) == 404, answer[:120]
    assert two_routes.seen == {"a": [], "b": []}


async def test_caller_credentials_and_connection_named_headers_are_dropped(two_routes: Any) -> None:
    request = (
        b"GET /a/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer stolen\r\nProxy-Authorization: Basic c3RvbGVu\r\n"
        b"Connection: close, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nProxy-Connection: keep-alive\r\n\r\n"
    )
    answer = await exchange(two_routes.proxy_port, request)
    assert status(answer) == 200
    ((_method, _path, headers),) = two_routes.seen["a"]
    names = [k.lower() for k, _ in headers]
    assert "proxy-authorization" not in names and "x-secret-hop" not in names and "proxy-connection" not in names
    assert [v for k, v in headers if k.lower() == "authorization"] == [f"Bearer {two_routes.key}"]


async def test_metrics_on_the_proxy_port_go_upstream_never_to_the_admin_app(two_routes: Any) -> None:
    for path in ("/a/metrics", "/a/readyz", "/a/refresh?route=a"):
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{two_routes.proxy_port}{path}") as r,
        ):
            assert r.status == 200 and await r.text() == "a"
    assert [p for _m, p, _h in two_routes.seen["a"]] == ["/a/metrics", "/a/readyz", "/a/refresh?route=a"]
    async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{two_routes.proxy_port}/metrics") as r:
        assert r.status == 404  # no route matches /metrics here, and the admin app is not behind this port


async def test_the_admin_port_shows_no_secret_and_no_per_request_data(two_routes: Any) -> None:
    rid = "per-request-id-should-not-show"
    async with aiohttp.ClientSession() as client:
        async with client.get(
            f"http://127.0.0.1:{two_routes.proxy_port}/a/q?token=abc", headers={"x-request-id": rid}
        ) as r:
            assert r.status == 200
        bodies = []
        for path in ("/metrics", "/readyz", "/healthz"):
            async with client.get(f"http://127.0.0.1:{two_routes.admin_port}{path}") as r:
                bodies.append(await r.text())
        async with client.post(f"http://127.0.0.1:{two_routes.admin_port}/refresh?route=a") as r:
            bodies.append(await r.text())
    text = "\n".join(bodies)
    assert two_routes.key not in text and rid not in text and "/a/q" not in text and "token=abc" not in text
    assert json.loads(bodies[1])["ready"] is True


async def test_the_admin_port_answers_its_five_paths_and_json_errors_for_anything_else(two_routes: Any) -> None:
    admin = two_routes.admin_port
    async with aiohttp.ClientSession() as client:
        async with client.head(f"http://127.0.0.1:{admin}/healthz") as r:
            assert r.status == 200 and await r.read() == b""
        async with client.get(f"http://127.0.0.1:{admin}/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"] == CONTENT_TYPE_LATEST
            assert "aml_auth_proxy_route_ready" in await r.text()
        async with client.get(f"http://127.0.0.1:{admin}/nope?x=1") as r:
            body = await r.json()
            assert r.status == 404 and body["error"] == "not found"
            assert body["paths"] == ["/healthz", "/metrics", "/quitquitquit", "/readyz", "/refresh"]
            assert body["request_id"] == r.headers["x-request-id"]
        async with client.get(f"http://127.0.0.1:{admin}/refresh?route=a") as r:
            body = await r.json()
            assert r.status == 405 and r.headers["Allow"] == "POST" and body["request_id"]
        async with client.post(f"http://127.0.0.1:{admin}/healthz") as r:
            assert r.status == 405 and r.headers["Allow"] == "GET, HEAD"
        async with client.post(f"http://127.0.0.1:{admin}/refresh?route=zzz") as r:
            body = await r.json()
            assert r.status == 404 and body["routes"] == ["a", "b"] and body["request_id"]
    # A request that does not parse gets the JSON refusal, not a traceback, and nothing reaches a handler.
    answer = await exchange(
        admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert status(answer) == 400
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "bad request: Content-Length with Transfer-Encoding" and body["request_id"]
