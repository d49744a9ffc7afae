"""The rig of the differential fuzzer (tests/abuse/test_differential.py): two in-process proxies, the upstreams
they forward to, and a blocking caller that talks to them over plain sockets.

The proxies and the upstreams run on their own event loop in a thread, so hypothesis drives plain sockets from
the test thread (as in tests/abuse/test_fuzz.py). Everything listens on 127.0.0.1.

- `caller_port`: a proxy with one key route to the recording upstream, which parses what the proxy sends with
  h11 (as a server) and records every complete request (and any bytes of an unfinished one), then answers 200
  with `X-Upstream-Seq: <n>` and the body `seq:<n>`.
- `script_port`: a proxy with one key route to the scripted upstream, which parses the proxy's requests with h11
  and answers each with the raw bytes of the script registered for its `X-Case` header, writing them piece by
  piece, then keeps the connection, closes it, or stalls. It records per upstream connection which requests it
  carried and whether bytes came on it after an answer that forbids reuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
from prometheus_client import CollectorRegistry

from proxy.app import ProxyService
from proxy.config.reader import parse
from proxy.emulator.secretdir import write_secret_dir
from tests.support.logsetup import ErrorRecords

# Small limits and timeouts, so that a request that stalls shows within a case's time bound.
CLIENT_TIMEOUT = 1.5  # limits.client_timeout_seconds
READ_TIMEOUT = 1.0  # timeouts.read of both routes
TOTAL_TIMEOUT = 3.0  # timeouts.total of both routes
CONNECT_TIMEOUT = 1.0
MAX_HEADER_BYTES = 8192  # limits.max_header_bytes
MAX_HEADERS = 40  # limits.max_headers
MAX_BODY = 65536  # limits.max_body_bytes
POOL_SIZE = 4  # pool.max_connections of the scripted route
MAX_UPSTREAM_HEAD = 1 << 16  # README: an upstream answer's head over 64 KiB gets 502 (interim answers included)
CALLER_HOLDS = 1 << 20  # the most a test caller keeps of an answer (every expected answer is far smaller)
# The longest a case may take: the slowest legitimate outcome is an upstream stalling up to timeouts.total.
CASE_SECONDS = TOTAL_TIMEOUT + CLIENT_TIMEOUT + 2.0

_LOGGERS = ("aml_auth_proxy", "asyncio")


@dataclass
class Recorded:
    """One request as the recording upstream parsed it (h11, as a server)."""

    seq: int
    conn: int
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]  # raw names as sent, values as h11 parsed them
    body: bytes
    trailers: list[tuple[bytes, bytes]]


@dataclass
class Script:
    """What the scripted upstream answers to one request: `pieces` written one by one with `delays` (seconds)
    before each, then `end`: "keep" (the connection stays open), "close", or "stall" (open, never written to
    again). `flood`: after the pieces, write this many bytes of b"a" (an endless header or trailer line) before
    the end. `reusable`: the oracle's verdict that the connection may carry another request afterwards."""

    pieces: list[bytes]
    delays: list[float]
    end: str
    flood: int = 0
    reusable: bool = False


@dataclass
class UpstreamConn:
    """What one connection to the scripted upstream carried."""

    id: int
    cases: list[str] = field(default_factory=list)  # the X-Case of each request, in order
    poisoned_by: str | None = None  # the case whose answer forbids reusing the connection
    late: list[str] = field(default_factory=list)  # what arrived after that answer, or while a script ran
    written: dict[str, int] = field(default_factory=dict)  # bytes of each case's script written


def _parsed(h: h11.Connection, transport: asyncio.Transport | None, invalid: Callable[[str], None]) -> Iterator[Any]:
    """The events h11 can give from what the proxy sent so far, one at a time as they are asked for. When the proxy
    sent invalid HTTP: `invalid(why)`, then the connection is closed and there are no more events."""
    try:
        yield from h11_events(h)
    except h11.RemoteProtocolError as exc:
        invalid(f"the proxy sent invalid HTTP: {exc}")
        if transport is not None:
            transport.close()


