"""The proxy port's HTTP/1.1 server (proxy/server.py) spoken to with raw sockets: 100-continue, pipelining,
HTTP/1.0, answer framing, Upgrade requests, a body that breaks mid-upload, and a refusal while a body is coming."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from tests.support.servers import ProxyFactory
from tests.support.session import new_key


@pytest.fixture
async def upstream(serve: Callable[..., Awaitable[str]]) -> Any:
    """Records what reached it: (method, path, body, header names); /slow answers late, /stream without length."""
    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
        except Exception as exc:  # a body cut short: recorded as broken
            seen.append({"path": request.path, "broken": type(exc).__name__})
            raise
        seen.append(
            {
                "method": request.method,
                "path": request.path,
                "body": body,
                "headers": {k.lower() for k in request.headers},
            }
        )
        if request.path.endswith("/slow"):
            await asyncio.sleep(0.2)
        if request.path.endswith("/stream"):
            resp = web.StreamResponse()
            await resp.prepare(request)
            for part in (b"one,", b"two,", b"three"):
                await resp.write(part)
                await asyncio.sleep(0.01)
            await resp.write_eof()
            return resp
        return web.Response(text=f"{request.method} {request.path} {len(body)}")

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{t:.*}", handle)
    url = await serve(app)
    return url, seen


@pytest.fixture
async def proxy(upstream: Any, make_proxy: ProxyFactory, key_dir: Any) -> Any:
    url, seen = upstream
    route = {"name": "srv", "upstream": url, "auth": key_dir(new_key("srv")), "retry_buffer_bytes": 1024}
    svc = await make_proxy(route, limits={"max_body_bytes": 1 << 20})
    svc.seen = seen
    return svc


class Conn:
    """A raw connection that reads answers by their framing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(self) -> tuple[int, dict[str, str]]:
        async with asyncio.timeout(5):
            raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        return int(lines[0].split(" ")[1]), headers

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = await self.head()
        async with asyncio.timeout(5):
            if "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding") == "chunked":
                body = b""
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                    chunk = await self.reader.readexactly(size + 2)
                    if not size:
                        break
                    body += chunk[:-2]
            else:
                body = await self.reader.read()  # close-delimited
        return status, headers, body

    async def closed(self) -> bool:
        async with asyncio.timeout(5):
            rest = await self.reader.read()
        self.close()
        return rest == b""

    def close(self) -> None:
        self.writer.close()

    async def __aenter__(self) -> Conn:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.writer.wait_closed()


@pytest.fixture
async def conn(proxy: Any) -> AsyncIterator[Conn]:
    """A raw connection to the proxy port, closed after the test (if the test has not closed it)."""
    opened = await Conn.open(proxy.proxy_port)
    yield opened
    opened.close()


