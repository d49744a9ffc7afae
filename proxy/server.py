"""The proxy port's HTTP/1.1 server: an asyncio protocol with llhttp (httptools) as the request parser.

It replaces aiohttp's low-level server on the proxy port, which cost more CPU per request than the rest of the
proxy together. What it does, and nothing more:
- parses strictly: llhttp refuses request smuggling and malformed messages (Content-Length with
  Transfer-Encoding, duplicate Content-Length, obsolete line folding, bare CR or LF, bad chunk sizes, NUL in a
  header, a Transfer-Encoding that does not end in chunked); a repeated Host, Content-Type, Transfer-Encoding or
  similar single-valued header, and an HTTP/1.1 request without Host, are refused here;
- bounds what a caller can make it hold: the request line (414), one header field, the header block and the
  number of fields (431), bytes of a head never finished, request body bytes buffered ahead of the handler,
  pipelined requests parsed ahead of the one being answered;
- answers `Expect: 100-continue` when the handler first reads the body, never for a request refused before;
- keeps connections alive (HTTP/1.1 by default, HTTP/1.0 on request), answers pipelined requests in order,
  closes a connection idle or still sending its head after `client_timeout_seconds`;
- frames answers: Content-Length when known, else chunked (HTTP/1.1) or close-delimited (HTTP/1.0);
- backpressure both ways: reading from the caller pauses while its body waits, writing waits while the caller
  reads slowly; a caller that goes away fails the reads and writes of its request with CallerGone;
- graceful shutdown: stop accepting, close idle connections, let each request in progress finish (its body is
  still read) and close its connection after the answer, then cut what is left when the grace period ends.

A request the parser refuses is answered by `refusal(status, reason)`, which returns the answer's headers and
body; the reasons are fixed texts (llhttp's messages never quote the request's bytes, but they are mapped anyway).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Final

import httptools
from multidict import CIMultiDict

from proxy.config.settings import Limits
from proxy.errors import CallerGone
from proxy.headers import new_request_id
from proxy.logs import event

log: Final = logging.getLogger("aml_auth_proxy.server")

_BODY_HIGH_WATER: Final = 256 * 1024  # request body bytes buffered ahead of the handler before reading pauses
_BODY_LOW_WATER: Final = 64 * 1024
_MAX_QUEUED: Final = 8  # pipelined requests parsed ahead of the one being answered before reading pauses
_LINGER_SECONDS: Final = 2.0  # after refusing a request whose body is still coming, read and drop it this long...
_LINGER_BYTES: Final = 1 << 20  # ...or this much, so the caller sees the answer rather than a reset
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# Headers a request may carry once (as aiohttp's parser had it); a second copy is a smuggling or confusion attempt.
_SINGLETONS: Final = frozenset(
    {b"host", b"content-length", b"content-type", b"content-location", b"content-range", b"transfer-encoding"}
    | {b"max-forwards", b"user-agent"}
)
_REASONS: Final = {s.value: s.phrase for s in HTTPStatus} | {499: "Client Closed Request"}
# llhttp's error messages (fixed texts) to the reasons the proxy gives; the first match wins.
_PARSE_REASONS: Final[tuple[tuple[str, str], ...]] = (
    ("transfer-encoding can't be present with content-length", "Content-Length with Transfer-Encoding"),
    ("duplicate content-length", "duplicate header"),
    ("whitespace after header value", "obsolete line folding"),
    ("chunk", "invalid chunked body"),
    ("transfer-encoding", "invalid Transfer-Encoding"),
    ("content-length", "invalid Content-Length"),
    ("crlf", "bad line ending, expected CRLF"),
    ("expected lf", "bad line ending, expected CRLF"),
    ("expected cr", "bad line ending, expected CRLF"),
    ("header", "invalid header"),
    ("version", "invalid HTTP version"),
    ("data after `connection: close`", "data after Connection: close"),
)


def parse_reason(exc: BaseException) -> str:
    """The fixed reason for a request llhttp refused."""
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return "invalid method"
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return "invalid request target"
    text = str(exc).lower()
    for needle, reason in _PARSE_REASONS:
        if needle in text:
            return reason
    return "malformed request"


class Refused(Exception):
    """A request refused while its head or body was parsed: (status, fixed reason)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.head_only = False  # the refused request is a HEAD: its answer has no body


