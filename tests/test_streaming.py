"""Streamed answers through the proxy port: server-sent events reach the caller as the upstream sends them, time to
first byte is measured apart from the duration, and a caller that hangs up mid-stream closes the upstream request.

No timed bounds on delivery: the upstream sends event i+1 only once the caller has confirmed event i, so a proxy that
buffers any part of the stream leaves the upstream waiting for a confirmation that never comes (the test fails on
its generous overall timeout instead of on a latency that could flake)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.logs import AccessLog
from tests.support.servers import ProxyFactory
from tests.support.session import new_key

Serve = Callable[..., Awaitable[str]]
KeyDir = Callable[..., dict[str, str]]

EVENTS = 5
WAIT = 10.0  # the generous bound on any one confirmation (a buffering proxy never gives it)
LAST_PAUSE = 0.15  # the caller holds its confirmation of the last event this long: duration - ttfb >= this


def metric(service: Any, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def sse_app(rounds: list[list[asyncio.Event]], failures: list[str]) -> web.Application:
    """An event stream of EVENTS events, each sent only after the caller confirmed the one before it (the
    confirmations of the latest round in `rounds`)."""

    async def events(request: web.Request) -> web.StreamResponse:
        confirmed = rounds[-1]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(EVENTS):
            await resp.write(f"data: {json.dumps({'i': i})}\n\n".encode())
            try:
                await asyncio.wait_for(confirmed[i].wait(), WAIT)
            except TimeoutError:
                failures.append(f"event {i} never reached the caller while the upstream waited ({WAIT} s)")
                break
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/{t:.*}", events)
    return app


async def read_event(content: aiohttp.StreamReader) -> bytes:
    event = b""
    while not event.endswith(b"\n\n"):
        line = await content.readline()
        if not line:
            return event
        event += line
    return event


async def test_each_event_reaches_the_caller_before_the_upstream_sends_the_next(
    serve: Serve, make_proxy: ProxyFactory, key_dir: KeyDir
) -> None:
    failures: list[str] = []
    rounds: list[list[asyncio.Event]] = []
    upstream = await serve(sse_app(rounds, failures))
    svc = await make_proxy({"name": "sse", "upstream": upstream, "auth": key_dir(new_key("p"))})
    buffer = io.StringIO()
    svc.handler.access_log = AccessLog(buffer, interval=3600)
    async with aiohttp.ClientSession() as client:
        # Twice: the first goes on a new upstream connection (a task), the second on the pooled one (sent from
        # the handler and answered from the upstream connection's callback); both paths relay the same way.
        for _ in range(2):
            confirmed = [asyncio.Event() for _ in range(EVENTS)]
            rounds.append(confirmed)
            async with asyncio.timeout(EVENTS * WAIT + 5):
                resp = await client.get(f"http://127.0.0.1:{svc.proxy_port}/v1/chat/completions")
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "text/event-stream"
                assert resp.headers["Transfer-Encoding"] == "chunked"
                for i in range(EVENTS):
                    got = await read_event(resp.content)
                    assert got == f"data: {json.dumps({'i': i})}\n\n".encode(), (i, got, failures)
                    if i == EVENTS - 1:
                        await asyncio.sleep(LAST_PAUSE)
                    confirmed[i].set()
                assert await read_event(resp.content) == b"data: [DONE]\n\n"
                assert await resp.content.read() == b""
                resp.release()
    assert failures == []
    svc.handler.access_log.flush()
    lines = [json.loads(x) for x in buffer.getvalue().splitlines()]
    assert [x["status"] for x in lines] == [200, 200]
    for line in lines:
        # The head went out with the first event; the last event waited LAST_PAUSE for the caller's confirmation.
        assert 0 <= line["ttfb_ms"] <= line["duration_ms"] - LAST_PAUSE * 1000 * 0.9, line
    assert metric(svc, "aml_auth_proxy_time_to_first_byte_seconds_count", route="sse") == 2
    ttfb_sum = metric(svc, "aml_auth_proxy_time_to_first_byte_seconds_sum", route="sse")
    duration_sum = metric(svc, "aml_auth_proxy_request_duration_seconds_sum", route="sse")
    assert 0 < ttfb_sum <= duration_sum - 2 * LAST_PAUSE * 0.9


async def test_a_whole_answer_has_its_time_to_first_byte_equal_to_its_duration(
    serve: Serve, make_proxy: ProxyFactory, key_dir: KeyDir
) -> None:
    async def whole(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/{t:.*}", whole)
    svc = await make_proxy({"name": "w", "upstream": await serve(app), "auth": key_dir(new_key("p"))})
    buffer = io.StringIO()
    svc.handler.access_log = AccessLog(buffer, interval=3600)
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.get(f"http://127.0.0.1:{svc.proxy_port}/score") as resp:
                assert resp.status == 200 and await resp.json() == {"ok": True}
    svc.handler.access_log.flush()
    lines = [json.loads(x) for x in buffer.getvalue().splitlines()]
    assert len(lines) == 3 and all(x["ttfb_ms"] == x["duration_ms"] for x in lines)
    assert metric(svc, "aml_auth_proxy_time_to_first_byte_seconds_count", route="w") == 3
    assert metric(svc, "aml_auth_proxy_time_to_first_byte_seconds_sum", route="w") == metric(
        svc, "aml_auth_proxy_request_duration_seconds_sum", route="w"
    )


class PausingUpstream:
    """An event stream that sends one event (or one every `every` seconds) and records when its connection to the
    proxy closes or its write fails."""

    def __init__(self, every: float | None) -> None:
        self.every = every
        self.sent = asyncio.Event()
        self.closed = asyncio.Event()
        self.peers: list[tuple[str, int]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self.peers.append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        try:
            await resp.write(b"data: 0\n\n")
            self.sent.set()
            for i in range(1, 3000):  # bounded: at most 30 s of polling
                await asyncio.sleep(0.01)
                if request.transport is None or request.transport.is_closing():
                    break
                if self.every is not None and i % max(1, round(self.every / 0.01)) == 0:
                    await resp.write(f"data: {i}\n\n".encode())
        except ConnectionError:
            pass
        self.closed.set()
        return resp

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{t:.*}", self.handle)
        return app


async def start_stream(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: proxy\r\nAccept: text/event-stream\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
    assert b"data: 0\n\n" in await asyncio.wait_for(reader.readuntil(b"data: 0\n\n\r\n"), WAIT)
    return reader, writer


async def hung_up(svc: Any, upstream: PausingUpstream, route: str) -> None:
    """The upstream saw its connection end, the pool kept nothing, and the request counts as the caller's 499."""
    await asyncio.wait_for(upstream.closed.wait(), WAIT)
    pool = svc.routes[0].pool
    for _ in range(100):
        if pool.open == 0 and metric(svc, "aml_auth_proxy_requests_total", route=route, method="GET", code="499"):
            break
        await asyncio.sleep(0.02)
    assert pool.open == 0 and pool.idle == 0
    assert metric(svc, "aml_auth_proxy_requests_total", route=route, method="GET", code="499") == 1
    assert metric(svc, "aml_auth_proxy_client_disconnects_total", route=route) == 1
    # ...and its head had reached the caller: it has a time to first byte.
    assert metric(svc, "aml_auth_proxy_time_to_first_byte_seconds_count", route=route) == 1


