"""The configurable caller limits: header size and count (431, 414), body size (413), open connections (503) and
the slow-head timeout. Each answer is a JSON error with a request id; nothing over a limit reaches the upstream
complete, and a refused header's bytes (which may hold a caller's credential) are never echoed or logged."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.servers import ProxyFactory
from tests.support.session import LOG_DIR, new_key, remember

LIMITS = {
    "max_header_bytes": 4096,
    "max_headers": 20,
    "max_body_bytes": 65536,
    "max_connections": 6,
    "client_timeout_seconds": 0.5,
}


@pytest.fixture
async def limited(
    request: pytest.FixtureRequest, serve: Callable[..., Awaitable[str]], make_proxy: ProxyFactory, key_dir: Any
) -> Any:
    """A proxy with small limits in front of an upstream that records each request body it read completely.
    The route's retry buffer (default 16 KiB, below the body limit) is the indirect parameter."""
    seen: list[tuple[str, int]] = []
    broken: list[str] = []

    async def record(request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except (ConnectionError, aiohttp.ClientPayloadError) as exc:
            broken.append(type(exc).__name__)
            raise
        seen.append((request.method, len(body)))
        return web.Response(text="reached")

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{t:.*}", record)
    upstream = await serve(app)
    route = {
        "name": "limited",
        "upstream": upstream,
        "auth": key_dir(new_key("limits")),
        "retry_buffer_bytes": getattr(request, "param", 16384),
    }
    svc = await make_proxy(route, limits=LIMITS)
    svc.seen = seen
    svc.broken = broken
    return svc


async def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes and read one answer; (status, lower-cased headers, body). The proxy may still be reading
    (lingering over) the rest of a refused body, so the answer is read by its Content-Length, not to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").strip().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        body = await reader.readexactly(int(headers["content-length"]))
    writer.close()
    await writer.wait_closed()
    return int(lines[0].split(" ")[1]), headers, body


def assert_json_error(status: int, headers: dict[str, str], body: bytes, want: int) -> dict[str, Any]:
    assert status == want, body
    document: dict[str, Any] = json.loads(body)
    assert document["request_id"] and headers["x-request-id"] == document["request_id"]
    assert headers["content-type"] == "application/json"
    return document


def rejected(svc: Any, reason: str) -> float:
    value = svc.metrics.registry.get_sample_value("aml_auth_proxy_rejected_requests_total", {"reason": reason})
    return value or 0.0


async def test_an_oversized_header_field_gets_431_and_its_bytes_are_never_echoed_or_logged(limited: Any) -> None:
    caller_secret = "callersecret" + secrets.token_hex(16)
    remember(caller_secret)
    before = (LOG_DIR / "in-process.log").read_text()
    request = (
        b"GET /score HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer " + caller_secret.encode() + b"x" * 5000 + b"\r\n\r\n"
    )
    status, headers, body = await exchange(limited.proxy_port, request)
    document = assert_json_error(status, headers, body, 431)
    assert document["error"] == "bad request: header field too large"
    assert caller_secret not in body.decode()
    new_log = (LOG_DIR / "in-process.log").read_text()[len(before) :]
    assert caller_secret not in new_log and "bad_request" in new_log
    assert limited.seen == [] and rejected(limited, "too_large") == 1


async def test_a_header_block_over_the_limit_gets_431(limited: Any) -> None:
    fields = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 400) for i in range(15))  # each small, 6 KiB in all
    status, headers, body = await exchange(limited.proxy_port, b"GET /score HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
    assert_json_error(status, headers, body, 431)
    assert limited.seen == []


async def test_too_many_header_fields_get_431(limited: Any) -> None:
    fields = b"".join(b"X-N-%d: v\r\n" % i for i in range(40))
    status, headers, body = await exchange(limited.proxy_port, b"GET /score HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
    document = assert_json_error(status, headers, body, 431)
    assert document["error"] == "bad request: too many header fields"
    assert limited.seen == []


async def test_an_oversized_request_line_gets_414(limited: Any) -> None:
    status, headers, body = await exchange(
        limited.proxy_port, b"GET /score?q=" + b"a" * 6000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert_json_error(status, headers, body, 414)
    assert limited.seen == []


async def test_a_body_whose_content_length_is_over_the_limit_gets_413_before_any_upstream_call(
    limited: Any,
) -> None:
    head = b"POST /score HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (LIMITS["max_body_bytes"] + 1)
    status, headers, body = await exchange(limited.proxy_port, head + b"z" * 1024)
    document = assert_json_error(status, headers, body, 413)
    assert document["error"] == "request body too large"
    assert headers.get("connection") == "close"
    assert limited.seen == []


async def chunks(total: int, size: int = 8192) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        yield b"c" * min(size, total - sent)
        sent += size
        await asyncio.sleep(0)


@pytest.mark.parametrize("limited", [16384, 1 << 20], ids=["streamed", "buffered"], indirect=True)
async def test_a_chunked_body_growing_over_the_limit_gets_413_and_the_upstream_never_gets_it_complete(
    limited: Any,
) -> None:
    url = f"http://127.0.0.1:{limited.proxy_port}/score"
    async with aiohttp.ClientSession() as client:
        try:
            async with client.post(url, data=chunks(4 * LIMITS["max_body_bytes"])) as resp:
                assert resp.status == 413
                assert (await resp.json())["request_id"]
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            pass  # the proxy may close while the client is still sending: also a refusal
        # A body within the limit still goes through on a fresh connection.
        async with client.post(url, data=chunks(LIMITS["max_body_bytes"] // 2)) as resp:
            assert resp.status == 200
    assert limited.seen == [("POST", LIMITS["max_body_bytes"] // 2)]
    assert rejected(limited, "too_large") == 1


async def test_a_connection_over_the_limit_gets_503_with_retry_after_and_is_closed(limited: Any) -> None:
    port = limited.proxy_port
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(LIMITS["max_connections"])]
    await asyncio.sleep(0.05)
    status, headers, body = await exchange(port, b"GET /score HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_json_error(status, headers, body, 503)
    assert headers["retry-after"] == "1" and headers.get("connection") == "close"
    assert rejected(limited, "connections") == 1
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.1)
    status, _, body = await exchange(port, b"GET /score HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert (status, body) == (200, b"reached")


async def test_a_slow_request_head_is_cut_off_after_the_client_timeout(limited: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.proxy_port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(b"GET /score HTTP/1.1\r\nHost: a\r\n")
    async with asyncio.timeout(5):
        while not reader.at_eof():
            writer.write(b"X-Drip: 1\r\n")  # a byte now and then, never the blank line
            await asyncio.sleep(0.05)
            if loop.time() - started > 4:
                break
    closed_after = loop.time() - started
    writer.close()
    assert reader.at_eof(), "the proxy kept a never-ending request head open"
    assert closed_after < 2 * LIMITS["client_timeout_seconds"] + 0.5
    assert limited.seen == []


async def test_an_endless_header_is_cut_off_at_the_limit_not_buffered(limited: Any) -> None:
    """A header line that never ends: the proxy answers once the head passes what it may hold, without waiting
    for the line to end (which would buffer all of it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.proxy_port)
    writer.write(b"GET /score HTTP/1.1\r\nHost: a\r\nX-Endless: ")
    sent = 0
    answer = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
    async with asyncio.timeout(5):
        while not answer.done() and sent < 8 << 20:  # bounded: 8 MiB at most
            writer.write(b"a" * 16384)
            sent += 16384
            await writer.drain()
            await asyncio.sleep(0)
        head = await answer
    writer.close()
    assert head.startswith(b"HTTP/1.1 431 ")
    assert sent < 1 << 20, sent  # the limits are 4 KiB: the answer came long before a megabyte
    assert limited.seen == []


async def test_an_idle_keep_alive_connection_is_closed_after_the_client_timeout(limited: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.proxy_port)
    writer.write(b"GET /score HTTP/1.1\r\nHost: a\r\n\r\n")
    async with asyncio.timeout(5):
        await reader.readuntil(b"reached")
        started = asyncio.get_running_loop().time()
        assert await reader.read() == b""  # the proxy closed the idle connection
    waited = asyncio.get_running_loop().time() - started
    writer.close()
    assert waited < 2 * LIMITS["client_timeout_seconds"] + 0.5