class RequestBody:
    """A request body as it arrives: read_exactly() for a body of known length, read_any() for a stream.

    Reading fails with Refused when the body broke its framing, and with CallerGone when the caller
    went away before it ended."""

    __slots__ = ("_chunks", "_conn", "_continue", "_eof", "_exc", "_size", "_waiter", "received")

    def __init__(self, conn: HttpConnection, expect_continue: bool) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._continue = expect_continue
        self.received = 0

    @property
    def buffered(self) -> int:
        return self._size

    @property
    def done(self) -> bool:
        """The whole body arrived (it may not all be read yet)."""
        return self._eof

    @property
    def awaits_continue(self) -> bool:
        """The caller asked for `100 Continue` and has not had it: it is not expected to send the body yet."""
        return self._continue

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self.received += len(data)
        conn = self._conn
        conn.body_buffered += len(data)
        if conn.body_buffered > _BODY_HIGH_WATER:
            conn.update_reading()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self._exc is None and not self._eof:
            self._exc = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        if self._continue:
            self._continue = False
            self._conn.send_continue()
        self._waiter = self._conn.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_exactly(self, n: int) -> bytes:
        """The whole body of Content-Length `n`."""
        while self._size < n and not self._eof and self._exc is None:
            await self._wait()
        if self._size < n:
            raise self._exc if self._exc is not None else CallerGone("the caller closed the connection")
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.discard()
        return data

    def take_whole(self, n: int) -> bytes | None:
        """The whole body of Content-Length `n` when all of it has arrived and none was read, else None."""
        if not self._eof or self._size != n or self.received != n:
            return None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.discard()
        return data

    async def read_any(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            await self._wait()
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        conn = self._conn
        conn.body_buffered -= len(chunk)
        if conn.body_buffered < _BODY_LOW_WATER:
            conn.update_reading()
        return chunk

    def discard(self) -> None:
        """Drop what is buffered (read, or never to be read)."""
        conn = self._conn
        conn.body_buffered -= self._size
        self._chunks.clear()
        self._size = 0
        if conn.body_buffered < _BODY_LOW_WATER:
            conn.update_reading()


class Request:
    """One parsed request head, its body (`content`, None without one) and the calls that answer it."""

    __slots__ = (
        "_chunked",
        "answered",
        "content",
        "content_length",
        "head_at",
        "headers",
        "keep_alive",
        "method",
        "protocol",
        "raw_path",
        "version",
    )

    def __init__(
        self,
        protocol: HttpConnection,
        method: str,
        raw_path: str,
        version: str,
        headers: CIMultiDict[str],
        content_length: int | None,
        content: RequestBody | None,
        keep_alive: bool,
    ) -> None:
        self.protocol = protocol
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.content_length = content_length
        self.content = content
        self.keep_alive = keep_alive
        self.answered = False  # the answer's head was written (or the connection is gone)
        self.head_at = 0.0  # time.perf_counter() when a streamed answer's head was written (0: not streamed)
        self._chunked = False

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.protocol.transport

    def answer(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes = b"",
        *,
        reason: str | None = None,
        close: bool = False,
        length: bool = True,
    ) -> None:
        """The whole answer in one write; `length` adds Content-Length (False: `headers` carry the framing)."""
        conn = self.protocol
        self.answered = True
        close = close or not self.keep_alive or conn.closing
        if close:
            conn.closing = True
        extra = _framing(self, close, f"Content-Length: {len(body)}\r\n" if length else "")
        head = _head(status, reason, headers, extra)
        transport = conn.transport
        if transport is None or transport.is_closing():
            return  # the caller is gone: there is no one to tell
        if self.method == "HEAD":
            transport.write(head)  # the head says what a GET would get; no body follows it
        elif len(body) < 16384:
            transport.write(head + body)  # one small buffer: cheaper than a vectored write
        else:
            transport.writelines((head, body))

    async def start(
        self,
        status: int,
        headers: list[tuple[str, str]],
        *,
        reason: str | None = None,
        body: bool = True,
        length: bool = False,
    ) -> None:
        """Start a streamed answer. `body=False`: none follows (HEAD, 204, 304); `length`: `headers` carry a
        Content-Length; otherwise the body is chunked, or ends with the connection for an HTTP/1.0 caller."""
        conn = self.protocol
        self.answered = True
        extra = ""
        if body and not length:
            if self.version == "1.1":
                self._chunked = True
                extra = "Transfer-Encoding: chunked\r\n"
            else:
                conn.closing = True
        close = not self.keep_alive or conn.closing
        if close:
            conn.closing = True
        conn.write(_head(status, reason, headers, _framing(self, close, extra)))
        self.head_at = time.perf_counter()
        await conn.drain()

    async def write(self, data: bytes) -> None:
        conn = self.protocol
        if self._chunked:
            conn.write(b"%x\r\n" % len(data), data, b"\r\n")
        else:
            conn.write(data)
        await conn.drain()

    async def end(self) -> None:
        if self._chunked:
            self.protocol.write(b"0\r\n\r\n")
        await self.protocol.drain()

    def abort(self) -> None:
        """Cut the caller's connection: the only honest signal once an answer has started and cannot finish."""
        self.protocol.abort()

    def done(self) -> None:
        """The handler is finished with this request (for a handler that returned DEFERRED)."""
        self.protocol.finished(self)

    def internal_error(self) -> None:
        """The handler failed: logged with its traceback, a JSON 500 if nothing was answered, and the connection
        closes after it. Call from an `except` block."""
        log.exception("proxy handler failed")
        self.protocol.closing = True
        if not self.answered:
            rid = new_request_id()
            text = json.dumps({"error": "internal error", "route": None, "request_id": rid}).encode()
            self.answer(500, [("Content-Type", "application/json"), ("x-request-id", rid)], text)


def _framing(request: Request, close: bool, extra: str) -> str:
    if close:
        return extra + "Connection: close\r\n"
    if request.version == "1.0":
        return extra + "Connection: keep-alive\r\n"
    return extra


def _head(status: int, reason: str | None, headers: list[tuple[str, str]], extra: str) -> bytes:
    lines = [f"{name}: {value}\r\n" for name, value in headers]
    return (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown') if reason is None else reason}\r\n"
        f"{''.join(lines)}{extra}\r\n"
    ).encode("utf-8", "surrogateescape")


class Deferred:
    """What a handler returns when it answers later from callbacks; it then calls `Request.done()`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFERRED"


DEFERRED: Final = Deferred()

# A handler answers at once (returns None), in a task the server runs (returns an awaitable), or later from
# callbacks (returns DEFERRED and calls `Request.done()` when it has answered or given up).
Handler = Callable[[Request], Awaitable[None] | Deferred | None]
Refusal = Callable[[int, str], tuple[list[tuple[str, str]], bytes]]


class HttpConnection(asyncio.Protocol):
    """One caller connection: parses its requests and runs the handler on each, one at a time, in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.over_limit = False  # accepted beyond limits.max_connections: its request gets 503 and it closes
        self.closing = False  # no request after the one being answered
        self.body_buffered = 0  # request body bytes received and not yet read, all requests together
        self._parser = httptools.HttpRequestParser(self)
        self._limits = server.limits
        self._queue: deque[Request | Refused] = deque()
        self._task: asyncio.Task[None] | None = None  # a handler's awaitable, running
        self._current: Request | None = None  # the request being served (queue[0])
        self._dispatching = False
        self._stop_parsing = False  # after a refusal, an upgrade or the last request of the connection
        self._lingering = -1  # bytes dropped while lingering; -1: not lingering
        self._idle_since = self.loop.time()
        self._last_data = self._idle_since  # when the caller last sent a byte
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._write_stalled_since = 0.0  # when the transport's buffer last passed its high-water mark
        self.caller_done = False  # the caller half-closed its side
        self._drain: asyncio.Future[None] | None = None
        # Called once when the caller hangs up: a streamed answer's relay uses it to stop waiting for the upstream
        # (proxy/forwarding.py), so a caller that hangs up between two events closes the upstream request.
        self._on_lost: Callable[[], object] | None = None
        self._fin_hangs_up = False  # the answer being relayed has no end of its own: a FIN is a hang-up
        self.hung_up = False  # the caller is gone: the connection was lost, or it sent a FIN during such an answer
        # the request being parsed
        self._in_head = True
        self._room = server.head_room  # raw bytes the head being parsed may still take
        self._url: list[bytes] = []
        self._pairs: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._progress = 0  # heads and body pieces parsed so far
        self._chunked = False  # a chunked body is being parsed
        self._body: RequestBody | None = None
        self._body_length: int | None = None
        self._last_keep_alive = True
        self._raw_left = 0  # body bytes of an Upgrade request still to read past llhttp (-1: chunked, refused)

    # -- asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's
        server = self.server
        server.connections.add(self)
        if len(server.connections) > self._limits.max_connections:
            self.over_limit = True
        self._timer = self.loop.call_later(self._limits.client_timeout_seconds, self._check_idle)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.hung_up = True
        self.closing = True
        self._stop_parsing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gone = CallerGone("the caller closed the connection")
        for item in self._queue:
            if isinstance(item, Request) and item.content is not None:
                item.content.fail(gone)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(gone)
        self._call_on_lost()
        self.server.forget(self)

    def _call_on_lost(self) -> None:
        on_lost = self._on_lost
        if on_lost is not None:
            self._on_lost = None
            on_lost()

    def pause_writing(self) -> None:
        """The caller's buffer passed its high-water mark: no further request is read or answered until it drains
        (a caller that pipelines requests and never reads their answers holds one answer's worth, not all of
        them), and a caller that does not drain within client_timeout_seconds is cut off (_check_idle)."""
        self._writing_paused = True
        self._write_stalled_since = self.loop.time()
        self.update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self.update_reading()
        if self._current is None and self._queue:
            self._dispatch()

    def watch_hang_up(self, on_lost: Callable[[], object], *, endless: bool) -> bool:
        """Call `on_lost` once if the caller hangs up while the current request's answer is relayed; False if it
        already has. With `endless` (an answer with no length: an event stream), a FIN with nothing pipelined after
        this request is a hang-up, not a half-close: the answer has no end of its own, and the caller's absence
        would only show at a write, which a silent upstream may not make for minutes."""
        if self.hung_up or (endless and self.caller_done and len(self._queue) == 1):
            return False
        self._on_lost = on_lost
        self._fin_hangs_up = endless
        return True

    def unwatch_hang_up(self) -> None:
        self._on_lost = None
        self._fin_hangs_up = False

    def eof_received(self) -> bool:
        if not self._queue or self._lingering >= 0:
            return False  # nothing to answer: close
        # The caller half-closed: every request parsed whole is still answered, in order, and the connection closes
        # after the last (finished); a body cut short fails its reader.
        self.caller_done = True
        self._stop_parsing = True
        body = self._body
        if body is not None:
            body.fail(CallerGone("the caller closed the connection"))
        if self._fin_hangs_up and len(self._queue) == 1:
            self.hung_up = True  # ...except during an answer without an end (watch_hang_up)
            self.closing = True
            self._call_on_lost()
            return False  # the transport closes
        return True

    def data_received(self, data: bytes | memoryview) -> None:
        self._last_data = self.loop.time()
        if self._lingering >= 0:
            self._lingering += len(data)
            if self._lingering > _LINGER_BYTES and self.transport is not None:
                self.transport.close()
            return
        try:
            while data and not self._stop_parsing:
                if self._raw_left:
                    data = self._feed_raw_body(bytes(data))
                    continue
                # A head, and a chunked body's framing and trailers, are bounded by `room`: llhttp (httptools)
                # keeps an unfinished header or trailer in memory, so an endless one is fed only so far.
                bounded = self._in_head or self._chunked
                cut = bounded and len(data) > self._room
                piece: bytes | memoryview
                if cut:
                    view = memoryview(data)  # slices without copying: a large chunked upload is cut many times
                    piece, data = view[: self._room], view[self._room :]
                    self._room = 0
                else:
                    piece, data = data, b""
                    if bounded:
                        self._room -= len(piece)
                progress = self._progress
                try:
                    self._parser.feed_data(piece)
                except httptools.HttpParserUpgrade as exc:
                    data = self._after_upgrade(bytes(piece[exc.args[0] :]) + bytes(data))
                    continue
                if cut and progress == self._progress:
                    if self._in_head:
                        raise Refused(*self._too_large_head())
                    raise Refused(431, "chunked body framing or trailers too large")
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if not isinstance(refused, Refused):
                log.error("request parser callback failed", exc_info=refused)
                refused = Refused(400, "malformed request")
            self._refuse(refused)
        except httptools.HttpParserError as exc:
            self._refuse(Refused(400, parse_reason(exc)))
        except Refused as refused:
            self._refuse(refused)
        if self._current is None and self._queue:
            self._dispatch()

    def _after_upgrade(self, rest: bytes) -> bytes:
        """llhttp stops at a request asking for CONNECT or an Upgrade. The proxy upgrades nothing: CONNECT is
        refused and the connection closes; any other such request is an ordinary one (its Upgrade header is
        hop-by-hop, dropped) whose body, which llhttp left unread, and the requests after it are read here."""
        if self._parser.get_method() == b"CONNECT":
            self._stop_parsing = True
            self.closing = True
            return b""
        self._parser = httptools.HttpRequestParser(self)
        if self._raw_left < 0:
            raise Refused(400, "a chunked body with Upgrade is not supported")
        return rest

    def _feed_raw_body(self, data: bytes) -> bytes:
        """The Content-Length body of a request llhttp stopped at (see _after_upgrade); returns what follows."""
        body = self._body
        assert body is not None
        n = min(len(data), self._raw_left)
        body.feed(data[:n] if n < len(data) else data)
        self._raw_left -= n
        if not self._raw_left:
            self._message_done(keep_alive=self._last_keep_alive)
        return data[n:]

    # -- llhttp callbacks (an exception here is a refusal: httptools re-raises it as the error's context)

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._head_bytes += len(url)
        if self._head_bytes > self._limits.max_header_bytes:
            raise Refused(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer after a chunked body: not passed on
        pairs = self._pairs
        if not pairs:
            self._head_bytes = 0  # the request line is bounded on its own
        # llhttp drops the whitespace before a value, not after it; a field value has none (RFC 9112 5).
        pairs.append((name, value.rstrip(b" \t")))
        size = len(name) + len(value) + 4
        self._head_bytes += size
        limits = self._limits
        if size > limits.max_header_bytes:
            raise Refused(431, "header field too large")
        if len(pairs) > limits.max_headers:
            raise Refused(431, "too many header fields")
        if self._head_bytes > limits.max_header_bytes:
            raise Refused(431, "request header block too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._progress += 1
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise Refused(400, "unsupported HTTP version")
        headers: CIMultiDict[str] = CIMultiDict()
        seen: set[bytes] = set()
        content_length: int | None = None
        for name, value in self._pairs:
            lname = name.lower()
            if lname in _SINGLETONS:
                if lname in seen:
                    raise Refused(400, "duplicate header")
                seen.add(lname)
                if lname == b"content-length":
                    content_length = int(value)  # llhttp checked it is digits only
                elif lname == b"transfer-encoding" and b"," in value:
                    # llhttp takes a list ending in chunked (`gzip, chunked`); the proxy would pass the body on
                    # without the other codings. Anything else that is not plain chunked llhttp refuses (400).
                    codings = [c.strip() for c in value.lower().split(b",")]
                    if codings[-1] == b"chunked":
                        raise Refused(501, "unsupported Transfer-Encoding")
            headers.add(name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        if version == "1.1" and b"host" not in seen:
            raise Refused(400, "missing Host header")
        chunked = b"transfer-encoding" in seen  # llhttp refuses one that does not end in chunked
        body = None
        if chunked or content_length:
            expect = version == "1.1" and headers.get("Expect", "").lower() == "100-continue"
            body = self._body = RequestBody(self, expect)
        self._body_length = content_length
        self._chunked = chunked
        self._room = self.server.head_room
        keep_alive = parser.should_keep_alive()
        if keep_alive and version == "1.0":
            if chunked:
                keep_alive = False  # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding closes after it
            elif any(t.strip().lower() == "close" for v in headers.getall("Connection") for t in v.split(",")):
                keep_alive = False  # llhttp keeps `Connection: keep-alive, close` alive in HTTP/1.0; close wins
        self._last_keep_alive = keep_alive
        url = self._url
        request = Request(
            self,
            parser.get_method().decode("ascii"),
            (url[0] if len(url) == 1 else b"".join(url)).decode("utf-8", "surrogateescape"),
            version,
            headers,
            content_length,
            body,
            keep_alive,
        )
        self._url = []
        self._pairs = []
        self._head_bytes = 0
        self._enqueue(request)

    def on_body(self, data: bytes) -> None:
        self._progress += 1
        self._room = self.server.head_room
        body = self._body
        if body is not None:
            body.feed(data)

    def on_message_complete(self) -> None:
        if self._parser.should_upgrade():
            body = self._body
            if body is not None and body.received < (self._body_length or 0):
                self._raw_left = (self._body_length or 0) - body.received  # read in _feed_raw_body
                return
            if body is not None and self._body_length is None:
                self._raw_left = -1  # chunked: refused in _after_upgrade
                return
        self._message_done(keep_alive=self._last_keep_alive and self._parser.should_keep_alive())

    def _message_done(self, *, keep_alive: bool) -> None:
        body = self._body
        if body is not None:
            body.feed_eof()
            self._body = None
        self._in_head = True
        self._chunked = False
        self._room = self.server.head_room
        if not keep_alive:
            self._stop_parsing = True  # anything after this request is not read

    # -- serving

    def _too_large_head(self) -> tuple[int, str]:
        if not self._pairs and self._head_bytes:
            return 414, "request line too long"
        return 431, "request header block too large"

    def _enqueue(self, item: Request | Refused) -> None:
        """Queue a parsed request (served by _dispatch once data_received has fed everything it got)."""
        self._queue.append(item)
        if len(self._queue) > _MAX_QUEUED:
            self.update_reading()

    def _refuse(self, refused: Refused) -> None:
        self._stop_parsing = True
        # Once its request line parsed (a URL was seen), the refused request's method is known.
        refused.head_only = bool(self._url or self._pairs) and self._parser.get_method() == b"HEAD"
        body = self._body
        if body is not None and not self._in_head:
            # The head was fine and its handler may be forwarding the body already: it answers the refusal.
            body.fail(refused)
            self.closing = True
            return
        self._enqueue(refused)

    def _dispatch(self) -> None:
        """Serve the queued requests in order, one at a time: each runs the handler, which answers at once, in a
        task, or from callbacks (then it calls `Request.done()`). Called after the parser has been fed, and when a
        request is finished."""
        if self._dispatching:
            return  # a request finished inside the loop below: the loop goes on with the next one
        self._dispatching = True
        queue = self._queue
        try:
            while queue and self._current is None and self.transport is not None and not self._writing_paused:
                item = queue[0]
                if isinstance(item, Refused):
                    headers, answer = self.server.refusal(item.status, item.reason)
                    self.closing = True
                    framing = f"Content-Length: {len(answer)}\r\nConnection: close\r\n"
                    transport = self.transport
                    if not transport.is_closing():
                        head = _head(item.status, None, headers, framing)
                        transport.write(head if item.head_only else head + answer)
                    self._close(linger=True)
                    return
                self._current = item
                try:
                    pending = self.server.handler(item)
                except Exception:
                    item.internal_error()
                    pending = None
                if pending is None:
                    self.finished(item)
                elif pending is not DEFERRED:
                    self._task = self.loop.create_task(self._run(item, pending))  # type: ignore[arg-type]
        except Exception:  # a fault of the server itself: never left for asyncio to report
            log.exception("proxy connection failed")
            self.abort()
        finally:
            self._dispatching = False

    async def _run(self, item: Request, pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception:
            item.internal_error()
        finally:
            self._task = None
        self.finished(item)

    def finished(self, item: Request) -> None:
        """The handler is done with `item`: close the connection, or go on with the next request."""
        if self._current is not item:
            return
        self._current = None
        queue = self._queue
        queue.popleft()
        if self.transport is None:
            return
        if not item.answered:
            self.closing = True  # no answer was given (the caller is gone): nothing else may follow
        body = item.content
        if body is not None:
            body.discard()
        if self.closing or (body is not None and not body.done):
            # A body still arriving that the handler did not read is not skipped over: the connection closes.
            self._close(linger=body is not None and not body.done)
            return
        if len(queue) <= _MAX_QUEUED:
            self.update_reading()
        if queue:
            self._dispatch()
        elif self.caller_done:
            self._close(linger=False)
        else:
            self._idle_since = self.loop.time()

    def update_reading(self) -> None:
        """Pause reading from the caller while its bodies or pipelined requests wait; resume when they drain."""
        transport = self.transport
        if transport is None:
            return
        full = len(self._queue) > _MAX_QUEUED or self.body_buffered > _BODY_HIGH_WATER or self._writing_paused
        if full and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not full and self._reading_paused and self.body_buffered < _BODY_LOW_WATER:
            self._reading_paused = False
            transport.resume_reading()

    def send_continue(self) -> None:
        """The interim answer, once the handler wants the body; never after its answer has started."""
        queue = self._queue
        if not queue or not isinstance(queue[0], Request) or queue[0].answered:
            return
        if self.transport is not None and not self.transport.is_closing():
            self._last_data = self.loop.time()  # the caller's time to send the body starts now
            self.transport.write(_CONTINUE)

    def write(self, data: bytes, *more: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise CallerGone("the caller closed the connection")
        if more:
            transport.writelines([data, *more])
        else:
            transport.write(data)

    async def drain(self) -> None:
        if self.transport is None:
            raise CallerGone("the caller closed the connection")
        if self._writing_paused:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _close(self, *, linger: bool) -> None:
        """Close after the last answer; with `linger`, first read and drop what the caller still sends for a while
        (closing with unread bytes would reset the connection and could destroy the answer in flight)."""
        transport = self.transport
        if transport is None:
            return
        self._queue.clear()  # nothing parsed after the last answer is served (_dispatch may be looping over it)
        if linger and not self.caller_done and transport.can_write_eof():
            self._lingering = 0
            self._stop_parsing = True
            if self._reading_paused:
                self._reading_paused = False
                transport.resume_reading()
            transport.write_eof()
            self.loop.call_later(_LINGER_SECONDS, transport.close)
            return
        transport.close()

    def _check_idle(self) -> None:
        """Close a connection that is idle, still sending a request head, stalled in the middle of a request body,
        or not reading its answers, for client_timeout_seconds."""
        timeout = self._limits.client_timeout_seconds
        now = self.loop.time()
        if self._writing_paused:
            if now - self._write_stalled_since >= timeout:
                self._timed_out("answer")  # the caller does not read what it asked for
                return
            self._timer = self.loop.call_at(self._write_stalled_since + timeout, self._check_idle)
            return
        body = self._body
        if body is not None and not body.awaits_continue and not self._reading_paused and self._lingering < 0:
            # A request body is arriving, and the proxy is reading: the caller must keep sending it.
            if now - self._last_data >= timeout:
                self._timed_out("request body")
                return
            self._timer = self.loop.call_at(self._last_data + timeout, self._check_idle)
            return
        if self._queue or self._lingering >= 0:
            self._timer = self.loop.call_at(now + timeout, self._check_idle)
            return
        waited = now - self._idle_since
        if waited >= timeout:
            self._timer = None
            if self.transport is not None:
                self.transport.close()
            return
        self._timer = self.loop.call_at(self._idle_since + timeout, self._check_idle)

    def _timed_out(self, during: str) -> None:
        """Cut a caller that stalled mid-request or stopped reading: what it was sending or being sent fails with
        CallerGone, and the connection is aborted (a close would wait for the unread answer to be written)."""
        self._timer = None
        event(log, logging.INFO, "client_timeout", during=during, seconds=self._limits.client_timeout_seconds)
        self.abort()

    def shutdown(self) -> None:
        """Graceful stop: an idle connection closes now, a busy one after the answer in progress."""
        self.closing = True
        if not self._queue and self.transport is not None:
            self.transport.close()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.abort()


class HttpServer:
    """The proxy port: a listener, its connections, and the graceful stop."""

    def __init__(self, handler: Handler, refusal: Refusal, limits: Limits) -> None:
        self.handler = handler
        self.refusal = refusal
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpConnection] = set()
        # Raw bytes a head may take: the request line and the header block are bounded on their own above.
        self.head_room = 2 * limits.max_header_bytes + 8192
        self._listener: asyncio.AbstractServer | None = None
        self._all_closed: asyncio.Future[None] | None = None

    def __call__(self) -> HttpConnection:
        return HttpConnection(self)

    def forget(self, conn: HttpConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None and not self._all_closed.done():
            self._all_closed.set_result(None)

    async def listen(self, host: str, port: int, *, backlog: int = 1024, reuse_port: bool = False) -> int:
        """Start accepting; returns the bound port."""
        self._listener = await self.loop.create_server(
            self, host, port, backlog=backlog, reuse_address=True, reuse_port=reuse_port or None
        )
        # uvloop gives a list where typeshed says tuple; read untyped so compiled code does not check it.
        sockets: Any = getattr(self._listener, "sockets")  # noqa: B009
        return int(sockets[0].getsockname()[1])

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let the requests in progress finish within `grace` seconds, then cut the rest."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._all_closed = self.loop.create_future()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            try:
                await asyncio.wait_for(asyncio.shield(self._all_closed), grace)
            except TimeoutError:
                for conn in list(self.connections):
                    conn.cancel()
                await asyncio.sleep(0)


__all__ = [
    "DEFERRED",
    "CallerGone",
    "Deferred",
    "HttpConnection",
    "HttpServer",
    "Refused",
    "Request",
    "RequestBody",
    "parse_reason",
]
