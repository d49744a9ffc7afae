"""A misbehaving upstream: a raw-TCP HTTP/1.1 server on 127.0.0.1 built on asyncio streams, with scripted faults.

aiohttp's own server would refuse to send most of these faults (garbage status lines, broken chunked encoding,
a reset after half a body), so this one writes bytes by hand. Every request that arrives is parsed (Content-Length
and chunked bodies, hashed while streaming, so a 1 GiB upload costs no memory) and recorded as an `Arrival`;
then the next scripted `Behaviour` answers it, or `ok` when the script is empty.

    up = await FaultyUpstream.start()
    up.script(reset_mid_body(), ok())
    ...
    await up.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

_HEAD_LIMIT = 1 << 16
_READ = 1 << 16


@dataclass
class Arrival:
    """One request as the upstream saw it. `complete` is False when the body ended before its declared end."""

    method: str
    path: str
    headers: dict[str, str]
    connection: int  # index of the TCP connection it came on
    on_connection: int  # 0 for the first request on that connection, 1 for the next, ...
    body_bytes: int = 0
    sha256: str = ""
    complete: bool = False
    framing: str = "none"  # "content-length", "chunked" or "none"


@dataclass
class Exchange:
    """What a behaviour gets: the request, the connection, and the upstream (to record what it did)."""

    arrival: Arrival
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    upstream: FaultyUpstream


# A behaviour answers one request; it returns True to keep the connection open for the next request.
Behaviour = Callable[[Exchange], Awaitable[bool]]


def response_head(status: int, headers: dict[str, str] | None = None, *, reason: str | None = None) -> bytes:
    reason = (
        reason
        if reason is not None
        else {200: "OK", 500: "Internal Server Error", 503: "Unavailable"}.get(status, "Status")
    )
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def reset(writer: asyncio.StreamWriter) -> None:
    """Abort with a TCP RST (SO_LINGER 0), the way a crashed server or a middlebox drops a connection."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# ---- behaviours -------------------------------------------------------------------------------------------------


def ok(body: bytes = b"ok", *, status: int = 200, delay: float = 0.0) -> Behaviour:
    """A well-formed answer with a Content-Length, the connection kept alive."""

    async def run(ex: Exchange) -> bool:
        if delay:
            await asyncio.sleep(delay)
        ex.writer.write(response_head(status, {"Content-Length": str(len(body))}) + body)
        await ex.writer.drain()
        return True

    return run


def status(code: int, body: bytes) -> Behaviour:
    """An ordinary answer with this status (a 5xx from an overloaded backend, say)."""
    return ok(body, status=code)


def digest() -> Behaviour:
    """200 with `<bytes> <sha256>` of the body received (for uploads)."""

    async def run(ex: Exchange) -> bool:
        a = ex.arrival
        return await ok(f"{a.body_bytes} {a.sha256}".encode())(ex)

    return run


def raw(*parts: bytes, gap: float = 0.05) -> Behaviour:
    """Write these bytes verbatim, `gap` seconds apart (so the client parses them in separate reads), then close:
    for answers that are not valid HTTP."""

    async def run(ex: Exchange) -> bool:
        for part in parts:
            ex.writer.write(part)
            await ex.writer.drain()
            await asyncio.sleep(gap)  # let the bytes arrive on their own, and before the FIN
        return False

    return run


def reset_now() -> Behaviour:
    """Read the request (and its body), then reset the connection without answering."""

    async def run(ex: Exchange) -> bool:
        reset(ex.writer)
        return False

    return run


def reset_mid_body(*, chunked: bool = True, sent: int = 4096) -> Behaviour:
    """Headers and part of the body, then a reset."""

    async def run(ex: Exchange) -> bool:
        if chunked:
            head = response_head(200, {"Transfer-Encoding": "chunked"})
            ex.writer.write(head + chunk(b"a" * sent) + b"ffff\r\n" + b"b" * 100)
        else:
            ex.writer.write(response_head(200, {"Content-Length": str(sent * 10)}) + b"a" * sent)
        await ex.writer.drain()
        await asyncio.sleep(0.05)
        reset(ex.writer)
        return False

    return run


def stall_after_headers(seconds: float, *, first: bytes = b"") -> Behaviour:
    """Headers (and optionally a first chunk), then nothing for `seconds`, then the end of a chunked body."""

    async def run(ex: Exchange) -> bool:
        ex.writer.write(response_head(200, {"Transfer-Encoding": "chunked"}) + (chunk(first) if first else b""))
        await ex.writer.drain()
        await asyncio.sleep(seconds)
        ex.writer.write(chunk(b"late") + b"0\r\n\r\n")
        await ex.writer.drain()
        return True

    return run


def stall_before_headers(seconds: float) -> Behaviour:
    """Nothing at all for `seconds`, then a normal answer."""
    return ok(b"late", delay=seconds)