class _Recorder(asyncio.Protocol):
    """The recording upstream: one connection."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.id = next(rig.ids)
        self.transport: asyncio.Transport | None = None
        self.h = h11.Connection(h11.SERVER)
        self.request: h11.Request | None = None
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.h.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        self.h.receive_data(b"")
        self._pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        leftover = self.h.trailing_data[0]
        if self.request is not None or leftover:
            self.rig.upstream_faults.append(f"conn {self.id}: an unfinished request: {leftover[:200]!r}")

    def _invalid(self, why: str) -> None:
        self.rig.upstream_faults.append(f"conn {self.id}: {why}")
        self.request = None

    def _pump(self) -> None:
        for event in _parsed(self.h, self.transport, self._invalid):
            if isinstance(event, h11.Request):
                self.request = event
                self.body = bytearray()
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._answer(event)

    def _answer(self, end: h11.EndOfMessage) -> None:
        request = self.request
        assert request is not None
        self.request = None
        rig = self.rig
        seq = next(rig.seqs)
        rig.recorded.append(
            Recorded(
                seq=seq,
                conn=self.id,
                method=request.method,
                target=request.target,
                version=request.http_version,
                headers=request.headers.raw_items(),
                body=bytes(self.body),
                trailers=end.headers.raw_items(),
            )
        )
        body = b"seq:%d" % seq
        out = self.h.send(
            h11.Response(status_code=200, headers=[("X-Upstream-Seq", str(seq)), ("Content-Length", str(len(body)))])
        )
        if request.method != b"HEAD":
            out = (out or b"") + (self.h.send(h11.Data(data=body)) or b"")
        out = (out or b"") + (self.h.send(h11.EndOfMessage()) or b"")
        assert self.transport is not None
        self.transport.write(out)
        if self.h.our_state is h11.MUST_CLOSE:
            self.transport.close()
            return
        self.h.start_next_cycle()


class _Scripted(asyncio.Protocol):
    """The scripted upstream: one connection; parses requests with h11 and answers each with its script."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.log = UpstreamConn(id=next(rig.ids))
        rig.upstream_conns.append(self.log)
        self.transport: asyncio.Transport | None = None
        self.h = h11.Connection(h11.SERVER)
        self.busy: str | None = None  # the case whose script is being written
        self.case: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self._paused = False
        self._drain: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.rig.live.add(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        log = self.log
        if self.busy is not None:
            log.late.append(f"while the answer to {self.busy} was written: {data[:120]!r}")
        elif log.poisoned_by is not None:
            log.late.append(f"after the answer to {log.poisoned_by}: {data[:120]!r}")
        self.h.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.rig.live.discard(self)
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _invalid(self, why: str) -> None:
        self.rig.upstream_faults.append(f"scripted conn {self.log.id}: {why}")

    def _pump(self) -> None:
        if self.busy is not None:  # the answer's script is being written: the next request waits for it
            return
        for event in _parsed(self.h, self.transport, self._invalid):
            if isinstance(event, h11.Request):
                self.case = dict(event.headers).get(b"x-case", b"?").decode("latin-1")
            elif isinstance(event, h11.EndOfMessage):
                case = self.case or "?"
                self.log.cases.append(case)
                self.rig.arrivals.append((case, self.log.id))
                script = self.rig.scripts.get(case)
                if script is None:
                    self.rig.upstream_faults.append(f"scripted conn {self.log.id}: no script for {case!r}")
                    script = Script(pieces=[], delays=[], end="close")
                self.busy = case
                self.task = self.rig.loop.create_task(self._run(case, script))
                return

    async def _write(self, data: bytes) -> bool:
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return False
        transport.write(data)
        self.log.written[self.busy or "?"] = self.log.written.get(self.busy or "?", 0) + len(data)
        if self._paused:
            self._drain = self.rig.loop.create_future()
            try:
                async with asyncio.timeout(CASE_SECONDS):
                    await self._drain
            except TimeoutError:
                return False
            finally:
                self._drain = None
        return not self.closed

    async def _run(self, case: str, script: Script) -> None:
        try:
            for delay, piece in zip(script.delays, script.pieces, strict=True):
                if delay:
                    await asyncio.sleep(delay)
                if not await self._write(piece):
                    return
            left = script.flood
            unit = b"a" * 65536
            while left > 0:  # bounded by the script's byte count
                if not await self._write(unit[: min(left, len(unit))]):
                    return
                left -= len(unit)
        finally:
            self.busy = None
        if not script.reusable:
            self.log.poisoned_by = f"{case} ({b''.join(script.pieces)[:300]!r}, then {script.end})"
        if script.end == "close":
            assert self.transport is not None
            self.transport.close()
        elif script.end == "keep" and script.reusable:
            # A fresh parser for the next request: the answer went out as raw bytes, not through h11.
            leftover = self.h.trailing_data[0]
            self.h = h11.Connection(h11.SERVER)
            if leftover:
                self.h.receive_data(leftover)
            self._pump()
        # "stall", or "keep" after an answer that forbids reuse: the connection stays open, unanswered.


class Rig:
    """The running proxies and upstreams; a plain class so that hypothesis prints only its repr."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.caller_port = 0
        self.script_port = 0
        self.ids = itertools.count(1)
        self.seqs = itertools.count(1)
        self.recorded: list[Recorded] = []
        self.upstream_faults: list[str] = []
        self.scripts: dict[str, Script] = {}
        self.arrivals: list[tuple[str, int]] = []  # (X-Case, upstream connection) in arrival order
        self.upstream_conns: list[UpstreamConn] = []
        self.errors: list[logging.LogRecord] = []
        self.services: list[ProxyService] = []
        self.key = ""
        self.recorder_port = 0
        self.caller_cases = 0  # conversations held on the caller side
        self.upstream_cases = 0  # ... and on the upstream side, with this many exchanges
        self.exchanges = 0
        self.live: set[_Scripted] = set()  # open connections to the scripted upstream

    def __repr__(self) -> str:
        return f"Rig(caller_port={self.caller_port}, script_port={self.script_port})"

    def call(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` on the rig's loop and return its result."""
        done: list[Any] = []
        ready = threading.Event()

        def run() -> None:
            try:
                done.append(fn(*args))
            finally:
                ready.set()

        self.loop.call_soon_threadsafe(run)
        assert ready.wait(5), "the rig's event loop does not answer"
        return done[0] if done else None

    def settle(self) -> None:
        """Wait (bounded) until no proxied request is in flight and the loop has run its ready callbacks."""
        limit = time.monotonic() + CASE_SECONDS
        while time.monotonic() < limit:
            busy = self.call(lambda: sum(s.handler.in_flight for s in self.services))
            if not busy:
                break
            time.sleep(0.005)
        time.sleep(0.002)
        self.call(lambda: None)

    def empty_pool(self) -> None:
        """Close every connection to the scripted upstream and wait (bounded) until the proxy's pool has let go of
        them, so that each case starts from an empty pool and fails the same way when hypothesis replays it."""

        def close_all() -> None:
            for conn in list(self.live):
                if conn.task is not None:
                    conn.task.cancel()
                if conn.transport is not None:
                    conn.transport.close()

        self.call(close_all)
        limit = time.monotonic() + 2
        while time.monotonic() < limit:
            if not self.call(lambda: sum(rt.pool.open for rt in self.services[1].routes if rt.pool is not None)):
                break
            time.sleep(0.002)


def _route(name: str, port: int, key_file: Path) -> dict[str, Any]:
    return {
        "name": name,
        "upstream": f"http://127.0.0.1:{port}",
        "auth": {"type": "key", "primary_file": str(key_file)},
        "timeouts": {"connect": CONNECT_TIMEOUT, "read": READ_TIMEOUT, "total": TOTAL_TIMEOUT},
        "pool": {"max_connections": POOL_SIZE, "keepalive_seconds": 30},
    }


@contextlib.contextmanager
def running_rig(secret_dir: Path, key: str) -> Iterator[Rig]:
    """Start the rig (both proxies, both upstreams) on a loop in a thread; stop it all afterwards."""
    rig = Rig()
    rig.key = key
    write_secret_dir(secret_dir, {"primary": key + "\n"})
    loop = rig.loop
    started = threading.Event()
    stop: list[asyncio.Future[None]] = []

    async def main() -> None:
        stop.append(loop.create_future())
        recorder = await loop.create_server(lambda: _Recorder(rig), "127.0.0.1", 0)
        scripted = await loop.create_server(lambda: _Scripted(rig), "127.0.0.1", 0)
        ports = [int(s.getsockname()[1]) for s in (recorder.sockets[0], scripted.sockets[0])]
        rig.recorder_port = ports[0]
        for name, port in zip(("recorded", "scripted"), ports, strict=True):
            doc = {
                "listen": {"host": "127.0.0.1", "port": 0},
                "admin": {"host": "127.0.0.1", "port": 0},
                "access_log": False,
                "limits": {
                    "max_header_bytes": MAX_HEADER_BYTES,
                    "max_headers": MAX_HEADERS,
                    "max_body_bytes": MAX_BODY,
                    "client_timeout_seconds": CLIENT_TIMEOUT,
                },
                "routes": [_route(name, port, secret_dir / "primary")],
            }
            service = ProxyService(parse(doc, {}), registry=CollectorRegistry())
            await service.start()
            rig.services.append(service)
        rig.caller_port, rig.script_port = (s.proxy_port for s in rig.services)
        started.set()
        await stop[0]
        for service in rig.services:
            await service.stop()
        for server in (recorder, scripted):
            server.close()

    handler = ErrorRecords(rig.errors)
    for name in _LOGGERS:
        logging.getLogger(name).addHandler(handler)
    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        assert started.wait(10), "the rig did not start"
        yield rig
    finally:
        if stop:
            loop.call_soon_threadsafe(stop[0].set_result, None)
        thread.join(30)
        loop.close()
        for name in _LOGGERS:
            logging.getLogger(name).removeHandler(handler)


# -- memory: RSS of this process (the rig runs in it)

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def reset_peak() -> bool:
    """Reset the kernel's peak RSS of this process (VmHWM); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# -- the caller: a blocking socket


@dataclass
class Conversation:
    received: bytes
    ended: str  # "eof", "reset", or "deadline" (the time bound ran out with the connection open)
    seconds: float
    sent_all: bool
    peak_rss: int


def converse(
    port: int,
    pieces: list[bytes],
    *,
    pause: float = 0.001,
    flood: int = 0,
    half_close: bool = False,
    wait_for: Any = None,
    grace: float = 0.05,
    deadline: float = CASE_SECONDS,
) -> Conversation:
    """Send `pieces` (then `flood` bytes of b"a") with `pause` seconds between them and read until the proxy
    closes or `deadline` seconds pass. With `half_close`, shut the sending side `grace` seconds after
    `wait_for(received)` is first true (at once without `wait_for`): the proxy has that long to show whether it
    goes on with what follows. The RSS is sampled while reading."""
    started = time.monotonic()
    limit = started + deadline
    received = bytearray()
    ended = "deadline"
    peak = rss_bytes()
    sent_all = True

    def sample() -> None:
        nonlocal peak
        peak = max(peak, rss_bytes())

    with socket.create_connection(("127.0.0.1", port), timeout=deadline) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for i, piece in enumerate(pieces):
                if i and pause:
                    time.sleep(pause)
                sock.sendall(piece)
            unit = b"a" * 65536
            left = flood
            while left > 0 and time.monotonic() < limit:  # bounded by the byte count and the deadline
                sock.sendall(unit[: min(left, len(unit))])
                left -= len(unit)
                received += _read_ready(sock)
        except (BrokenPipeError, ConnectionResetError):
            sent_all = False
        sock.setblocking(False)
        shut = False
        ready_at = time.monotonic() if wait_for is None else 0.0
        while time.monotonic() < limit:
            if half_close and not shut and not ready_at and wait_for(bytes(received)):
                ready_at = time.monotonic() + grace
            if half_close and not shut and ready_at and time.monotonic() >= ready_at:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                shut = True
            try:
                chunk = _poll(sock, sample)
            except ConnectionResetError:
                ended = "reset"
                break
            if chunk is None:
                continue
            if not chunk:
                ended = "eof"
                break
            received += chunk
            if len(received) > CALLER_HOLDS:
                ended = "too long"
                break
    return Conversation(bytes(received), ended, time.monotonic() - started, sent_all, peak)


def _poll(sock: socket.socket, sample: Callable[[], None]) -> bytes | None:
    """Wait up to 5 ms for the proxy, then `sample` (the caller's RSS sample); what it sent meanwhile: None when
    nothing came, b"" when it closed. A reset raises ConnectionResetError."""
    ready, _, _ = select.select([sock], [], [], 0.005)
    sample()
    if not ready:
        return None
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return None


def _read_ready(sock: socket.socket) -> bytes:
    """What the proxy has sent so far, without waiting."""
    ready, _, _ = select.select([sock], [], [], 0)
    if not ready:
        return b""
    try:
        return sock.recv(65536, socket.MSG_DONTWAIT)
    except (BlockingIOError, ConnectionResetError):
        return b""


# -- what the oracle knows about HTTP and about the proxy's documented behaviour

# Headers the proxy drops on the way up (README "Headers": hop-by-hop, plus Host and Expect, which it answers itself)
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"host", b"expect"}
)
# Headers the proxy writes itself on the way up: compared on their own, never with the caller's.
PROXY_OWNED = frozenset(
    {b"host", b"authorization", b"x-request-id", b"x-ms-client-request-id", b"content-length", b"transfer-encoding"}
)
# Headers dropped from an upstream answer (hop-by-hop), besides those its Connection header names.
RESPONSE_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade"}
)
# A request may carry these once (docs/security.md "Strict HTTP/1.1 parsing").
SINGLE_VALUED = frozenset(
    {
        b"host",
        b"content-length",
        b"content-type",
        b"content-location",
        b"content-range",
        b"transfer-encoding",
        b"max-forwards",
        b"user-agent",
    }
)
# The methods llhttp's HTTP/1.x request parser knows; any other method "does not parse as HTTP/1.1" (README).
LLHTTP_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH SEARCH UNLOCK BIND "
    b"REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH PURGE "
    b"MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)
# Statuses of the proxy's own refusals of a request (README "Answers from the proxy itself").
PARSE_REFUSALS = frozenset({400, 405, 413, 414, 431, 501})
SENTINEL = b"GET /__end__ HTTP/1.1\r\nHost: sentinel\r\nConnection: close\r\n\r\n"
_CTL = frozenset(range(0x20)) - {0x09} | {0x7F}
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEX = frozenset(b"0123456789abcdefABCDEF")


@dataclass
class Rule:
    """One listed exception: where the proxy may or must answer other than by forwarding what h11 accepted."""

    name: str
    statuses: frozenset[int]
    must: bool  # True: the proxy must refuse; False: it may refuse or forward
    closes: bool  # a refusal under this rule ends the connection (a parse refusal); else it may stay open
    head: bool = True  # decided on the head, before any body is read (then no 100 Continue may precede it)


@dataclass
class Planned:
    """What the oracle expects for one request of a caller's byte stream."""

    index: int
    raw: bytes  # the bytes h11 took for it
    outcome: str  # "accepted" (h11 took it whole), "rejected" (h11 refused it), "unfinished" (the bytes ended)
    error: str = ""
    method: bytes = b""
    target: bytes = b""
    version: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # raw names, values as h11 parsed them
    body: bytes = b""
    rules: list[Rule] = field(default_factory=list)
    keep_alive: bool = False  # the connection goes on after this request when it is forwarded
    has_body: bool = False  # framed with a body (chunked, or a Content-Length above 0), even an empty one
    expect_100: bool = False
    request_id: bytes | None = None  # the caller's usable request id, None when the proxy makes one

    @property
    def must_refuse(self) -> bool:
        return any(r.must for r in self.rules)

    @property
    def statuses(self) -> frozenset[int]:
        out: frozenset[int] = frozenset()
        for r in self.rules:
            out |= r.statuses
        return out if self.outcome == "accepted" else out | PARSE_REFUSALS

    def describe(self) -> str:
        rules = ", ".join(r.name for r in self.rules) or "none"
        return f"request {self.index} ({self.outcome} by h11{': ' + self.error if self.error else ''}; rules: {rules})"


def _head_lines(head: bytes) -> list[bytes]:
    """The lines of a raw head (request line first), split on LF with any CR before it removed."""
    lines = head.split(b"\n")
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _raw_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    out = []
    for line in lines:
        if not line or line[:1] in (b" ", b"\t"):
            continue
        name, _, value = line.partition(b":")
        out.append((name.lower(), value.strip(b" \t")))
    return out


def _bare_lf(raw: bytes) -> bool:
    return any(i == 0 or raw[i - 1] != 0x0D for i in range(len(raw)) if raw[i] == 0x0A)


def _tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    out = []
    for n, v in headers:
        if n.lower() == name:
            out += [t.strip(b" \t").lower() for t in v.split(b",") if t.strip(b" \t")]
    return out


def _has_dot_segment(path: bytes) -> bool:
    """'.' or '..' segments, raw, percent-encoded or double-encoded, or with a backslash (docs/security.md)."""
    from urllib.parse import unquote_to_bytes

    for candidate in (path, unquote_to_bytes(path), unquote_to_bytes(unquote_to_bytes(path))):
        for seg in candidate.split(b"/"):
            if seg in (b".", b"..") or seg.startswith((b"..\\", b".\\")):
                return True
    return False


def _chunk_framing(body_raw: bytes) -> tuple[bool, bytes]:
    """(strict, trailer section) of a chunked body h11 accepted: strict when every chunk-size line is 1*HEXDIG
    followed only by extensions of the form ;token[=token|quoted-string] without whitespace (llhttp's strict
    mode); the trailer section is what follows the last chunk's size line."""
    pos = 0
    strict = True
    while True:
        end = body_raw.find(b"\r\n", pos)
        if end < 0:
            return strict, b""
        line = body_raw[pos:end]
        size_text, _, ext = line.partition(b";")
        if not size_text or any(c not in _HEX for c in size_text):
            strict = False
            size_text = size_text.strip(b" \t")
        if ext and not _strict_extensions(b";" + ext):
            strict = False
        try:
            size = int(size_text, 16)
        except ValueError:
            return False, b""
        pos = end + 2
        if size == 0:
            return strict, body_raw[pos:]
        pos += size + 2


def _strict_extensions(ext: bytes) -> bool:
    for part in ext.split(b";")[1:]:
        name, eq, value = part.partition(b"=")
        if not name or any(c not in _TOKEN for c in name):
            return False
        if eq:
            quoted = len(value) >= 2 and value[:1] == value[-1:] == b'"'
            if not quoted and (not value or any(c not in _TOKEN for c in value)):
                return False
            if quoted and (b'"' in value[1:-1] or any(c in _CTL for c in value)):
                return False
    return True


def plan_requests(stream: bytes, *, limit: int = 12) -> tuple[list[Planned], bytes]:
    """Split a caller's byte stream into requests as h11 (a server) reads it, and attach the listed exceptions
    where the proxy documents a stricter answer. Returns the plan and the bytes no request took (what follows
    a request that ends the connection)."""
    plan: list[Planned] = []
    rest = stream
    while rest and len(plan) < limit:
        # Exception (h11 is stricter than RFC 9112 2.2): "a server ... SHOULD ignore at least one empty line
        # (CRLF) received prior to the request-line"; llhttp does, h11 refuses them.
        while rest.startswith(b"\r\n"):
            rest = rest[2:]
        if not rest:
            break
        entry = _plan_one(rest, len(plan))
        plan.append(entry)
        rest = rest[len(entry.raw) :]
        if entry.outcome != "accepted" or any(r.closes and r.must for r in entry.rules) or not entry.keep_alive:
            break
    return plan, rest


def _plan_one(data: bytes, index: int) -> Planned:
    entry = _plan_h11(data, index)
    line_end = data.find(b"\n")
    line = data[:line_end]
    if entry.outcome != "rejected" or b"  " not in line or line_end < 0:
        return entry
    # Exception (RFC 9112 3): "recipients MAY instead parse on whitespace-delimited word boundaries"; llhttp
    # takes more than one SP between the request line's elements, and the proxy writes the line anew with one.
    single = b" ".join(part for part in line.split(b" ") if part)
    spared = len(line) - len(single)
    again = _plan_h11(single + data[line_end:], index)
    if again.outcome != "accepted":
        return entry
    again.raw = data[: len(again.raw) + spared]
    again.rules.append(Rule("more than one SP between request-line elements (RFC 9112 3)", PARSE_REFUSALS, False, True))
    return again


def _plan_h11(data: bytes, index: int) -> Planned:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    request: h11.Request | None = None
    body = bytearray()
    trailers: list[tuple[bytes, bytes]] = []
    head_len = 0
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return Planned(index, data, "unfinished", method=request.method if request else b"")
            if isinstance(event, h11.Request):
                request = event
                head_len = len(data) - len(conn.trailing_data[0])
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                trailers = event.headers.raw_items()
                break
    except h11.RemoteProtocolError as exc:
        # The method of a request h11 refuses: known when its request line parsed, else left empty (its answer
        # may then have a body or not: whether it was HEAD cannot be told from a broken request line).
        method = request.method if request is not None else b""
        return Planned(index, data, "rejected", error=str(exc), method=method)
    assert request is not None
    used = len(data) - len(conn.trailing_data[0])
    raw = data[:used]
    entry = Planned(
        index,
        raw,
        "accepted",
        method=request.method,
        target=request.target,
        version=request.http_version,
        headers=request.headers.raw_items(),
        body=bytes(body),
    )
    _apply_rules(entry, raw[:head_len], raw[head_len:], trailers)
    return entry


def _apply_rules(entry: Planned, head: bytes, body_raw: bytes, trailers: list[tuple[bytes, bytes]]) -> None:
    """The listed exceptions: each names what the proxy documents doing where h11 (or RFC 9112) would go on."""
    lines = _head_lines(head)
    fields = _raw_fields(lines[1:])
    names = [n for n, _ in fields]
    headers = entry.headers
    connection = _tokens(headers, b"connection")
    chunked = b"transfer-encoding" in names
    add = entry.rules.append
    closing = frozenset({400})
    # Parse refusals (llhttp strict mode and the server's own head checks): a JSON 400 and the connection closes.
    strict_chunks, trailer_raw = _chunk_framing(body_raw) if chunked else (True, b"")
    if _bare_lf(head) or _bare_lf(trailer_raw):
        add(Rule("bare LF as a line end (RFC 9112 2.2 allows refusing; README: bare CR or LF)", closing, True, True))
    if any(line[:1] in (b" ", b"\t") for line in lines[1:] + _head_lines(trailer_raw) if line):
        add(Rule("obsolete line folding (RFC 9112 5.2: refuse or unfold; README refuses)", closing, True, True))
    values = [v for _, v in fields] + [v for _, v in trailers]
    if any(c in _CTL for v in values for c in v):
        add(Rule("a control character in a field value (RFC 9110 5.5; h11 allows them)", closing, True, True))
    if entry.version not in (b"1.0", b"1.1"):
        # h11 takes any HTTP/d.d; RFC 9112 2.6 would process 1.2 as 1.1, the proxy refuses (unsupported version).
        add(Rule("an HTTP version other than 1.0 and 1.1", frozenset({400, 505}), True, True))
    if entry.method not in LLHTTP_METHODS:
        add(Rule("a method llhttp does not know (README: does not parse as HTTP/1.1)", closing, True, True))
    repeated = sorted({n.decode() for n in names if n in SINGLE_VALUED and names.count(n) > 1})
    if repeated:
        # h11 merges identical Content-Length lines and only refuses repeated Host and Transfer-Encoding.
        add(Rule(f"a repeated single-valued header {repeated} (docs/security.md)", closing, True, True))
    lengths = [v for n, v in fields if n == b"content-length"]
    entry.has_body = chunked or any(v.isdigit() and int(v) > 0 for v in lengths)
    if any(not v.isdigit() for v in lengths):
        add(Rule("a Content-Length list (RFC 9110 8.6 allows refusing; h11 merges it)", closing, True, True))
    if lengths and chunked:
        add(Rule("Content-Length with Transfer-Encoding (RFC 9112 6.1; h11 lets chunked win)", closing, True, True))
    if any(n.lower() in (b"transfer-encoding", b"content-length") for n, _ in trailers):
        # RFC 9110 6.5.1: framing fields cannot be trailers; llhttp refuses them (h11 takes any trailer).
        add(Rule("Transfer-Encoding or Content-Length as a trailer", closing, False, True, head=False))
    if not strict_chunks:
        add(Rule("chunk framing outside llhttp's strict grammar (h11 takes any ';...' and OWS)", closing, False, True))
    upgrade = [v for n, v in fields if n == b"upgrade"]
    if chunked and upgrade:
        # llhttp stops at an upgrade when Connection names it and Upgrade names a protocol.
        must = b"upgrade" in connection and any(upgrade)
        add(Rule("a chunked body with Upgrade (README: not supported)", closing, must, True, False))
    if entry.method == b"CONNECT":
        add(Rule("CONNECT (README: never an open proxy)", frozenset({405, 400}), True, True))
    # Limits (README: 414, 431, 413): configured small in this rig.
    request_line = len(lines[0]) if lines else 0
    block = sum(len(n) + len(v) + 4 for n, v in fields)
    if request_line > MAX_HEADER_BYTES or block > MAX_HEADER_BYTES or len(fields) > MAX_HEADERS:
        add(Rule("a head over limits.max_header_bytes or max_headers", frozenset({414, 431}), True, True))
    if any(v.isdigit() and int(v) > MAX_BODY for v in lengths):
        add(Rule("a Content-Length over limits.max_body_bytes", frozenset({413}), True, True))
    if len(entry.body) > MAX_BODY:
        add(Rule("a chunked body over limits.max_body_bytes", frozenset({413}), True, True, head=False))
    # The handler's refusals: the connection stays open unless an unread body makes it close.
    if not entry.target.startswith(b"/"):
        add(Rule("a target not in origin form (README: never an open proxy)", closing, True, False))
    elif _has_dot_segment(entry.target.partition(b"?")[0]):
        add(Rule("a dot segment in the path (docs/security.md)", closing, True, False))
    if entry.method == b"TRACE":
        add(Rule("TRACE (it would echo the injected credential)", frozenset({405}), True, False))
    # The id passed on is the first x-ms-client-request-id when not empty, else the first x-request-id (README).
    client_ids = [v for n, v in headers if n.lower() == b"x-ms-client-request-id"]
    plain_ids = [v for n, v in headers if n.lower() == b"x-request-id"]
    chosen = client_ids[0] if client_ids and client_ids[0] else (plain_ids[0] if plain_ids else None)
    if chosen is not None and not (1 <= len(chosen) <= 200 and all(0x21 <= c <= 0x7E for c in chosen)):
        add(Rule("an unusable request id header (README)", closing, True, False))
    entry.request_id = chosen
    # Keep-alive: RFC 9112 9.3. HTTP/1.0 keep-alive is honoured (README; h11 never keeps an HTTP/1.0 connection),
    # except with Transfer-Encoding, after which RFC 9112 6.1 says the connection MUST close.
    if entry.version == b"1.1":
        entry.keep_alive = b"close" not in connection
    else:
        entry.keep_alive = b"keep-alive" in connection and b"close" not in connection and not chunked
    entry.expect_100 = entry.version == b"1.1" and b"100-continue" in _tokens(headers, b"expect")


def expected_upstream_headers(entry: Planned) -> list[tuple[bytes, bytes]]:
    """The caller's end-to-end headers as they must reach the upstream, in order."""
    named = set(_tokens(entry.headers, b"connection"))
    return [
        (n, v)
        for n, v in entry.headers
        if n.lower() not in HOP_BY_HOP
        and n.lower() not in named
        and n.lower() not in PROXY_OWNED
        and not n.lower().startswith(b"proxy-")
    ]


# -- reading answers the way a strict client does (h11 as a client)


def h11_events(conn: h11.Connection) -> Iterator[Any]:
    """The events h11 has for the bytes it was given, up to where it needs more (its errors propagate)."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            return
        yield event


@dataclass
class _ClientRead:
    """What h11, as the client that sent one request, reads of the answer bytes it is given."""

    interim: list[int] = field(default_factory=list)  # the interim (1xx) answers' statuses
    response: h11.Response | None = None  # the final answer's head
    head_bytes: int = 0  # the bytes up to the end of that head (interim answers included)
    body: bytes = b""
    complete: bool = False  # the final answer ended
    error: str = ""  # h11 refused the bytes


def _read_as_client(conn: h11.Connection, data: bytes, *, eof: bool) -> _ClientRead:
    """Give `conn` (a client that sent its request) `data`, then the end of the connection if `eof`; read the
    answer up to its end."""
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    read = _ClientRead()
    body = bytearray()
    try:
        for event in h11_events(conn):
            if isinstance(event, h11.InformationalResponse):
                read.interim.append(event.status_code)
            elif isinstance(event, h11.Response):
                read.response = event
                read.head_bytes = len(data) - len(conn.trailing_data[0])
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                read.complete = True
                break
    except h11.RemoteProtocolError as exc:
        read.error = str(exc)
    read.body = bytes(body)
    return read


@dataclass
class Answer:
    interim: list[int]
    status: int = 0
    reason: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    error: str = ""  # h11 refused the bytes
    raw: bytes = b""
    method: bytes = b"GET"  # of the request it answers, as the parse took it

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None


def read_answer(data: bytes, method: bytes, *, eof: bool) -> tuple[Answer, bytes]:
    """Parse one answer to a request with `method` from the start of `data`; returns it and the bytes after it.
    `eof`: the connection ended after `data` (an answer that ends there unfinished was cut, not malformed)."""
    if not data:
        return Answer(interim=[], method=method), b""  # nothing came: cut before the answer (when eof)
    answer, rest = _read_answer(data, method, eof=False)
    if eof and not answer.complete and not answer.error:
        closed, rest_closed = _read_answer(data, method, eof=True)
        if closed.complete:  # a body delimited by the close
            return closed, rest_closed
    return answer, rest


def _read_answer(data: bytes, method: bytes, *, eof: bool) -> tuple[Answer, bytes]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=CALLER_HOLDS)
    usable = method if method and all(c in _TOKEN for c in method) else b"GET"
    conn.send(h11.Request(method=usable, target="/", headers=[("Host", "caller")]))
    conn.send(h11.EndOfMessage())
    read = _read_as_client(conn, data, eof=eof)
    answer = Answer(interim=read.interim, body=read.body, complete=read.complete, error=read.error, method=usable)
    if read.response is not None:
        answer.status = read.response.status_code
        answer.reason = read.response.reason
        answer.headers = read.response.headers.raw_items()
    rest = conn.trailing_data[0] if answer.complete else b""
    answer.raw = data[: len(data) - len(rest)]
    return answer, rest


def framing_problem(answer: Answer, method: bytes, *, last: bool, http10: bool) -> str | None:
    """Why an answer is not well framed for its caller, or None: a body needs Content-Length or chunked, except
    the close-delimited answer to an HTTP/1.0 caller (README), which must also end the connection."""
    if method == b"HEAD" or answer.status in (204, 304) or answer.status < 200:
        return None
    lengths = [v for n, v in answer.headers if n.lower() == b"content-length"]
    chunked = [v for n, v in answer.headers if n.lower() == b"transfer-encoding"]
    if len(lengths) > 1 or (lengths and chunked):
        return f"ambiguous framing: {answer.headers}"
    if lengths or chunked:
        return None
    closes = b"close" in _tokens(answer.headers, b"connection")
    if http10 and closes and last:
        return None
    return "an answer with a body but neither Content-Length nor chunked on a connection that stays open"


def read_answers(data: bytes, plan: list[Planned], *, eof: bool) -> tuple[list[Answer], bytes]:
    """The answers in `data`, one per planned request in order, and the bytes after the last complete one."""
    answers = []
    for entry in plan:
        if not data:
            break
        answer, rest = read_answer(data, entry.method or b"GET", eof=eof)
        if not entry.method and (answer.error or rest or not answer.complete):
            answer, rest = read_answer(data, b"HEAD", eof=eof)  # the answer to a HEAD request, maybe
        answers.append(answer)
        if not answer.complete:
            return answers, b""
        data = rest
    return answers, data


def complete_answers(data: bytes, plan: list[Planned]) -> int:
    answers, _ = read_answers(data, plan, eof=False)
    return sum(a.complete for a in answers)


def _is_json_refusal(answer: Answer) -> str | None:
    import json

    rid = answer.header(b"x-request-id")
    try:
        document = json.loads(answer.body)
    except ValueError:
        return f"not JSON: {answer.body[:200]!r}"
    if not isinstance(document, dict) or not document.get("error"):
        return f"no error in {document!r}"
    if rid is None or document.get("request_id") != rid.decode("latin-1"):
        return f"request_id {document.get('request_id')!r} is not the x-request-id header {rid!r}"
    return None


def _id_ok(value: bytes | None, expected: bytes | None) -> bool:
    if value is None:
        return False
    if expected is not None:
        return value == expected
    return len(value) == 32 and all(c in b"0123456789abcdef" for c in value)


def check_record(rig: Rig, entry: Planned, rec: Recorded) -> list[str]:
    """A forwarded request as the upstream got it against what h11 read from the caller."""
    out = []
    want = (entry.method, entry.target, entry.body)
    got = (rec.method, rec.target, rec.body)
    if got != want:
        out.append(f"{entry.describe()} reached the upstream as {got!r}, expected {want!r}")
    end_to_end = [(n, v) for n, v in rec.headers if n.lower() not in PROXY_OWNED]
    expected = expected_upstream_headers(entry)
    if end_to_end != expected:
        out.append(f"{entry.describe()}: upstream headers {end_to_end!r}, expected {expected!r}")
    owned: dict[bytes, list[bytes]] = {}
    for n, v in rec.headers:
        if n.lower() in PROXY_OWNED:
            owned.setdefault(n.lower(), []).append(v)
    if owned.get(b"authorization") != [b"Bearer " + rig.key.encode()]:
        out.append(f"{entry.describe()}: the upstream did not get exactly the route's credential")
    if owned.get(b"host") != [b"127.0.0.1:%d" % rig.recorder_port]:
        out.append(f"{entry.describe()}: upstream Host {owned.get(b'host')!r}")
    ids = owned.get(b"x-request-id", []) + owned.get(b"x-ms-client-request-id", [])
    if len(ids) != 2 or ids[0] != ids[1] or not _id_ok(ids[0], entry.request_id):
        out.append(f"{entry.describe()}: upstream request ids {ids!r}, caller's {entry.request_id!r}")
    return out


def check_caller_case(
    rig: Rig, plan: list[Planned], conv: Conversation, records: list[Recorded], faults: list[str]
) -> list[str]:
    """Every invariant of one caller-side case; returns the violations (empty: the case passed)."""
    problems = [f"upstream: {f}" for f in faults]
    eof = conv.ended in ("eof", "reset")
    answers, leftover = read_answers(conv.received, plan, eof=eof)
    by_seq = {r.seq: r for r in records}
    used: list[int] = []
    may_end = False  # the connection may have ended before the next request
    must_end = False  # ... and must have
    for entry, answer in itertools.zip_longest(plan, answers):
        if entry is None:
            break
        if answer is None:
            if not (may_end or entry.outcome != "accepted"):
                problems.append(f"{entry.describe()} got no answer (connection {conv.ended})")
            break
        if must_end:
            problems.append(f"{entry.describe()} was answered after an answer that ends the connection")
            break
        if answer.error or not answer.complete:
            problems.append(
                f"{entry.describe()}: answer {'unparseable: ' + answer.error if answer.error else 'cut off'}: "
                f"{answer.raw[:300]!r}"
            )
            break
        last = answer is answers[-1]
        problem = framing_problem(answer, entry.method, last=last and eof, http10=entry.version == b"1.0")
        if problem:
            problems.append(f"{entry.describe()}: {problem}: {answer.raw[:300]!r}")
        if any(s != 100 for s in answer.interim) or len(answer.interim) > 1:
            problems.append(f"{entry.describe()}: interim answers {answer.interim}")
        rid, cid = answer.header(b"x-request-id"), answer.header(b"x-ms-client-request-id")
        if rid is None or rid != cid:
            problems.append(f"{entry.describe()}: answer request ids {rid!r} / {cid!r}")
        closes = b"close" in _tokens(answer.headers, b"connection")
        seq_text = answer.header(b"x-upstream-seq")
        if seq_text is not None:
            seq = int(seq_text)
            used.append(seq)
            if entry.outcome != "accepted":
                problems.append(f"{entry.describe()} was forwarded: {entry.raw[:300]!r}")
            elif entry.must_refuse:
                problems.append(f"{entry.describe()} was forwarded, not refused: {entry.raw[:300]!r}")
            if answer.interim and not entry.expect_100:
                problems.append(f"{entry.describe()}: 100 Continue without Expect: 100-continue")
            body = b"" if entry.method == b"HEAD" else b"seq:" + seq_text
            if answer.status != 200 or answer.body != body:
                problems.append(f"{entry.describe()}: forwarded answer {answer.status} {answer.body!r}")
            if entry.outcome == "accepted" and rid is not None and not _id_ok(rid, entry.request_id):
                problems.append(f"{entry.describe()}: answer request id {rid!r}, caller's {entry.request_id!r}")
            rec = by_seq.get(seq)
            if rec is None:
                problems.append(f"{entry.describe()}: answer of upstream request {seq}, which this case never sent")
            elif entry.outcome == "accepted":
                problems += check_record(rig, entry, rec)
            may_end = must_end = not entry.keep_alive or closes
        else:
            if entry.outcome == "accepted" and not entry.rules:
                problems.append(
                    f"{entry.describe()} was refused ({answer.status} {answer.body[:160]!r}) though h11 accepts it "
                    f"and no listed exception covers it: {entry.raw[:300]!r}"
                )
            elif answer.status not in entry.statuses:
                problems.append(f"{entry.describe()}: refused with {answer.status}, expected one of {entry.statuses}")
            if answer.interim and not any(not r.head for r in entry.rules):
                problems.append(f"{entry.describe()}: 100 Continue before a refusal decided on the head")
            if answer.method != b"HEAD":
                why = _is_json_refusal(answer)
                if why:
                    problems.append(f"{entry.describe()}: refusal {answer.status} {why}")
            matching = [r for r in entry.rules if answer.status in r.statuses]
            parse_refusal = entry.outcome != "accepted" or (matching and all(r.closes for r in matching))
            may_end = True if entry.has_body or parse_refusal or not entry.keep_alive else closes
            must_end = bool(parse_refusal) or closes or not entry.keep_alive
            if entry.outcome != "accepted":
                break
    if len(answers) > len(plan):
        problems.append("more answers than requests")
    if leftover:
        problems.append(f"bytes after the last answer: {leftover[:300]!r}")
    if conv.ended == "too long":
        problems.append(f"more than {CALLER_HOLDS} bytes of answers")
    if conv.ended == "deadline":
        problems.append(f"the proxy kept the connection open for {conv.seconds:.1f} s (past every timeout)")
    stray = [r for r in records if r.seq not in used]
    for rec in stray:
        problems.append(f"the upstream got {rec.method!r} {rec.target!r} body {rec.body[:100]!r}, never answered")
    if used != sorted(used):
        problems.append(f"answers out of order: upstream sequence {used}")
    return problems


# -- the upstream side


@dataclass
class Verdict:
    """What h11 (as a client) reads from an upstream's answer bytes."""

    outcome: str  # "clean" (a whole final answer), "invalid" (h11 refuses it), "unfinished" (the bytes ended)
    error: str = ""
    interim: list[int] = field(default_factory=list)
    status: int = 0
    reason: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    head: bool = False  # a final answer's head was read
    head_bytes: int = 0  # the bytes up to the end of the final answer's head (interim answers included)
    used: int = 0  # bytes up to the end of the final answer (clean only)
    extra: bytes = b""  # bytes after it
    reusable: bool = False

    def describe(self) -> str:
        head = f"{self.status} {self.reason!r}" if self.head else "no final head"
        return f"h11: {self.outcome}{' (' + self.error + ')' if self.error else ''}, {head}"


def judge_answer(method: bytes, body: bytes, data: bytes, *, closes: bool) -> Verdict:
    """Read an upstream's answer to (`method`, `body`) as h11 does; `closes`: the connection ends after `data`."""
    verdict = _judge_h11(method, body, data, closes=closes)
    if verdict.outcome != "invalid" or "Only Transfer-Encoding: chunked" not in verdict.error:
        return verdict
    # Exception (h11 refuses any Transfer-Encoding but chunked, even where it frames nothing): an answer to HEAD,
    # and a 204 or 304, has no body whatever its framing headers say (RFC 9112 6.3), and RFC 9110 9.3.2 lets a HEAD
    # answer carry the Transfer-Encoding a GET would get. The proxy relays such an answer with Transfer-Encoding
    # dropped (hop-by-hop), as h11 reads it with the coding named chunked.
    status = re.search(rb"^HTTP/1\.[01] ([0-9]{3})(?![0-9])", _final_head(data))
    if method != b"HEAD" and not (status and status.group(1) in (b"204", b"304")):
        return verdict
    renamed = _TE_LINE.sub(rb"\1 chunked", _final_head(data)) + data[len(_final_head(data)) :]
    again = _judge_h11(method, body, renamed, closes=closes)
    return again if again.outcome != "invalid" else verdict


_TE_LINE = re.compile(rb"(?im)^(transfer-encoding[ \t]*:)[^\r\n]*")


def _final_head(data: bytes) -> bytes:
    """The bytes up to the end of the first head that is not an interim (1xx) answer's, or all of them."""
    pos = 0
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return data
        if not re.match(rb"HTTP/1\.[01] 1[0-9][0-9]", data[pos : pos + 12]):
            return data[: end + 4]
        pos = end + 4


def _judge_h11(method: bytes, body: bytes, data: bytes, *, closes: bool) -> Verdict:
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", "upstream")] + ([("Content-Length", str(len(body)))] if body else [])
    conn.send(h11.Request(method=method, target="/", headers=headers))
    if body:
        conn.send(h11.Data(data=body))
    conn.send(h11.EndOfMessage())
    read = _read_as_client(conn, data, eof=closes)
    outcome = "clean" if read.complete else "invalid" if read.error else "unfinished"
    verdict = Verdict(outcome, error=read.error, interim=read.interim, body=read.body)
    response = read.response
    if response is not None:
        verdict.head = True
        verdict.head_bytes = read.head_bytes
        verdict.status = response.status_code
        verdict.reason = response.reason
        verdict.headers = response.headers.raw_items()
    if verdict.outcome == "clean":
        verdict.extra = conn.trailing_data[0]
        verdict.used = len(data) - len(verdict.extra)
        assert response is not None
        keep = conn.their_state is h11.DONE and not closes
        if response.http_version == b"1.0":
            # Exception (h11 never reuses a connection after an HTTP/1.0 answer): RFC 9112 C.2.2 keeps one that
            # says keep-alive, framed by Content-Length (a 1.0 answer with Transfer-Encoding is faulty, 6.1).
            tokens = _tokens(verdict.headers, b"connection")
            bodyless = method == b"HEAD" or verdict.status in (204, 304)
            framed = bodyless or any(n.lower() == b"content-length" for n, _ in verdict.headers)
            chunked = any(n.lower() == b"transfer-encoding" for n, _ in verdict.headers)
            keep = not closes and b"keep-alive" in tokens and b"close" not in tokens and framed and not chunked
        # Exception (h11 refuses any byte after an answer): llhttp skips empty lines before a message, and bare
        # CRLFs between messages are harmless (RFC 9112 2.2 asks servers to ignore them before a request).
        verdict.reusable = keep and not verdict.extra.replace(b"\r\n", b"")
    return verdict


def expected_downstream_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An upstream answer's end-to-end headers as the caller must get them, in order (without Date and the
    framing headers, which are compared on their own)."""
    named = set(_tokens(headers, b"connection")) - {b"content-length"}
    return [
        (n, v)
        for n, v in headers
        if n.lower() not in RESPONSE_HOP_BY_HOP
        and n.lower() not in named
        and not n.lower().startswith(b"proxy-")
        and n.lower() not in (b"x-request-id", b"x-ms-client-request-id", b"content-length", b"date")
    ]


def _relayed_headers(answer: Answer) -> list[tuple[bytes, bytes]]:
    return [
        (n, v)
        for n, v in answer.headers
        if n.lower() not in (b"x-request-id", b"x-ms-client-request-id", b"content-length", b"date")
        and n.lower() not in (b"transfer-encoding", b"connection")
    ]


def check_upstream_answer(case: str, method: bytes, verdict: Verdict, answer: Answer, plain: bool) -> list[str]:
    """One answer the caller got against what h11 read from the upstream's bytes."""
    where = f"{case} ({method.decode()}; {verdict.describe()})"
    out = []
    if answer.error:
        return [f"{where}: the caller's answer does not parse: {answer.error}: {answer.raw[:300]!r}"]
    if answer.interim:
        out.append(f"{where}: interim answers passed on: {answer.interim}")
    if not answer.status:  # cut before a head: allowed, unless the upstream's answer was plain
        if plain:
            out.append(f"{where}: a plain answer was cut off: {answer.raw[:200]!r}")
        return out
    own = answer.header(b"x-script") is None
    if own:
        if answer.status not in (502, 504):
            out.append(f"{where}: the proxy answered {answer.status} itself: {answer.raw[:300]!r}")
        elif answer.method != b"HEAD" and answer.complete:
            why = _is_json_refusal(answer)
            if why:
                out.append(f"{where}: {answer.status} {why}")
        if plain:
            out.append(f"{where}: a plain answer got {answer.status} {answer.body[:200]!r}")
        if not answer.complete:
            out.append(f"{where}: the proxy's own answer was cut off")
        return out
    if not verdict.head:
        out.append(f"{where}: relayed {answer.status} though h11 reads no final answer: {answer.raw[:300]!r}")
        return out
    if verdict.head_bytes > MAX_UPSTREAM_HEAD:
        # Listed exception (h11 reads any head given at once): README, an upstream head over 64 KiB is a 502.
        out.append(
            f"{where}: relayed an answer whose head takes {verdict.head_bytes} bytes (README: 502 beyond 64 KiB)"
        )
    if (answer.status, answer.reason) != (verdict.status, verdict.reason):
        out.append(f"{where}: relayed status {answer.status} {answer.reason!r}")
    got, want = _relayed_headers(answer), expected_downstream_headers(verdict.headers)
    if got != want:
        out.append(f"{where}: relayed headers {got!r}, expected {want!r}")
    named = set(_tokens(verdict.headers, b"connection"))
    dates = [v for n, v in verdict.headers if n.lower() == b"date"] if b"date" not in named else []
    if dates and [v for n, v in answer.headers if n.lower() == b"date"] != dates:
        out.append(f"{where}: the upstream's Date was not passed on")
    no_body = method == b"HEAD" or verdict.status in (204, 304)
    want_body = b"" if no_body else verdict.body
    problem = framing_problem(answer, method, last=False, http10=False)
    if problem and answer.complete:
        out.append(f"{where}: {problem}: {answer.raw[:300]!r}")
    if answer.complete:
        if verdict.outcome != "clean":
            out.append(f"{where}: relayed as complete: {answer.raw[:300]!r}")
        elif answer.body != want_body:
            out.append(f"{where}: relayed body {answer.body[:200]!r}, expected {want_body[:200]!r}")
    else:
        if not want_body.startswith(answer.body):
            out.append(f"{where}: the cut answer's body {answer.body[:200]!r} is not a prefix of {want_body[:200]!r}")
        if plain:
            out.append(f"{where}: a plain answer was cut off after {len(answer.body)} body bytes")
    return out


def check_pool(
    rig: Rig, conns: list[UpstreamConn], arrivals: list[tuple[str, int]], idempotent: dict[str, bool]
) -> list[str]:
    """No upstream connection carries a request after an answer that forbids reuse, or while an answer is being
    written; a request is resent only after its first connection closed without a byte of answer."""
    out = [f"upstream connection {c.id} carried bytes {late}" for c in conns for late in c.late]
    seen: dict[str, int] = {}
    by_id = {c.id: c for c in conns}
    for case, conn_id in arrivals:
        if case in seen:
            first = by_id.get(seen[case])
            wrote = first.written.get(case, 0) if first is not None else 0
            if wrote or not idempotent.get(case, False):
                out.append(f"{case} was sent upstream again after {wrote} bytes of its answer")
        else:
            seen[case] = conn_id
    return out


class Caller:
    """A keep-alive caller connection to a proxy: one request at a time, its answer read as h11 reads it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.peak_rss = 0

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _sample(self) -> None:
        self.peak_rss = max(self.peak_rss, rss_bytes())

    def ask(self, request: bytes, method: bytes, seconds: float, fin: str = "") -> tuple[Answer, str, bytes]:
        """Send `request`, read its answer; returns it, how the exchange ended ("answer", "eof", "reset",
        "too long" or "deadline") and any bytes after the answer. `fin`: half-close the connection once the request
        is sent ("request") or once the answer's head is in ("head")."""
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=seconds)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = self.sock
        limit = time.monotonic() + seconds
        buf = bytearray()
        try:
            sock.settimeout(seconds)
            sock.sendall(request)
            sock.setblocking(False)
            while time.monotonic() < limit:
                if fin == "request" or (fin == "head" and b"\r\n\r\n" in buf):
                    with contextlib.suppress(OSError):  # the proxy may have closed the connection already
                        sock.shutdown(socket.SHUT_WR)
                    fin = ""
                chunk = _poll(sock, self._sample)
                if chunk is None:
                    continue
                if not chunk:
                    self.close()
                    return read_answer(bytes(buf), method, eof=True)[0], "eof", b""
                buf += chunk
                if len(buf) > CALLER_HOLDS:
                    # More than any answer the oracle expects: stop here rather than hold it (the RSS is measured).
                    self.close()
                    return read_answer(bytes(buf), method, eof=False)[0], "too long", b""
                answer, rest = read_answer(bytes(buf), method, eof=False)
                if fin and answer.complete:  # the head came with the whole answer: the half-close follows it
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                if answer.complete or answer.error:
                    if answer.error or rest or b"close" in _tokens(answer.headers, b"connection"):
                        self.close()
                    return answer, "answer", rest
        except (ConnectionResetError, BrokenPipeError):
            self.close()
            return read_answer(bytes(buf), method, eof=True)[0], "reset", b""
        self.close()
        return read_answer(bytes(buf), method, eof=False)[0], "deadline", b""

    def closed_within(self, seconds: float) -> bool:
        """The proxy closes the connection (sending nothing more) within `seconds`."""
        sock = self.sock
        if sock is None:
            return True
        limit = time.monotonic() + seconds
        try:
            while time.monotonic() < limit:  # bounded by the deadline
                chunk = _poll(sock, self._sample)
                if chunk is not None:
                    return not chunk
        except ConnectionResetError:
            return True
        finally:
            self.close()
        return False
