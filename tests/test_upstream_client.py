"""The upstream client (proxy/upstream.py) on its own, against raw HTTP/1.1 servers on 127.0.0.1: the answers and
pool behaviours the proxy-level suites (test_forwarding, tests/faults) do not reach directly."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvloop
from multidict import CIMultiDict

from proxy.upstream import UpstreamError, UpstreamPool
from tests.faults import upstreams as u
from tests.faults.upstreams import Exchange, FaultyUpstream


def make_pool(port: int, **overrides: Any) -> UpstreamPool:
    args: dict[str, Any] = {
        "scheme": "http",
        "host": "127.0.0.1",
        "port": port,
        "host_header": f"127.0.0.1:{port}",
        "ssl_context": None,
        "max_connections": 8,
        "keepalive_seconds": 30.0,
        "connect_timeout": 2.0,
        "read_timeout": 2.0,
        "total_timeout": None,
    }
    args.update(overrides)
    return UpstreamPool(**args)


async def fetch(pool: UpstreamPool, method: str = "GET", body: Any = None, **headers: str) -> tuple[int, bytes]:
    response = await pool.request(method, "/x", CIMultiDict(headers), body)
    try:
        return response.status, await response.read()
    finally:
        response.release()


def answer(data: bytes, *, keep: bool = True) -> u.Behaviour:
    """Write these bytes as the whole answer."""

    async def run(ex: Exchange) -> bool:
        ex.writer.write(data)
        await ex.writer.drain()
        return keep

    return run


@pytest.fixture
async def up() -> AsyncIterator[FaultyUpstream]:
    server = await FaultyUpstream.start()
    yield server
    await server.stop()


async def test_a_head_answer_ends_at_its_head_and_the_connection_is_reused(up: FaultyUpstream) -> None:
    pool = make_pool(up.port)
    up.script(answer(u.response_head(200, {"Content-Length": "1000"})))  # no body follows a HEAD answer
    assert await fetch(pool, "HEAD") == (200, b"")
    assert await fetch(pool) == (200, b"ok")
    assert up.connections == 1 and [a.method for a in up.arrivals] == ["HEAD", "GET"]
    await pool.close()


async def test_informational_answers_are_skipped_for_the_final_one(up: FaultyUpstream) -> None:
    pool = make_pool(up.port)
    final = u.response_head(201, {"Content-Length": "4"}) + b"made"
    up.script(answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + final))
    assert await fetch(pool, "POST", b"x") == (201, b"made")
    assert await fetch(pool) == (200, b"ok")
    assert up.connections == 1
    await pool.close()


async def test_a_body_without_framing_ends_when_the_upstream_closes(up: FaultyUpstream) -> None:
    pool = make_pool(up.port)
    up.script(answer(u.response_head(200, {}) + b"until the end", keep=False))
    assert await fetch(pool) == (200, b"until the end")
    assert await fetch(pool) == (200, b"ok")
    assert up.connections == 2  # a body that ends at close leaves no connection to reuse
    await pool.close()


@pytest.mark.parametrize("coding", ["identity", "gzip", "chunked, gzip", "gzip, chunked"])
async def test_a_transfer_coding_the_proxy_cannot_decode_is_a_protocol_error(up: FaultyUpstream, coding: str) -> None:
    # RFC 9112 would read such a body to the close; relayed without its Transfer-Encoding it would be garbage.
    pool = make_pool(up.port)
    up.script(answer(u.response_head(200, {"Transfer-Encoding": coding}) + b"\x1f\x8b\x08\x00", keep=False))
    with pytest.raises(UpstreamError) as failed:
        await fetch(pool)
    assert (failed.value.kind, failed.value.reason) == ("protocol", "upstream sent an unsupported Transfer-Encoding")
    assert await fetch(pool) == (200, b"ok")
    await pool.close()


async def test_an_invalid_body_fails_at_once_as_a_protocol_error_while_the_upstream_stays_connected(
    up: FaultyUpstream,
) -> None:
    pool = make_pool(up.port, read_timeout=5.0)
    head = u.response_head(200, {"Transfer-Encoding": "chunked"})
    up.script(answer(head + u.chunk(b"a" * 100) + b"zz\r\nnot a chunk size\r\n"))  # and the connection stays open
    response = await pool.request("GET", "/x", CIMultiDict(), None)
    started = time.monotonic()
    with pytest.raises(UpstreamError) as failed:
        await response.read()
    response.release()
    assert (failed.value.kind, failed.value.reason) == ("protocol", "upstream sent an invalid body")
    assert time.monotonic() - started < 1.0  # not the read timeout
    assert pool.idle == 0
    await pool.close()


async def test_an_endless_response_head_is_cut_off_once_it_passes_the_bound(up: FaultyUpstream) -> None:
    pool = make_pool(up.port, read_timeout=5.0)
    sent = []

    async def endless_header(ex: Exchange) -> bool:
        ex.writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        for _ in range(1024):  # 64 MiB of one header value, never ended: more than socket buffers can absorb
            ex.writer.write(b"v" * 65536)
            sent.append(65536)
            await ex.writer.drain()
        return True

    up.script(endless_header)
    with pytest.raises(UpstreamError) as failed:
        await fetch(pool)
    assert (failed.value.kind, failed.value.reason) == ("protocol", "upstream sent an oversized response head")
    # Cut off while the upstream was still sending. The kernel's socket buffers (tcp_rmem/tcp_wmem, autotuned,
    # with cached per-destination metrics) may take tens of MiB first, so the bound is well past them.
    assert sum(sent) < 64 << 20
    await pool.close()


async def test_a_caller_reading_slowly_pauses_the_upstream_instead_of_buffering(up: FaultyUpstream) -> None:
    pool = make_pool(up.port)
    size = 32 << 20
    sent: list[asyncio.StreamWriter] = []

    async def big(ex: Exchange) -> bool:
        sent.append(ex.writer)
        ex.writer.write(u.response_head(200, {"Content-Length": str(size)}))
        for _ in range(size >> 20):
            ex.writer.write(b"z" * (1 << 20))
            await ex.writer.drain()
        return True

    up.script(big)
    response = await pool.request("GET", "/big", CIMultiDict(), None)
    await asyncio.sleep(0.5)  # nobody reads: the client must stop reading from the socket
    assert response.buffered <= 2 << 20
    assert sent and sent[0].transport.get_write_buffer_size() > 0  # the upstream is the one holding the bytes
    total = len(await response.read())
    response.release()
    assert total == size
    assert await fetch(pool) == (200, b"ok")  # and the connection went back to the pool
    assert up.connections == 1
    await pool.close()


async def test_requests_beyond_max_connections_wait_for_a_free_one(up: FaultyUpstream) -> None:
    pool = make_pool(up.port, max_connections=2)
    up.default = u.ok(b"slow", delay=0.2)
    results = await asyncio.gather(*(fetch(pool) for _ in range(6)))
    assert results == [(200, b"slow")] * 6
    assert up.connections == 2 and pool.open == 2
    await pool.close()


async def test_waiting_for_a_free_connection_is_bounded_by_the_connect_timeout(up: FaultyUpstream) -> None:
    pool = make_pool(up.port, max_connections=1, connect_timeout=0.3)
    up.default = u.ok(b"slow", delay=1.0)
    started = time.monotonic()
    first, second = await asyncio.gather(fetch(pool), fetch(pool), return_exceptions=True)
    assert first == (200, b"slow")
    assert isinstance(second, UpstreamError) and (second.kind, second.status) == ("timeout", 504)
    assert second.reason == "no upstream connection free within the connect timeout"
    assert time.monotonic() - started < 1.5 and len(up.arrivals) == 1
    up.default = u.ok()
    assert await fetch(pool) == (200, b"ok")  # the slot is free again
    await pool.close()


async def test_a_waiter_cancelled_after_it_was_woken_passes_the_free_connection_on(up: FaultyUpstream) -> None:
    pool = make_pool(up.port, max_connections=1)
    held, _reused = await pool._acquire()
    first = asyncio.create_task(pool._acquire())
    second = asyncio.create_task(pool._acquire())
    await asyncio.sleep(0.05)  # both wait for the one connection
    pool._release(held)  # wakes the first waiter ...
    first.cancel()  # ... which is cancelled before it runs (its caller went away)
    conn, reused = await asyncio.wait_for(second, 1.0)
    assert conn is held and reused
    assert first.cancelled()
    await pool.close()


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_pooled_connection_the_loop_is_already_closing_is_never_written_to(loop_factory: Any) -> None:
    """A reset read makes the loop close a transport at once and call connection_lost a turn later. A request in
    between must not fail (uvloop raises RuntimeError on a write to a closed handle): it goes on a new connection,
    on both loops (the product runs on uvloop, the in-process tests on asyncio's)."""

    async def scenario() -> None:
        up = await FaultyUpstream.start()
        pool = make_pool(up.port)
        assert await fetch(pool) == (200, b"ok")
        (conn,) = pool._idle
        assert conn.transport is not None
        conn.transport.abort()  # what the loop does on ECONNRESET; connection_lost is still to come
        assert not conn.closed
        assert await fetch(pool) == (200, b"ok")
        assert up.connections == 2
        await pool.close()
        await up.stop()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario())


