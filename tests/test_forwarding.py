"""The proxy port against real upstream servers on 127.0.0.1: what goes through, what comes back, what fails how."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.emulator.echo import create_echo_app
from proxy.logs import AccessLog
from tests.support.servers import ProxyFactory
from tests.support.session import LOG_DIR, new_key

Serve = Callable[..., Awaitable[str]]
KeyDir = Callable[..., dict[str, str]]


def metric(service: Any, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


async def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the proxy port and read until the server closes or times out."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"Connection: close" not in b"".join(chunks):
                    break
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks)


@contextlib.asynccontextmanager
async def raw_upstream(answer: bytes, heads: list[bytes] | None = None) -> AsyncIterator[str]:
    """An upstream on 127.0.0.1 that reads each request's head (kept in `heads`), writes `answer` and closes the
    connection; yields its URL."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if heads is not None:
            heads.append(head)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


@pytest.fixture
async def echo(serve: Serve) -> str:
    return await serve(create_echo_app())


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, echo: str, key_dir: KeyDir) -> Any:
    keys = key_dir(new_key("primary"), new_key("secondary"))
    return await make_proxy({"name": "echo", "region": "local", "upstream": echo + "/echo/base", "auth": keys})


def url(service: Any, path: str) -> str:
    return f"http://127.0.0.1:{service.proxy_port}{path}"


async def echo_call(service: Any, method: str, path: str, **kw: Any) -> tuple[aiohttp.ClientResponse, dict[str, Any]]:
    async with aiohttp.ClientSession() as client, client.request(method, url(service, path), **kw) as resp:
        return resp, await resp.json()