async def test_a_caller_that_resets_during_a_pause_closes_the_upstream_request_at_once(
    serve: Serve, make_proxy: ProxyFactory, key_dir: KeyDir
) -> None:
    # The upstream sends one event and then nothing: only the caller's hang-up can end the exchange.
    upstream = PausingUpstream(every=None)
    svc = await make_proxy({"name": "p", "upstream": await serve(upstream.app()), "auth": key_dir(new_key("p"))})
    _reader, writer = await start_stream(svc.proxy_port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    writer.close()
    await hung_up(svc, upstream, "p")


async def test_a_caller_that_closes_mid_stream_closes_the_upstream_request(
    serve: Serve, make_proxy: ProxyFactory, key_dir: KeyDir
) -> None:
    # An ordinary close (FIN) while events keep coming: the proxy's next writes find the caller gone.
    upstream = PausingUpstream(every=0.02)
    svc = await make_proxy({"name": "c", "upstream": await serve(upstream.app()), "auth": key_dir(new_key("p"))})
    async with aiohttp.ClientSession() as client:
        resp = await client.get(f"http://127.0.0.1:{svc.proxy_port}/stream")
        assert await read_event(resp.content) == b"data: 0\n\n"
        resp.close()  # the caller goes away mid-stream
    await hung_up(svc, upstream, "c")


async def test_a_caller_that_half_closes_during_a_pause_closes_the_upstream_request_at_once(
    serve: Serve, make_proxy: ProxyFactory, key_dir: KeyDir
) -> None:
    # A FIN (shutdown of the caller's sending side, or an ordinary close that has nothing to reset) while the
    # upstream is silent: an answer without an end of its own takes it as the caller's hang-up, as nginx does.
    upstream = PausingUpstream(every=None)
    svc = await make_proxy({"name": "f", "upstream": await serve(upstream.app()), "auth": key_dir(new_key("p"))})
    reader, writer = await start_stream(svc.proxy_port)
    writer.write_eof()
    await hung_up(svc, upstream, "f")
    assert await asyncio.wait_for(reader.read(), WAIT) == b""  # and the caller's connection is closed
    writer.close()


class GatedUpstream:
    """Answers GET /{name}: the first piece of its answer at once, the rest once `gate` is set. /stream is an event
    stream (chunked, no length), /sized has a Content-Length."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.arrived = asyncio.Event()
        self.closed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.arrived.set()
        sized = request.match_info["name"] == "sized"
        resp = web.StreamResponse(headers={"Content-Type": "text/plain" if sized else "text/event-stream"})
        if sized:
            resp.content_length = 20
        else:
            resp.enable_chunked_encoding()
        try:
            await asyncio.wait_for(self.gate.wait(), WAIT) if request.query.get("hold") else None
            await resp.prepare(request)
            await resp.write(b"first part")
            await asyncio.wait_for(self.gate.wait(), WAIT)
            await resp.write(b"last part!")
            await resp.write_eof()
        except (ConnectionError, TimeoutError):
            self.closed.set()
        return resp

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{name}", self.handle)
        return app


class GatedCall:
    """A proxy in front of a GatedUpstream, and a caller connection to it."""

    def __init__(self, svc: Any, upstream: GatedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.svc, self.upstream, self.reader, self.writer = svc, upstream, reader, writer

    async def half_close(self) -> None:
        """Shut the caller's sending side, wait until the proxy has read the FIN, then let the upstream go on."""
        self.writer.write_eof()
        for _ in range(500):  # bounded: 5 s
            if any(c.caller_done for c in self.svc._proxy_server.connections):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the proxy never saw the caller's FIN")
        self.upstream.gate.set()

    async def rest(self) -> bytes:
        """All the caller gets until the proxy closes the connection."""
        got = await asyncio.wait_for(self.reader.read(), WAIT)
        self.writer.close()
        return got

    def disconnects(self) -> float:
        return metric(self.svc, "aml_auth_proxy_client_disconnects_total", route="g")


@pytest.fixture
async def gated(serve: Serve, make_proxy: ProxyFactory, key_dir: KeyDir) -> Callable[[bytes], Awaitable[GatedCall]]:
    async def call(requests: bytes) -> GatedCall:
        upstream = GatedUpstream()
        svc = await make_proxy({"name": "g", "upstream": await serve(upstream.app()), "auth": key_dir(new_key("p"))})
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.proxy_port)
        writer.write(requests)
        return GatedCall(svc, upstream, reader, writer)

    return call


