"""Backpressure against callers that do not play along (issue 16, items 1 and 3): a caller that pipelines requests
and never reads the answers, on the admin port and on the proxy port, holds at most about one answer in the
proxy's buffers and is cut off after `limits.client_timeout_seconds`; a caller that stalls in the middle of a
request body is cut off after the same time, so stalled callers cannot hold `limits.max_connections` for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from proxy.app import ProxyService
from proxy.server import HttpServer
from tests.support.servers import ProxyFactory
from tests.support.session import new_key

TIMEOUT = 1.0  # limits.client_timeout_seconds in these tests
BOUND = 1 << 20  # what one connection may hold in the proxy's write buffer: about one answer past the high-water mark


def buffered(server: HttpServer) -> int:
    return sum(c.transport.get_write_buffer_size() for c in server.connections if c.transport is not None)


async def flood_without_reading(port: int, request: bytes, server: HttpServer, seconds: float) -> tuple[int, int, bool]:
    """Pipeline `request` again and again for `seconds`, never reading. Returns the most bytes the proxy held in
    its write buffers meanwhile, the bytes sent, and whether the proxy cut the connection (within the time)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel takes little of the answers for us
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    batch = request * 200
    most = sent = 0
    cut = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        for _ in range(100_000):  # bounded in count as well as in time
            if loop.time() > deadline:
                break
            try:
                sent += sock.send(batch)
            except BlockingIOError:
                pass
            except OSError:
                cut = True
                break
            most = max(most, buffered(server))
            await asyncio.sleep(0.002)
    finally:
        sock.close()
    return most, sent, cut


async def echo_proxy(
    serve: Callable[..., Awaitable[str]], make_proxy: ProxyFactory, key_dir: Any, **limits: int
) -> ProxyService:
    """A proxy whose upstream answers every request with its body, callers cut off after TIMEOUT (and `limits`)."""

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_route("*", "/{t:.*}", echo)
    upstream = await serve(app)
    return await make_proxy(
        {"name": "bp", "upstream": upstream, "auth": key_dir(new_key("bp"))},
        limits={"client_timeout_seconds": TIMEOUT, **limits},
    )


async def test_a_caller_pipelining_to_the_admin_port_without_reading_is_bounded_and_cut_off(
    make_proxy: ProxyFactory, key_dir: Any
) -> None:
    svc = await make_proxy(
        {"name": "bp", "upstream": "http://127.0.0.1:9", "auth": key_dir(new_key("bp"))},
        limits={"client_timeout_seconds": TIMEOUT},
    )
    admin = svc._admin_server
    assert admin is not None
    flood = asyncio.create_task(
        flood_without_reading(svc.admin_port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n", admin, TIMEOUT * 4)
    )
    await asyncio.sleep(0.3)
    # Another caller is served meanwhile: the flood does not hold the loop.
    async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{svc.admin_port}/healthz") as resp:
        assert resp.status == 200
    most, sent, cut = await flood
    assert sent > 10 * BOUND or cut, sent  # the flood really was larger than what may be held
    assert most < BOUND, most
    assert cut, "the proxy kept a caller that does not read its answers"


async def test_a_caller_pipelining_proxied_answers_without_reading_is_bounded_and_cut_off(
    serve: Callable[..., Awaitable[str]], make_proxy: ProxyFactory, key_dir: Any
) -> None:
    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"a" * 20_000)

    app = web.Application()
    app.router.add_get("/{t:.*}", big)
    upstream = await serve(app)
    svc = await make_proxy(
        {"name": "bp", "upstream": upstream, "auth": key_dir(new_key("bp"))},
        limits={"client_timeout_seconds": TIMEOUT},
    )
    server = svc._proxy_server
    assert server is not None
    most, _sent, cut = await flood_without_reading(
        svc.proxy_port, b"GET /score HTTP/1.1\r\nHost: a\r\n\r\n", server, TIMEOUT * 4
    )
    assert most < BOUND, most
    assert cut
    # Refusals answered by the proxy itself (a keep-alive 400) are bounded the same way.
    most, _sent, cut = await flood_without_reading(svc.proxy_port, b"GET /./x HTTP/1.1\r\nHost: a\r\n\r\n", server, 4)
    assert most < BOUND and cut, most


async def test_callers_stalled_in_a_request_body_are_cut_off_and_free_their_connections(
    serve: Callable[..., Awaitable[str]], make_proxy: ProxyFactory, key_dir: Any
) -> None:
    svc = await echo_proxy(serve, make_proxy, key_dir, max_connections=5)
    stalled = []
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.proxy_port)
        writer.write(b"POST /score HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")  # 3 of 10 bytes
        stalled.append((reader, writer))
    started = time.monotonic()
    try:
        for reader, _writer in stalled:
            async with asyncio.timeout(TIMEOUT * 5):
                with contextlib.suppress(ConnectionError):
                    assert await reader.read() == b""  # cut off, no answer
        assert time.monotonic() - started < TIMEOUT * 4
        async with (
            aiohttp.ClientSession() as client,
            client.post(f"http://127.0.0.1:{svc.proxy_port}/score", data=b"0123456789") as resp,
        ):
            assert (resp.status, await resp.read()) == (200, b"0123456789")
    finally:
        for _reader, writer in stalled:
            writer.close()


async def test_a_slow_but_steady_body_and_a_caller_waiting_for_100_continue_are_not_cut_off(
    serve: Callable[..., Awaitable[str]], make_proxy: ProxyFactory, key_dir: Any
) -> None:
    svc = await echo_proxy(serve, make_proxy, key_dir)
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.proxy_port)
    try:
        writer.write(b"POST /score HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\n")
        for piece in (b"ab", b"cd", b"ef"):  # each within the timeout, all together past it
            await asyncio.sleep(TIMEOUT * 0.6)
            writer.write(piece)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert await reader.readexactly(6) == b"abcdef"
    finally:
        writer.close()
    # Expect: 100-continue: the caller waits for the interim answer before sending; the proxy asks for the body
    # when it reads it, and the caller then has the whole timeout to send it.
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.proxy_port)
    try:
        writer.write(b"POST /score HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        await asyncio.sleep(TIMEOUT * 0.6)
        writer.write(b"ok")
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert isinstance(svc, ProxyService)