def header_values(seen: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


async def test_forwards_method_path_query_and_body_to_the_route_upstream(proxy: Any) -> None:
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        resp, seen = await echo_call(proxy, method, "/a/b%20c?x=1&y=%2F", data=b"payload-" + method.encode())
        assert resp.status == 200
        assert seen["method"] == method
        assert seen["path"] == "/echo/base/a/b%20c"
        assert seen["query"] in ("x=1&y=%2F", "x=1&y=/")  # the echo app sees yarl's normalised form
        assert seen["body_bytes"] == len(b"payload-" + method.encode())


async def test_request_target_reaches_the_upstream_byte_for_byte(make_proxy: ProxyFactory, key_dir: KeyDir) -> None:
    heads: list[bytes] = []
    async with raw_upstream(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n", heads) as upstream:
        svc = await make_proxy({"upstream": f"{upstream}/api/v1/service/x", "auth": key_dir(new_key("p"))})
        target = "/score/a%2Fb%20c;p=1?x=1&y=%2F&z=%E2%82%AC&&w"
        raw = await raw_exchange(
            svc.proxy_port, f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
        )
        assert raw.startswith(b"HTTP/1.1 204")
        assert [head.split(b"\r\n", 1)[0] for head in heads] == [f"GET /api/v1/service/x{target} HTTP/1.1".encode()]


async def test_sets_host_to_the_upstream_and_injects_the_key(proxy: Any, echo: str) -> None:
    _resp, seen = await echo_call(proxy, "GET", "/", headers={"Host": "evil.example"})
    assert header_values(seen, "Host") == [echo.removeprefix("http://")]
    auth = header_values(seen, "Authorization")
    assert len(auth) == 1 and auth[0].startswith("Bearer primary-")


async def test_replaces_the_callers_authorization_header(proxy: Any) -> None:
    _resp, seen = await echo_call(proxy, "GET", "/", headers={"Authorization": "Bearer caller-token-123"})
    auth = header_values(seen, "Authorization")
    assert len(auth) == 1 and "caller-token-123" not in auth[0]


async def test_strips_hop_by_hop_and_connection_named_headers_but_keeps_repeats(proxy: Any) -> None:
    headers = [
        ("Connection", "x-drop-me, keep-alive"),
        ("X-Drop-Me", "1"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic abc"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Repeated", "one"),
        ("X-Repeated", "two"),
    ]
    _resp, seen = await echo_call(proxy, "GET", "/", headers=headers)
    names = {k.lower() for k, _ in seen["headers"]}
    for dropped in ("x-drop-me", "keep-alive", "te", "upgrade", "proxy-authorization", "proxy-connection"):
        assert dropped not in names
    assert header_values(seen, "X-Repeated") == ["one", "two"]


async def test_propagates_the_callers_request_id_and_returns_it(proxy: Any) -> None:
    resp, seen = await echo_call(proxy, "GET", "/", headers={"x-ms-client-request-id": "abc-123"})
    assert header_values(seen, "x-ms-client-request-id") == ["abc-123"]
    assert header_values(seen, "x-request-id") == ["abc-123"]
    assert resp.headers["x-request-id"] == "abc-123"
    assert resp.headers["x-ms-client-request-id"] == "abc-123"
    resp, seen = await echo_call(proxy, "GET", "/", headers={"x-request-id": "only-xrid"})
    assert header_values(seen, "x-ms-client-request-id") == ["only-xrid"]


async def test_generates_a_request_id_when_absent(proxy: Any) -> None:
    resp, seen = await echo_call(proxy, "GET", "/")
    rid = resp.headers["x-request-id"]
    assert len(rid) == 32 and header_values(seen, "x-request-id") == [rid]


async def test_chunked_request_bodies_stream_through(proxy: Any) -> None:
    async def gen():  # type: ignore[no-untyped-def]
        for i in range(50):
            yield bytes([i % 256]) * 40000  # 2 MB: over the retry buffer, so it is streamed

    resp, seen = await echo_call(proxy, "POST", "/", data=gen())
    assert resp.status == 200
    assert seen["body_bytes"] == 50 * 40000


async def test_small_chunked_body_is_buffered_and_sent_with_a_length(proxy: Any) -> None:
    async def gen():  # type: ignore[no-untyped-def]
        yield b"a" * 10
        yield b"b" * 10

    resp, seen = await echo_call(proxy, "POST", "/", data=gen())
    assert resp.status == 200 and seen["body_bytes"] == 20
    assert header_values(seen, "Content-Length") == ["20"]


async def test_head_and_status_codes_pass_through(
    proxy: Any, make_proxy: ProxyFactory, echo: str, key_dir: KeyDir
) -> None:
    keys = key_dir(new_key("p"))
    root = await make_proxy({"upstream": echo, "auth": keys})
    async with aiohttp.ClientSession() as client:
        for code in (201, 204, 400, 404, 418, 500, 503):
            async with client.get(url(root, f"/status/{code}")) as resp:
                assert resp.status == code
        async with client.head(url(root, "/")) as resp:
            assert resp.status == 200 and resp.headers["Content-Length"] == "7"
            assert await resp.read() == b""


async def test_path_matching_no_route_gives_404_json(make_proxy: ProxyFactory, echo: str, key_dir: KeyDir) -> None:
    keys = key_dir(new_key("p"))
    svc = await make_proxy(
        {"name": "a", "match": "/a", "strip_prefix": True, "upstream": echo + "/echo/one", "auth": keys},
        {"name": "b", "match": "/b/", "upstream": echo + "/echo/two", "auth": keys},
    )
    _r, seen = await echo_call(svc, "GET", "/a/score?q=1")
    assert seen["path"].startswith("/echo/one/score")
    _r, seen = await echo_call(svc, "GET", "/b/x")
    assert seen["path"].startswith("/echo/two/b/x")
    for path in ("/ab", "/c", "/"):
        async with aiohttp.ClientSession() as client, client.get(url(svc, path)) as resp:
            assert resp.status == 404
            body = await resp.json()
            assert body["error"] == "no route matches this path" and body["request_id"] == resp.headers["x-request-id"]


@pytest.mark.parametrize("path", ["/a/../b/x", "/a/%2e%2e/b/x", "/a/%252e%252e/b", "/a/./x"])
async def test_dot_segments_are_refused(make_proxy: ProxyFactory, echo: str, key_dir: KeyDir, path: str) -> None:
    keys = key_dir(new_key("p"))
    svc = await make_proxy({"name": "a", "match": "/a", "upstream": echo + "/echo", "auth": keys})
    raw = await raw_exchange(svc.proxy_port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert raw.startswith(b"HTTP/1.1 400"), raw[:100]
    assert b'"request_id"' in raw


async def test_absolute_form_targets_are_refused(proxy: Any) -> None:
    raw = await raw_exchange(
        proxy.proxy_port, b"GET http://example.org/secret HTTP/1.1\r\nHost: example.org\r\nConnection: close\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 400"), raw[:200]
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert "open proxy" in body["error"]


async def test_connect_is_refused(proxy: Any) -> None:
    raw = await raw_exchange(
        proxy.proxy_port, b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\nConnection: close\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 405"), raw[:200]
    assert metric(proxy, "aml_auth_proxy_rejected_requests_total", reason="connect") == 1


async def test_connect_refused_upstream_gives_502(make_proxy: ProxyFactory, key_dir: KeyDir) -> None:
    keys = key_dir(new_key("p"))
    with __import__("socket").socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    svc = await make_proxy({"name": "down", "upstream": f"http://127.0.0.1:{port}", "auth": keys})
    async with aiohttp.ClientSession() as client, client.get(url(svc, "/x")) as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body == {"error": "upstream connection failed", "route": "down", "request_id": resp.headers["x-request-id"]}
    assert metric(svc, "aml_auth_proxy_upstream_errors_total", route="down", kind="connect") == 1


@pytest.mark.parametrize("timeouts", [{"read": 0.2}, {"total": 0.3}], ids=["read", "total"])
async def test_an_upstream_timeout_gives_504(
    make_proxy: ProxyFactory, echo: str, key_dir: KeyDir, timeouts: dict[str, float]
) -> None:
    keys = key_dir(new_key("p"))
    svc = await make_proxy({"name": "slow", "upstream": echo, "timeouts": timeouts, "auth": keys})
    async with aiohttp.ClientSession() as client, client.get(url(svc, "/sleep?seconds=3")) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"] == "upstream timed out"
    assert metric(svc, "aml_auth_proxy_upstream_errors_total", route="slow", kind="timeout") == 1


async def _reset_handler(request: web.BaseRequest) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.abort()
    await asyncio.sleep(0.05)
    return web.Response()


async def test_upstream_reset_before_answer_gives_502(serve: Serve, make_proxy: ProxyFactory, key_dir: KeyDir) -> None:
    app = web.Application()
    app.router.add_get("/{t:.*}", _reset_handler)
    upstream = await serve(app)
    svc = await make_proxy({"name": "r", "upstream": upstream, "auth": key_dir(new_key("p"))})
    async with aiohttp.ClientSession() as client, client.get(url(svc, "/x")) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"] == "upstream closed the connection"
    assert metric(svc, "aml_auth_proxy_upstream_errors_total", route="r", kind="reset") == 1


async def test_upstream_failure_mid_response_cuts_the_callers_connection(
    serve: Serve, make_proxy: ProxyFactory, key_dir: KeyDir
) -> None:
    async def half(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    app = web.Application()
    app.router.add_get("/{t:.*}", half)
    svc = await make_proxy({"name": "m", "upstream": await serve(app), "auth": key_dir(new_key("p"))})
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with client.get(url(svc, "/x")) as resp:
                assert resp.status == 200
                await resp.read()
    assert metric(svc, "aml_auth_proxy_upstream_errors_total", route="m", kind="reset") == 1


async def test_malformed_upstream_response_gives_502(make_proxy: ProxyFactory, key_dir: KeyDir) -> None:
    async with raw_upstream(b"HTTP/1.1 abc nonsense\r\n\r\n") as upstream:
        svc = await make_proxy({"name": "g", "upstream": upstream, "auth": key_dir(new_key("p"))})
        async with aiohttp.ClientSession() as client, client.get(url(svc, "/x")) as resp:
            assert resp.status == 502
            assert (await resp.json())["route"] == "g"


async def test_client_disconnect_closes_the_upstream_request_and_logs_at_debug(
    serve: Serve, make_proxy: ProxyFactory, key_dir: KeyDir
) -> None:
    upstream_done = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            for _ in range(2000):  # bounded: 2000 * 10 ms
                await resp.write(b"y" * 65536)
                await asyncio.sleep(0.01)
        except ConnectionError:
            upstream_done.set()
        return resp

    app = web.Application()
    app.router.add_get("/{t:.*}", endless)
    svc = await make_proxy({"name": "d", "upstream": await serve(app), "auth": key_dir(new_key("p"))})
    async with aiohttp.ClientSession() as client:
        resp = await client.get(url(svc, "/x"))
        await resp.content.readexactly(100000)
        resp.close()  # the caller goes away mid-stream
    await asyncio.wait_for(upstream_done.wait(), 5)
    for _ in range(50):
        if metric(svc, "aml_auth_proxy_client_disconnects_total", route="d") == 1:
            break
        await asyncio.sleep(0.02)
    assert metric(svc, "aml_auth_proxy_client_disconnects_total", route="d") == 1
    lines = [json.loads(x) for x in (LOG_DIR / "in-process.log").read_text().splitlines()]
    mine = [x for x in lines if x.get("event") == "client_disconnected" and x.get("route") == "d"]
    assert mine and all(x["level"] == "debug" and "traceback" not in x for x in mine)
    assert not any("traceback" in x and x.get("route") == "d" for x in lines)


async def test_custom_key_header_and_template(make_proxy: ProxyFactory, echo: str, key_dir: KeyDir) -> None:
    key = new_key("api")
    keys = key_dir(key)
    svc = await make_proxy({"upstream": echo, "auth": {**keys, "header": "api-key", "template": "{key}"}})
    _r, seen = await echo_call(svc, "GET", "/echo", headers={"api-key": "caller", "Authorization": "Bearer c"})
    assert header_values(seen, "api-key") == [key]
    assert header_values(seen, "Authorization") == []


async def test_keep_caller_credential_is_an_explicit_opt_in(
    make_proxy: ProxyFactory, echo: str, key_dir: KeyDir
) -> None:
    key = new_key("p")
    svc = await make_proxy({"upstream": echo, "keep_caller_credential": True, "auth": key_dir(key)})
    _r, seen = await echo_call(svc, "GET", "/echo", headers={"Authorization": "Bearer callers-own"})
    assert header_values(seen, "Authorization") == ["Bearer callers-own"]
    _r, seen = await echo_call(svc, "GET", "/echo")
    assert header_values(seen, "Authorization") == [f"Bearer {key}"]


async def test_deployment_header_from_config_replaces_the_callers(
    make_proxy: ProxyFactory, echo: str, key_dir: KeyDir
) -> None:
    svc = await make_proxy({"upstream": echo, "deployment": "blue", "auth": key_dir(new_key("p"))})
    _r, seen = await echo_call(svc, "GET", "/echo", headers={"azureml-model-deployment": "green"})
    assert header_values(seen, "azureml-model-deployment") == ["blue"]


async def test_route_without_a_usable_key_answers_503_and_is_not_ready(
    make_proxy: ProxyFactory, echo: str, tmp_path: Path
) -> None:
    svc = await make_proxy({"name": "nokey", "upstream": echo, "auth": {"primary_file": str(tmp_path / "missing")}})
    async with aiohttp.ClientSession() as client:
        async with client.get(url(svc, "/x")) as resp:
            assert resp.status == 503
            assert "no usable credential" in (await resp.json())["error"]
        async with client.get(f"http://127.0.0.1:{svc.admin_port}/readyz") as resp:
            assert resp.status == 503
            body = await resp.json()
            assert body["not_ready"] == {"nokey": "primary key file: file not found"}
        async with client.get(f"http://127.0.0.1:{svc.admin_port}/healthz") as resp:
            assert resp.status == 200


async def test_tls_upstream_is_verified_by_default(
    serve: Serve, make_proxy: ProxyFactory, key_dir: KeyDir, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    upstream = await serve(create_echo_app(), ssl_context=server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    keys = key_dir(new_key("p"))
    untrusted = await make_proxy({"name": "untrusted", "upstream": upstream, "auth": keys})
    trusted = await make_proxy(
        {"name": "trusted", "upstream": upstream, "tls": {"ca_file": str(ca_file)}, "auth": keys}
    )
    async with aiohttp.ClientSession() as client:
        async with client.get(url(untrusted, "/echo")) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"] == "upstream TLS handshake failed"
        async with client.get(url(trusted, "/echo")) as resp:
            assert resp.status == 200
    assert metric(untrusted, "aml_auth_proxy_upstream_errors_total", route="untrusted", kind="tls") == 1


async def test_keep_alive_connections_are_reused(proxy: Any) -> None:
    ports = set()
    async with aiohttp.ClientSession() as client:
        for _ in range(20):
            async with client.get(url(proxy, "/")) as resp:
                seen = await resp.json()
                ports.add(tuple(seen["headers"][0]))  # Host is constant; the check below is on the pool
    pool = proxy.routes[0].pool
    assert pool.open == 1 and pool.idle == 1  # one pooled connection served all 20


async def test_access_log_line_per_request_without_credentials(proxy: Any) -> None:
    buffer = io.StringIO()
    proxy.handler.access_log = AccessLog(buffer, interval=3600)
    _resp, _seen = await echo_call(
        proxy, "POST", "/q?secret-looking=1", data=b"12345", headers={"x-request-id": "rid-1"}
    )
    assert buffer.getvalue() == ""  # batched: nothing is written before the interval ends or a flush
    proxy.handler.access_log.flush()
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 1
    fields = json.loads(lines[0])
    assert fields["event"] == "access" and fields["logger"] == "aml_auth_proxy.access" and fields["level"] == "info"
    assert fields["route"] == "echo" and fields["status"] == 200 and fields["request_id"] == "rid-1"
    assert fields["method"] == "POST" and fields["bytes_in"] == 5 and fields["bytes_out"] > 0
    assert fields["path"] == "/q"  # no query string: it may carry secrets
    assert abs(fields["ts"] - time.time()) < 60 and re.fullmatch(r'.*"ts":\d+\.\d{3},.*', lines[0])
    assert 0 <= fields["upstream_ms"] <= fields["duration_ms"] < 60_000
    assert fields["ttfb_ms"] == fields["duration_ms"]  # a whole answer: its head and body went out in one write


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_access_lines_are_written_in_one_batch_per_interval(proxy: Any) -> None:
    stream = CountingStream()
    proxy.handler.access_log = AccessLog(stream, interval=0.05)
    for i in range(3):
        await echo_call(proxy, "GET", f"/batch-{i}")
    async with asyncio.timeout(5):
        while stream.writes == 0:
            await asyncio.sleep(0.01)
    assert stream.writes == 1  # three requests, one write
    assert [json.loads(x)["path"] for x in stream.getvalue().splitlines()] == ["/batch-0", "/batch-1", "/batch-2"]


async def test_a_full_access_batch_is_written_at_once(proxy: Any) -> None:
    stream = CountingStream()
    proxy.handler.access_log = AccessLog(stream, interval=3600, max_lines=2)
    for i in range(5):
        await echo_call(proxy, "GET", f"/full-{i}")
    assert stream.writes == 2 and len(stream.getvalue().splitlines()) == 4  # the fifth waits for its batch


async def test_stopping_writes_the_access_lines_still_batched(
    make_proxy: ProxyFactory, echo: str, key_dir: KeyDir
) -> None:
    svc = await make_proxy({"name": "last", "upstream": echo + "/echo", "auth": key_dir(new_key("last"))})
    stream = CountingStream()
    svc.handler.access_log = AccessLog(stream, interval=3600)
    await echo_call(svc, "GET", "/last-words")
    assert stream.getvalue() == ""
    await svc.stop()
    assert json.loads(stream.getvalue())["path"] == "/last-words"