Gated = Callable[[bytes], Awaitable[GatedCall]]


async def test_a_caller_that_half_closes_before_a_streamed_answer_starts_gets_none(gated: Gated) -> None:
    call = await gated(b"GET /stream?hold=1 HTTP/1.1\r\nHost: proxy\r\n\r\n")
    await asyncio.wait_for(call.upstream.arrived.wait(), WAIT)
    await call.half_close()  # the head and the first event now come, to a caller that is gone
    assert await call.rest() == b""
    pool = call.svc.routes[0].pool
    for _ in range(500):  # bounded: 5 s
        if call.disconnects() and pool.open == 0:
            break
        await asyncio.sleep(0.01)
    assert pool.open == 0 and pool.idle == 0
    assert metric(call.svc, "aml_auth_proxy_requests_total", route="g", method="GET", code="499") == 1


async def test_a_half_closed_caller_still_gets_a_whole_answer_with_a_length(gated: Gated) -> None:
    # A FIN is a half-close (every answer the caller asked for still comes, then the connection closes) except
    # during an answer without a length with nothing pipelined after it.
    call = await gated(b"GET /sized HTTP/1.1\r\nHost: proxy\r\n\r\n")
    assert b"Content-Length: 20" in await asyncio.wait_for(call.reader.readuntil(b"\r\n\r\n"), WAIT)
    assert await asyncio.wait_for(call.reader.readexactly(10), WAIT) == b"first part"
    await call.half_close()
    assert await call.rest() == b"last part!"  # the rest, then the close
    assert call.disconnects() == 0


async def test_a_half_closed_caller_gets_a_streamed_answer_whole_when_it_pipelined_a_request_after_it(
    gated: Gated,
) -> None:
    call = await gated(b"GET /stream HTTP/1.1\r\nHost: proxy\r\n\r\nGET /sized HTTP/1.1\r\nHost: proxy\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in await asyncio.wait_for(call.reader.readuntil(b"\r\n\r\n"), WAIT)
    assert await asyncio.wait_for(call.reader.readuntil(b"first part\r\n"), WAIT) == b"a\r\nfirst part\r\n"
    await call.half_close()
    rest = await call.rest()  # the stream's end, the second answer whole, the close
    assert rest.startswith(b"a\r\nlast part!\r\n0\r\n\r\nHTTP/1.1 200 ")
    assert rest.endswith(b"\r\n\r\nfirst partlast part!")
    assert call.disconnects() == 0