async def test_idle_connections_are_closed_after_keepalive_seconds(up: FaultyUpstream) -> None:
    pool = make_pool(up.port, keepalive_seconds=0.2)
    assert await fetch(pool) == (200, b"ok")
    assert pool.idle == 1
    await asyncio.sleep(0.5)
    assert pool.idle == 0 and pool.open == 0
    assert await fetch(pool) == (200, b"ok")
    assert up.connections == 2
    await pool.close()


async def test_an_answer_before_the_upload_ends_stops_the_upload_and_drops_the_connection() -> None:
    """An upstream may refuse an upload early (413, 401) without reading it; the answer is passed on, the rest of
    the upload is not sent, and the connection (with an unfinished request on it) is never reused."""
    heads: list[bytes] = []
    done = asyncio.Event()

    async def refuse_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(u.response_head(413, {"Content-Length": "8"}) + b"too much")
        await writer.drain()
        await done.wait()  # never reads the upload
        writer.close()

    server = await asyncio.start_server(refuse_early, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = make_pool(port)
    stopped = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            for _ in range(10_000):  # bounded; the test ends it long before
                yield b"u" * 1024
                await asyncio.sleep(0.01)
        finally:
            stopped.set()

    headers = CIMultiDict({"Transfer-Encoding": "chunked"})
    response = await pool.request("POST", "/upload", headers, endless())
    assert response.status == 413 and await response.read() == b"too much"
    response.release()
    async with asyncio.timeout(2):
        await stopped.wait()
    await asyncio.sleep(0)
    assert pool.idle == 0 and len(heads) == 1
    await pool.close()
    done.set()
    await asyncio.sleep(0.01)
    server.close()
    await server.wait_closed()


async def test_an_upload_failing_after_the_answer_began_is_reported_nowhere_and_drops_the_connection() -> None:
    """The body source may fail (a caller gone, a body over the limit) after the upstream already answered: the
    answer stands, the connection is not reused, and asyncio never logs an unretrieved task exception."""
    done = asyncio.Event()

    async def answer_then_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(u.response_head(200, {"Content-Length": "5"}) + b"early")
        await writer.drain()
        await done.wait()
        writer.close()

    server = await asyncio.start_server(answer_then_read, "127.0.0.1", 0)
    pool = make_pool(server.sockets[0].getsockname()[1])
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    answered = asyncio.Event()

    async def breaks_after_the_answer() -> AsyncIterator[bytes]:
        yield b"first"
        await answered.wait()
        raise ConnectionResetError("the caller went away")

    chunked = CIMultiDict({"Transfer-Encoding": "chunked"})
    response = await pool.request("POST", "/x", chunked, breaks_after_the_answer())
    assert response.status == 200 and await response.read() == b"early"
    answered.set()
    await asyncio.sleep(0.05)  # the upload fails now, after the answer
    response.release()
    del response
    gc.collect()
    await asyncio.sleep(0)
    assert unhandled == [] and pool.idle == 0
    loop.set_exception_handler(None)
    done.set()
    await pool.close()
    server.close()
    await server.wait_closed()


async def test_total_timeout_bounds_an_answer_that_keeps_trickling(up: FaultyUpstream) -> None:
    pool = make_pool(up.port, read_timeout=5.0, total_timeout=0.5)
    up.script(u.trickle([b"t"] * 40, 0.05))  # never stalls past the read timeout; lasts 2 s
    started = time.monotonic()
    with pytest.raises(UpstreamError) as failed:
        await fetch(pool)
    assert failed.value.kind == "timeout" and failed.value.status == 504
    assert time.monotonic() - started < 1.5
    await pool.close()


async def test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent(up: FaultyUpstream) -> None:
    pool = make_pool(up.port)
    with pytest.raises(UpstreamError) as refused:
        await fetch(pool, **{"X-Note": "a\r\nX-Injected: 1"})
    assert refused.value.kind == "protocol"
    await asyncio.sleep(0.05)
    assert up.arrivals == [] and up.connections == 0
    await pool.close()


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_a_streamed_upload_arrives_whole_with_its_framing(up: FaultyUpstream, framing: str) -> None:
    pool = make_pool(up.port)
    parts = [bytes([i]) * 70_000 for i in range(20)]
    whole = b"".join(parts)

    async def stream() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    headers = {"Transfer-Encoding": "chunked"} if framing == "chunked" else {"Content-Length": str(len(whole))}
    up.script(u.digest())
    assert await fetch(pool, "PUT", stream(), **headers) == (
        200,
        f"{len(whole)} {hashlib.sha256(whole).hexdigest()}".encode(),
    )
    assert up.arrivals[0].framing == framing
    await pool.close()


@pytest.mark.parametrize("method", ["GET", "PUT", "POST"])
async def test_a_pooled_connection_the_upstream_closed_as_the_request_arrived_is_resent_on_only_for_idempotent_methods(
    up: FaultyUpstream, method: str
) -> None:
    # request() is the path for a request whose body came after its head (the handler sends the others with
    # send_now and decides the resend itself): a reused connection may turn out closed before any answer byte.
    up.default = u.close_when_idle(2.0)
    pool = make_pool(up.port)
    assert await fetch(pool) == (200, b"ok")
    body = b"body" if method != "GET" else None
    if method == "POST":  # the upstream may have acted on it: never resent
        with pytest.raises(UpstreamError) as failed:
            await fetch(pool, method, body, **{"Content-Length": "4"})
        assert failed.value.kind == "reset" and failed.value.before_answer
        assert [a.method for a in up.arrivals] == ["GET"]
    else:
        extra = {"Content-Length": "4"} if body else {}
        assert await fetch(pool, method, body, **extra) == (200, b"ok")
        assert [a.method for a in up.arrivals] == ["GET", method]
    assert up.dropped == 1
    await pool.close()
