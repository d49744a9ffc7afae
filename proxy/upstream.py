"""The upstream hop: a small HTTP/1.1 client with one keep-alive pool per route.

Why not aiohttp's ClientSession: the profile of the proxy under load showed about half of each request's CPU time
inside ClientSession._request (URL handling, tracing hooks, timer objects, request and response wrappers), none of
which a reverse proxy with a fixed upstream needs. This client writes the request head in one call, parses the
answer with llhttp (httptools, the parser aiohttp itself uses), and keeps the behaviours the proxy relies on:

- a keep-alive pool per route, bounded by `pool.max_connections`, idle connections closed after
  `pool.keepalive_seconds`, and connections the upstream closed never reused;
- one resend on a fresh connection when a reused keep-alive connection turns out closed before any byte of the
  answer, for idempotent methods with a replayable body only (the upstream may have acted on a POST);
- `timeouts.connect` for connect and TLS handshake, `timeouts.read` as the longest wait without progress (no byte
  read, no body chunk written), `timeouts.total` for the whole exchange;
- TLS verified against the system or a given CA bundle, with the upstream's host name;
- request bodies as bytes (Content-Length) or streamed (the caller's Content-Length, or chunked), with
  backpressure both ways: a slow caller pauses reading from the upstream, a slow upstream pauses the upload;
- every failure as an UpstreamError with a fixed kind and reason, never text from the peer.

What it does not do: redirects, cookies, decompression, proxies from the environment, HTTP/2, upgrades.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterable, Callable
from typing import Any, Final

import httptools
from multidict import CIMultiDict

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_HIGH_WATER: Final = 1 << 17  # buffered answer bytes beyond which reading from the upstream pauses
_NO_BODY_STATUS: Final = frozenset({204, 304})
MAX_HEAD_BYTES: Final = 1 << 16  # an answer's status line and headers (interim answers included) may not exceed this
# Raw bytes a chunked body's framing or trailers may take without a byte of body: llhttp keeps an unfinished
# chunk-size line or trailer in memory, so an endless one is fed only so far.
MAX_FRAMING_BYTES: Final = 1 << 16
_INTERIM: Final = frozenset({100, 102, 103})  # interim answers passed over; any other 1xx is not understood


class UpstreamError(Exception):
    """A failure of the upstream exchange: `kind` for metrics, `reason` for the caller, `status` 502 or 504."""

    def __init__(self, kind: str, reason: str, status: int = 502, *, before_answer: bool = False) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.status = status
        self.before_answer = before_answer  # the connection ended before any byte of the answer


def _closed(before_answer: bool) -> UpstreamError:
    return UpstreamError("reset", "upstream closed the connection", before_answer=before_answer)


def _timed_out() -> UpstreamError:
    return UpstreamError("timeout", "upstream timed out", 504)


def _invalid(head_done: bool) -> UpstreamError:
    if head_done:
        return UpstreamError("protocol", "upstream sent an invalid body")
    return UpstreamError("protocol", "upstream sent an invalid response")


class _Connection(asyncio.Protocol):
    """One upstream connection; at most one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.exchange: UpstreamResponse | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes nobody asked for: the connection cannot be trusted with another request
            self.close()
            return
        exchange._received(data)

    def eof_received(self) -> bool:
        exchange = self.exchange
        if exchange is not None:
            exchange._ended(None)
        # Nothing more will come: not reusable from this moment, before connection_lost (the transport closes next).
        self.closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        exchange = self.exchange
        if exchange is not None:
            exchange._ended(exc)
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        self.pool._forget(self)

    def watch(self, due: float) -> None:
        """Make sure the timer fires by `due`. One already set to fire earlier stays: when it fires, the exchange
        then running checks its own due time and sets it again (so a steady stream of exchanges costs no timer
        work per exchange)."""
        timer = self._timer
        if timer is not None and self._timer_due <= due:
            return
        if timer is not None:
            timer.cancel()
        self._timer_due = due
        self._timer = self.pool.loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._timer = None
        exchange = self.exchange
        if exchange is not None:
            exchange._check_timeout()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain = self.pool.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class UpstreamResponse:
    """The answer to one request: status, reason and headers once the head arrived; the body read with
    read_chunk(). `complete` is true once the whole message arrived (often together with the head).
    Always end it with release()."""

    def __init__(
        self,
        conn: _Connection,
        method: str,
        read_timeout: float,
        deadline: float | None,
        notify: Callable[[UpstreamResponse], None] | None = None,
    ) -> None:
        self._conn = conn
        self._loop = conn.pool.loop
        self._parser: Any = httptools.HttpResponseParser(self)  # None once released
        self._no_body = method == "HEAD"
        self._read_timeout = read_timeout
        self._deadline = deadline
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[str, str]] = []  # (name, value) as received, decoded like aiohttp's
        self.complete = False
        self.has_length = False  # the answer's head has a Content-Length (passed on as it is)
        self._pairs: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._informational = False
        self.head_done = False  # status and headers are known
        self._head_waiter: asyncio.Future[None] | None = None  # wait_head() waiting
        # Called once, from the connection's callbacks, when the head has arrived (with as much of the body as came
        # with it: `complete` tells) or the exchange failed: a request path without a task or a future per request.
        self._notify = notify
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._reusable = True
        self._got_bytes = False
        self._room = MAX_HEAD_BYTES  # raw bytes the parser may take without progress (see _feed_bounded)
        self._chunked = False
        self._broken: str | None = None  # why a callback found the answer unacceptable (callbacks must not raise)
        self._needs_eof = False
        self._released = False
        self._sender: asyncio.Task[None] | None = None
        self._progress = self._loop.time()
        conn.watch(self._due())

    # -- llhttp callbacks (must not raise: httptools would turn it into a generic callback error)

    def on_message_begin(self) -> None:
        if self.complete:
            self._reusable = False  # a second answer nobody asked for
        self._pairs = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # trailers after a chunked body are not passed on
            self._pairs.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete or self._broken is not None:
            return  # nothing after an answer found broken is taken (the exchange fails once the feed returns)
        status = self._parser.get_status_code()
        if status < 200:
            # 100 Continue, 102 Processing, 103 Early Hints: passed over; the real answer follows. A 1xx never has a
            # body (RFC 9112 6.3), and llhttp would read one that claims framing, or read any other 1xx's body
            # to the end of the connection: such an answer, and a status below 100, cannot be framed safely.
            if status not in _INTERIM:
                self._broken = "upstream sent an invalid status" if status < 100 else "upstream sent an unknown 1xx"
            elif any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self._pairs):
                self._broken = "upstream sent an interim answer with a body"
            self._informational = True
            self._pairs = []
            return
        self._room = MAX_FRAMING_BYTES
        pairs = []
        codings = 0  # Transfer-Encoding fields; more than one, or one that is not plain chunked, counts extra
        for name, value in self._pairs:
            pairs.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))
            size = len(name)
            if size == 14 or size == 17 or size == 10:  # only these lengths can be the three names read here
                lname = name.lower()
                if lname == b"content-length":
                    self.has_length = True
                elif lname == b"transfer-encoding":
                    codings += 1 if value.strip(b" \t").lower() == b"chunked" else 2
                elif lname == b"connection" and b"close" in value.lower():
                    self._reusable = False  # llhttp keeps an HTTP/1.0 `keep-alive, close` alive; close wins
        self._pairs = []
        if codings:
            # An HTTP/1.0 answer with Transfer-Encoding is not trusted for the next request (RFC 9112 6.1). Where a
            # body follows: the proxy decodes no coding but chunked (llhttp would read `gzip` to the end of the
            # connection and the body would be relayed without its coding), and Transfer-Encoding with
            # Content-Length is handled as the error it likely is (RFC 9112 6.3). An answer to HEAD, a 204 and a
            # 304 have no body whatever they say (a HEAD answer may name the coding a GET would get).
            if self._parser.get_http_version() != "1.1":
                self._reusable = False
            if not (self._no_body or status in _NO_BODY_STATUS):
                if codings != 1:
                    self._broken = "upstream sent an unsupported Transfer-Encoding"
                    return
                if self.has_length:
                    self._broken = "upstream sent Content-Length with Transfer-Encoding"
                    return
                self._chunked = True
        framed = self.has_length or self._chunked  # without either, the body ends when the connection does
        self.status = status
        self.reason = self._reason.decode("utf-8", "surrogateescape")
        self.raw_headers = pairs
        if self._no_body or status in _NO_BODY_STATUS:
            if not self._parser.should_keep_alive():
                self._reusable = False
            self._finish()
        else:
            self._needs_eof = not framed  # the body ends when the upstream closes the connection
        self.head_done = True
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._broken is not None:
            return
        if self.complete:
            self._reusable = False  # body bytes after an answer that has none (a HEAD answer, a 204)
            return
        if self._informational:
            self._broken = "upstream sent an interim answer with a body"
            return
        self._room = MAX_FRAMING_BYTES
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._broken is not None:
            return
        if self._informational:
            self._informational = False
            return
        self._room = MAX_FRAMING_BYTES
        if self.complete:
            return
        if not self._parser.should_keep_alive():
            self._reusable = False
        self._finish()

    # -- events from the connection

    def _received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            return
        self._got_bytes = True
        self._progress = self._loop.time()
        try:
            if self.head_done and not self._chunked:
                parser.feed_data(data)  # a body of known length (or up to the close) needs no bound of its own
            elif len(data) < self._room:
                self._room -= len(data)  # the usual case, a whole answer in one read: within the bound as it is
                parser.feed_data(data)
            else:
                self._feed_bounded(parser, data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("protocol", "upstream switched protocols, which the proxy does not support"))
        except httptools.HttpParserError:
            if self._broken is None:  # else the parser stumbled over what a callback had already found broken
                self._fail(_invalid(self.head_done))
        if self._broken is not None:
            self._fail(UpstreamError("protocol", self._broken))
        if self._notify is not None:
            self._tell()

    def _feed_bounded(self, parser: Any, data: bytes) -> None:
        """Feed a head, or a chunked body's framing and trailers, at most `_room` raw bytes without progress: the
        parser keeps an unfinished header, chunk-size line or trailer in memory, and a head that arrives whole
        in one read is bounded the same way (its status line and headers may not exceed MAX_HEAD_BYTES). Every
        step of progress (a head, a piece of body, a message's end) gives the room back."""
        view = memoryview(data)
        while view and self._error is None and self._broken is None:
            room = self._room
            if room <= 0:
                what = "framing or trailers" if self.head_done else "head"
                self._broken = f"upstream sent an oversized response {what}"
                return
            piece = view[:room] if len(view) > room else view
            view = view[len(piece) :]
            self._room = room - len(piece)
            parser.feed_data(piece)
            if self.head_done and not self._chunked:
                if view:
                    parser.feed_data(view)
                return

    def _ended(self, exc: Exception | None) -> None:
        """The upstream closed the connection (EOF) or it broke."""
        self._reusable = False
        if self.complete or self._error is not None:
            return
        if not self.head_done:
            self._fail(_closed(before_answer=not self._got_bytes))
        elif self._needs_eof and exc is None:
            self._finish()
        else:
            self._fail(UpstreamError("reset", "upstream broke off the body"))
        if self._notify is not None:
            self._tell()

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._reusable = False
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
            waiter.exception()  # retrieved here: a caller that went away must not leave a loop warning
        self._wake()
        self._conn.close()

    def _tell(self) -> None:
        """Call `notify` once the head is known or the exchange failed."""
        notify = self._notify
        if notify is not None and (self.head_done or self._error is not None):
            self._notify = None
            notify(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- timeouts: the connection's one timer, re-armed only when it fires early (never created per exchange)

    def _due(self) -> float:
        due = self._progress + self._read_timeout
        if self._deadline is not None and self._deadline < due:
            return self._deadline
        return due

    def _check_timeout(self) -> None:
        """The connection's timer fired during this exchange."""
        if self.complete or self._error is not None or self._released:
            return
        now = self._loop.time()
        if self._deadline is not None and now >= self._deadline:
            self._fail(_timed_out())
            self._tell()
            return
        waiting = not self.head_done or self._waiter is not None
        if waiting and now >= self._progress + self._read_timeout:
            self._fail(_timed_out())
            self._tell()
            return
        if not waiting:
            self._progress = now  # a caller reading slowly is not the upstream stalling
        self._conn.watch(self._due())

    def sent_progress(self) -> None:
        """A body chunk went out: the upstream is not stalled while it is still taking the upload."""
        self._progress = self._loop.time()

    # -- the consumer's side

    @property
    def buffered(self) -> int:
        """Bytes of the body received and not yet read (bounded: reading pauses beyond about 128 KiB)."""
        return self._buffered

    @property
    def error(self) -> UpstreamError | None:
        return self._error

    async def wait_head(self) -> None:
        if self.head_done:
            return
        if self._error is not None:
            raise self._error
        await self._head_future()

    def _head_future(self) -> asyncio.Future[None]:
        """Done when the head arrives or the exchange fails (created only when something waits for it)."""
        waiter = self._head_waiter
        if waiter is None or waiter.cancelled():
            waiter = self._head_waiter = self._loop.create_future()
        return waiter

    async def read_chunk(self) -> bytes:
        """The next piece of the body; b"" at its end. Raises UpstreamError when the body cannot be completed."""
        while True:
            chunks = self._chunks
            if chunks:
                chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._paused and not self._conn.closed and self._conn.transport is not None:
                    self._paused = False
                    self._conn.transport.resume_reading()
                return chunk
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._progress = self._loop.time()  # the read timeout counts from here or the last byte
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def body_now(self) -> bytes:
        """The whole body of a complete answer, without waiting."""
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return body

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with this answer: the connection goes back to the pool when the exchange ended cleanly."""
        if self._released:
            return
        self._released = True
        self._parser = None  # it holds this object's callbacks: dropping it leaves no cycle for the GC to find
        conn = self._conn
        conn.exchange = None
        if self._paused:  # the whole body came while reading was paused: the next exchange must be read
            self._paused = False
            if conn.transport is not None and not conn.closed:
                conn.transport.resume_reading()
        sender = self._sender
        if sender is not None and not sender.done():
            sender.cancel()  # the upstream answered before taking the whole upload
            self._reusable = False
        elif sender is not None and not sender.cancelled() and sender.exception() is not None:
            self._reusable = False  # the upload broke off after the answer began: retrieved here, never logged
        if self.complete and self._reusable and self._error is None and not self._chunks and not conn.closed:
            conn.pool._release(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Abandon the exchange and its connection."""
        self._reusable = False
        self.release()


class UpstreamPool:
    """Keep-alive connections to one upstream origin."""

    def __init__(
        self,
        *,
        scheme: str,
        host: str,
        port: int,
        host_header: str,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        keepalive_seconds: float,
        connect_timeout: float,
        read_timeout: float,
        total_timeout: float | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._host = host
        self._port = port
        self._ssl = ssl_context if scheme == "https" else None
        self._host_line = f"Host: {host_header}\r\n"
        self._limit = max_connections
        self._keepalive = keepalive_seconds
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._total_timeout = total_timeout
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def open(self) -> int:
        return len(self._all)

    # -- requests

    async def request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
        *,
        resend_if_stale: bool = True,
    ) -> UpstreamResponse:
        """Send one request and wait for the head of its answer. `headers` must already hold the framing
        (Content-Length, or Transfer-Encoding: chunked for a stream without one)."""
        head = self._head(method, target, headers)
        streamed = body is not None and not isinstance(body, bytes)
        chunked = streamed and "Transfer-Encoding" in headers
        resendable = resend_if_stale and not streamed and method in IDEMPOTENT
        # timeouts.total counts from here: the wait for a connection and a resend are part of the exchange.
        deadline = self._deadline()
        for attempt in range(2):
            conn, reused = await self._acquire()
            response = UpstreamResponse(conn, method, self._read_timeout, deadline)
            conn.exchange = response
            transport = conn.transport
            assert transport is not None
            try:
                if transport.is_closing():  # the loop closed it (a reset read) and connection_lost has not run yet
                    raise _closed(before_answer=True)
                if body is None:
                    transport.write(head)
                elif isinstance(body, bytes):
                    transport.writelines((head, body))
                else:
                    transport.write(head)
                    await self._start_upload(conn, response, body, chunked)
                await response.wait_head()
            except UpstreamError as err:
                response.close()
                if attempt == 0 and reused and resendable and err.before_answer:
                    continue  # once, on a new connection: one failing the same way is a real failure
                raise
            except BaseException:
                response.close()
                raise
            return response
        raise AssertionError("unreachable: the second attempt returns or raises")

    def send_now(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | None,
        notify: Callable[[UpstreamResponse], None],
    ) -> UpstreamResponse | None:
        """Send on an idle keep-alive connection without waiting, or return None when none is idle (then use
        request()). `notify(response)` is called once, from the connection's callbacks, when the head arrived or
        the exchange failed; a failure before any answer byte on this reused connection may be resent with
        request(). `headers` must hold the framing, as for request()."""
        head = self._head(method, target, headers)
        conn = self._take_idle(self.loop.time())
        if conn is None:
            return None
        response = UpstreamResponse(conn, method, self._read_timeout, self._deadline(), notify)
        conn.exchange = response
        transport = conn.transport
        assert transport is not None
        if body is None:
            transport.write(head)
        else:
            transport.writelines((head, body))
        return response

    def _deadline(self) -> float | None:
        """When timeouts.total ends for an exchange starting now."""
        return None if self._total_timeout is None else self.loop.time() + self._total_timeout

    def _take_idle(self, now: float) -> _Connection | None:
        """The most recently used idle connection still open and within keepalive_seconds."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if not conn.closed and transport is not None and not transport.is_closing():
                if now - conn.idle_since < self._keepalive:
                    return conn
            conn.close()
        return None

    def _head(self, method: str, target: str, headers: CIMultiDict[str]) -> bytes:
        lines = [method, " ", target, " HTTP/1.1\r\n", self._host_line]
        for name, value in headers.items():
            lines += (name, ": ", value, "\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("utf-8", "surrogateescape")
        if head.count(b"\n") != len(headers) + 3:  # defence in depth: every value was checked before this point
            raise UpstreamError("protocol", "a header for the upstream held a line break; nothing was sent")
        return head

    async def _start_upload(
        self, conn: _Connection, response: UpstreamResponse, body: AsyncIterable[bytes], chunked: bool
    ) -> None:
        """Send the body in its own task while waiting for the answer: an upstream may answer (and close) before
        taking the whole upload. Errors of the body source (the caller going away, a body over the limit)
        propagate from here."""
        sender = self.loop.create_task(_upload(conn, response, body, chunked))
        response._sender = sender
        if not response.head_done and response.error is None:
            await asyncio.wait((sender, response._head_future()), return_when=asyncio.FIRST_COMPLETED)
        if sender.done() and not sender.cancelled():
            failed = sender.exception()
            if failed is not None:
                raise failed

    # -- the pool

    async def _acquire(self) -> tuple[_Connection, bool]:
        """A pooled connection (reused=True) or a new one. Waiting for a free one when the pool is full and then
        connecting share one budget, timeouts.connect, as with aiohttp's connector."""
        deadline: float | None = None
        while True:
            now = self.loop.time()
            conn = self._take_idle(now)
            if conn is not None:
                return conn, True
            if self._closing:
                raise UpstreamError("connect", "the proxy is shutting down")
            if not self._limit or len(self._all) < self._limit:
                return await self._connect(deadline), False
            if deadline is None:
                deadline = now + self._connect_timeout
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled or timed out: pass the free slot on
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    reason = "no upstream connection free within the connect timeout"
                    raise UpstreamError("timeout", reason, 504) from exc
                raise

    async def _connect(self, deadline: float | None) -> _Connection:
        conn = _Connection(self)
        self._all.add(conn)  # counts against the limit while connecting
        if deadline is None:
            deadline = self.loop.time() + self._connect_timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self.loop.create_connection(
                    lambda: conn,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except BaseException as exc:
            self._forget(conn)
            if isinstance(exc, TimeoutError):
                raise UpstreamError("timeout", "upstream connect timed out", 504) from exc
            if isinstance(exc, ssl.SSLError | ssl.CertificateError):
                raise UpstreamError("tls", "upstream TLS handshake failed") from exc
            if isinstance(exc, OSError):
                raise UpstreamError("connect", "upstream connection failed") from exc
            raise
        return conn

    def _release(self, conn: _Connection) -> None:
        if self._closing:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._keepalive, self._sweep)
        self._wake_one()

    def _forget(self, conn: _Connection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            if conn in self._idle:
                self._idle.remove(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        """Close connections idle for keepalive_seconds."""
        self._sweeper = None
        now = self.loop.time()
        keep = []
        for conn in self._idle:
            if now - conn.idle_since >= self._keepalive or conn.closed:
                conn.close()
            else:
                keep.append(conn)
        self._idle[:] = keep
        if keep:
            oldest = min(c.idle_since for c in keep)
            self._sweeper = self.loop.call_at(oldest + self._keepalive, self._sweep)

    async def close(self) -> None:
        """Close every connection; requests still running fail."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        await asyncio.sleep(0)  # let connection_lost run


async def _upload(conn: _Connection, response: UpstreamResponse, body: AsyncIterable[bytes], chunked: bool) -> None:
    transport = conn.transport
    assert transport is not None
    async for chunk in body:
        if conn.closed or transport.is_closing():
            return  # the upstream went away; the answer's side reports it
        if not chunk:
            continue
        if chunked:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            transport.write(chunk)
        response.sent_progress()
        await conn.drain()
    if chunked and not conn.closed and not transport.is_closing():
        transport.write(b"0\r\n\r\n")


def pool_for(route: Any) -> UpstreamPool:
    """The pool for a route's config (proxy.config.Route)."""
    up = route.upstream
    tls = route.tls
    ctx: ssl.SSLContext | None = None
    if up.scheme == "https":
        if not tls.verify:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif tls.ca_file:
            ctx = ssl.create_default_context(cafile=tls.ca_file)
        else:
            ctx = ssl.create_default_context()
    host = up.raw_host or ""
    port = up.port or (443 if up.scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if up.is_default_port() else f"{shown}:{port}"
    t = route.timeouts
    return UpstreamPool(
        scheme=up.scheme,
        host=host,
        port=port,
        host_header=host_header,
        ssl_context=ctx,
        max_connections=route.pool.max_connections,
        keepalive_seconds=route.pool.keepalive_seconds,
        connect_timeout=t.connect,
        read_timeout=t.read,
        total_timeout=t.total,
    )
