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