async def test_expect_100_continue_is_answered_when_the_body_is_read(proxy: Any, conn: Conn) -> None:
    await conn.send(b"POST /score HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert (await conn.head())[0] == 100  # the caller may now send the body
    await conn.send(b"hello")
    status, _headers, body = await conn.answer()
    assert (status, body) == (200, b"POST /score 5")
    assert proxy.seen[0]["body"] == b"hello" and "expect" not in proxy.seen[0]["headers"]


async def test_a_request_refused_before_its_body_gets_no_100_continue(conn: Conn) -> None:
    await conn.send(b"POST /score HTTP/1.1\r\nHost: a\r\nContent-Length: 9999999\r\nExpect: 100-continue\r\n\r\n")
    status, headers, body = await conn.answer()
    assert status == 413 and headers["connection"] == "close" and json.loads(body)["request_id"]
    assert await conn.closed()


async def test_pipelined_requests_are_answered_in_order(conn: Conn) -> None:
    await conn.send(
        b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    answers = [(await conn.answer())[2] for _ in range(3)]
    assert answers == [b"GET /slow 0", b"POST /b 3", b"GET /c 0"]  # /slow first although it answers last


async def test_http_1_0_closes_by_default_and_keeps_alive_on_request(proxy: Any, conn: Conn) -> None:
    await conn.send(b"GET /old HTTP/1.0\r\n\r\n")  # no Host needed in HTTP/1.0
    status, headers, body = await conn.answer()
    assert (status, body) == (200, b"GET /old 0") and headers["connection"] == "close"
    assert await conn.closed()

    async with await Conn.open(proxy.proxy_port) as again:
        for path in (b"/k1", b"/k2"):
            await again.send(b"GET " + path + b" HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, body = await again.answer()
            assert (status, body) == (200, b"GET " + path + b" 0") and headers["connection"] == "keep-alive"


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_an_answer_without_length_is_chunked_for_http_1_1_and_ends_with_the_connection_for_1_0(
    conn: Conn, version: str
) -> None:
    await conn.send(f"GET /stream HTTP/{version}\r\nHost: a\r\n\r\n".encode())
    status, headers, body = await conn.answer()
    assert (status, body) == (200, b"one,two,three")
    if version == "1.1":
        assert headers["transfer-encoding"] == "chunked" and "connection" not in headers
    else:
        assert "transfer-encoding" not in headers and headers["connection"] == "close"
        assert await conn.closed()


async def test_a_request_asking_for_an_upgrade_is_served_as_an_ordinary_one_with_its_body(
    proxy: Any, conn: Conn
) -> None:
    await conn.send(
        b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert (await conn.answer())[2] == b"POST /up 5"
    assert (await conn.answer())[2] == b"GET /after 0"
    assert proxy.seen[0]["body"] == b"hello"
    assert not {"upgrade", "http2-settings", "connection"} & proxy.seen[0]["headers"]


async def test_a_bad_chunk_in_a_streamed_upload_is_answered_400_at_once(proxy: Any, conn: Conn) -> None:
    good = b"x" * 4096  # past the retry buffer: the upload is already streaming to the upstream
    await conn.send(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (4096, good))
    await asyncio.sleep(0.1)
    await conn.send(b"zz\r\n")  # and the caller keeps the connection open
    status, headers, body = await conn.answer()
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(body)["error"] == "bad request: invalid chunked body"
    assert await conn.closed()
    async with asyncio.timeout(5):
        while not proxy.seen:
            await asyncio.sleep(0.01)
    assert "broken" in proxy.seen[0]  # the upstream never got a complete body
    bad = proxy.metrics.registry.get_sample_value("aml_auth_proxy_rejected_requests_total", {"reason": "bad_http"})
    assert bad == 1


async def test_an_answer_given_before_the_body_is_read_reaches_the_caller_still_sending(proxy: Any, conn: Conn) -> None:
    await conn.send(b"POST /nothing/../here HTTP/1.1\r\nHost: a\r\nContent-Length: 900000\r\n\r\n" + b"y" * 65536)
    status, _headers, body = await conn.answer()  # refused without reading the body
    assert status == 400 and json.loads(body)["error"] == "dot segments are not allowed in the path"
    # The rest of the body is read and dropped for a while, so sending it is no error and the close is clean.
    await conn.send(b"y" * (900000 - 65536))
    assert await conn.closed()
    assert proxy.seen == []


async def test_a_caller_leaving_mid_upload_never_passes_on_a_complete_body(proxy: Any, conn: Conn) -> None:
    good = b"x" * 4096  # past the retry buffer: the upload is already streaming to the upstream
    await conn.send(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (4096, good))
    await asyncio.sleep(0.1)
    conn.close()  # gone before the last chunk
    async with asyncio.timeout(5):
        while not proxy.seen:
            await asyncio.sleep(0.01)
    assert "broken" in proxy.seen[0], proxy.seen[0]  # the chunked body upstream was cut, not ended
    registry = proxy.metrics.registry
    async with asyncio.timeout(5):
        while registry.get_sample_value("aml_auth_proxy_client_disconnects_total", {"route": "srv"}) != 1:
            await asyncio.sleep(0.01)


async def test_endless_trailers_after_a_chunked_body_are_cut_off_not_buffered(conn: Conn) -> None:
    await conn.send(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: ")
    answer = asyncio.ensure_future(conn.answer())
    sent = 0
    async with asyncio.timeout(5):
        while not answer.done() and sent < 8 << 20:  # bounded: 8 MiB at most
            with contextlib.suppress(ConnectionError):
                await conn.send(b"t" * 16384)
            sent += 16384
            await asyncio.sleep(0)
        status, _headers, body = await answer
    assert status == 431 and json.loads(body)["error"] == "bad request: chunked body framing or trailers too large"
    assert sent < 1 << 20, sent  # refused at about twice the header limit, not after buffering everything


async def test_a_fault_in_the_handler_is_a_json_500_and_one_error_line_and_the_connection_closes(
    proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: Any) -> None:
        raise RuntimeError("a bug")

    proxy._proxy_server.handler = broken
    conn = await Conn.open(proxy.proxy_port)
    await conn.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    status, headers, body = await conn.answer()
    assert status == 500 and headers["connection"] == "close"
    assert json.loads(body) == {"error": "internal error", "route": None, "request_id": headers["x-request-id"]}
    assert await conn.closed()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "handler" in r.getMessage()] == [
        "proxy handler failed"
    ]


async def test_a_head_request_answered_by_the_proxy_itself_gets_no_body_and_the_connection_goes_on(
    proxy: Any, conn: Conn
) -> None:
    await conn.send(b"HEAD /nothing/../here HTTP/1.1\r\nHost: a\r\n\r\n")
    status, headers = await conn.head()  # refused by the proxy: a JSON error's head, without the JSON
    assert status == 400 and int(headers["content-length"]) > 0
    await conn.send(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    status, _headers, body = await conn.answer()  # had the body been sent, this would read it as a status line
    assert (status, body) == (200, b"GET /next 0")


async def test_a_caller_that_half_closes_after_pipelining_gets_every_answer_then_the_close(proxy: Any) -> None:
    # `printf '...' | nc -N`: the requests, then a FIN; each parsed request is still answered, in order.
    async with await Conn.open(proxy.proxy_port) as conn:
        await conn.send(
            b"GET /a/slow HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        conn.writer.write_eof()
        answers = [await conn.answer() for _ in range(3)]
        assert [(status, body) for status, _, body in answers] == [
            (200, b"GET /a/slow 0"),
            (200, b"POST /b 3"),
            (200, b"GET /c 0"),
        ]
        assert await conn.closed()
    assert [seen["path"] for seen in proxy.seen] == ["/a/slow", "/b", "/c"]