def trickle(parts: list[bytes], interval: float) -> Behaviour:
    """A chunked body whose chunks come `interval` seconds apart."""

    async def run(ex: Exchange) -> bool:
        ex.writer.write(response_head(200, {"Transfer-Encoding": "chunked"}))
        await ex.writer.drain()
        for part in parts:
            await asyncio.sleep(interval)
            ex.writer.write(chunk(part))
            await ex.writer.drain()
        ex.writer.write(b"0\r\n\r\n")
        await ex.writer.drain()
        return True

    return run


def close_after_response(body: bytes = b"ok") -> Behaviour:
    """A normal answer with no `Connection: close`, then the connection is closed at once (a FIN)."""

    async def run(ex: Exchange) -> bool:
        await ok(body)(ex)
        return False

    return run


def close_when_idle(idle: float, body: bytes = b"ok") -> Behaviour:
    """A normal answer, then the connection is closed when `idle` seconds pass or the next request starts arriving,
    whichever is first; that request is never read nor answered. This is a server's keep-alive timer firing just
    as the client reuses the connection: the race every pooling client meets, made deterministic."""

    async def run(ex: Exchange) -> bool:
        await ok(body)(ex)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(idle):
                if await ex.reader.read(1):
                    ex.upstream.dropped += 1
        ex.writer.close()
        return False

    return run


def hold(seconds: float, body: bytes = b"held") -> Behaviour:
    """Keep the request for `seconds`, then answer normally."""
    return ok(body, delay=seconds)


# ---- the server -------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class FaultyUpstream:
    server: asyncio.Server
    port: int
    arrivals: list[Arrival] = field(default_factory=list)
    dropped: int = 0  # requests that started arriving on a connection the upstream then closed unread
    connections: int = 0
    default: Behaviour = field(default_factory=ok)
    _script: deque[Behaviour] = field(default_factory=deque)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    async def start(cls, *, default: Behaviour | None = None, port: int = 0) -> FaultyUpstream:
        self = cls(server=None, port=0)  # type: ignore[arg-type]
        if default is not None:
            self.default = default
        self.server = await self._listen(port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _listen(self, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", port, limit=_HEAD_LIMIT, backlog=1024)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *behaviours: Behaviour) -> None:
        """Answer the next requests with these behaviours, in order; then with the default again."""
        self._script.extend(behaviours)

    async def stop_listening(self) -> None:
        """Close the listener and every connection: connections to the port are refused from now on."""
        self.server.close()
        await self.server.wait_closed()
        await self._drop_connections()

    async def listen_again(self) -> None:
        self.server = await self._listen(self.port)

    async def stop(self) -> None:
        self.server.close()
        await self._drop_connections()
        await self.server.wait_closed()

    async def _drop_connections(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        index = self.connections
        self.connections += 1
        try:
            for number in range(10_000):  # bounded: no test sends that many requests on one connection
                arrival = await self._read_request(reader, index, number)
                if arrival is None:
                    return
                if not arrival.complete:
                    return  # the body broke off: never answered, never accepted
                behaviour = self._script.popleft() if self._script else self.default
                if not await behaviour(Exchange(arrival, reader, writer, self)):
                    return
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
            asyncio.CancelledError,
        ):
            # Cancelled by stop(): end quietly (a cancelled stream handler makes asyncio log an error on 3.11).
            return
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader, index: int, number: int) -> Arrival | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        line, *header_lines = head.decode("latin-1").split("\r\n")
        method, path, _version = line.split(" ", 2)
        headers: dict[str, str] = {}
        for h in header_lines:
            if h:
                name, _, value = h.partition(":")
                headers[name.strip().lower()] = value.strip()
        arrival = Arrival(method=method, path=path, headers=headers, connection=index, on_connection=number)
        self.arrivals.append(arrival)
        sha = hashlib.sha256()
        if "content-length" in headers:
            arrival.framing = "content-length"
            left = int(headers["content-length"])
            while left:
                data = await reader.read(min(left, _READ))
                if not data:
                    break
                sha.update(data)
                arrival.body_bytes += len(data)
                left -= len(data)
            arrival.complete = left == 0
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            arrival.framing = "chunked"
            arrival.complete = await self._read_chunked(reader, arrival, sha)
        else:
            arrival.complete = True
        arrival.sha256 = sha.hexdigest()
        return arrival

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader, arrival: Arrival, sha: Any) -> bool:
        """True only when the terminating zero-size chunk and the final CRLF arrived."""
        try:
            for _ in range(1 << 24):
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    return True
                left = size
                while left:
                    data = await reader.read(min(left, _READ))
                    if not data:
                        return False
                    sha.update(data)
                    arrival.body_bytes += len(data)
                    left -= len(data)
                if await reader.readexactly(2) != b"\r\n":
                    return False
        except asyncio.IncompleteReadError:
            return False
        return False
