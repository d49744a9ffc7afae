"""Pipelined requests cut at random places: whatever the split, every request reaches the upstream whole and every
answer comes back in order on the one connection.

The proxy port's server feeds llhttp in pieces of its own choosing (a head, and a chunked body's framing, only up
to what they may hold; the body of an Upgrade request past llhttp), so the byte boundaries the caller picks must
never matter. Small header limits make those bounds cut chunked bodies many times. Seeded and bounded: 40 rounds.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from tests.support.servers import ProxyFactory
from tests.support.session import new_key

ROUNDS = 40


@pytest.fixture
async def rig(serve: Callable[..., Awaitable[str]], make_proxy: ProxyFactory, key_dir: Any) -> Any:
    seen: list[tuple[str, bytes]] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.path, body))
        return web.Response(text=f"{request.method} {request.path} {len(body)}")

    app = web.Application(client_max_size=1 << 24)
    app.router.add_route("*", "/{t:.*}", record)
    route = {"name": "frag", "upstream": await serve(app), "auth": key_dir(new_key("frag"))}
    svc = await make_proxy(route, limits={"max_header_bytes": 1024, "max_body_bytes": 1 << 20})
    svc.seen = seen
    return svc


def chunked(body: bytes, rng: random.Random) -> bytes:
    out = bytearray()
    at = 0
    while at < len(body):
        size = rng.randint(1, 9000)
        piece = body[at : at + size]
        out += b"%x;ext=%d\r\n%s\r\n" % (len(piece), rng.randint(0, 9), piece)
        at += len(piece)
    trailer = b"X-Trailer: t\r\n" if rng.random() < 0.5 else b""
    return bytes(out) + b"0\r\n" + trailer + b"\r\n"


def one_request(i: int, rng: random.Random) -> tuple[bytes, str, bytes]:
    """(wire bytes, path, body) of one random request."""
    kind = rng.choice(["get", "length", "chunked", "upgrade"])
    path = f"/{kind}/{i}"
    head = f"Host: a\r\nX-N: {i}\r\n".encode()
    if kind == "get":
        return b"GET %s HTTP/1.1\r\n%s\r\n" % (path.encode(), head), path, b""
    body = rng.randbytes(rng.choice([0, 1, 100, 5000, 30000, 70000]))
    if kind == "chunked":
        wire = b"POST %s HTTP/1.1\r\n%sTransfer-Encoding: chunked\r\n\r\n" % (path.encode(), head)
        return wire + chunked(body, rng), path, body
    extra = b"Connection: Upgrade\r\nUpgrade: h2c\r\n" if kind == "upgrade" else b""
    wire = b"POST %s HTTP/1.1\r\n%s%sContent-Length: %d\r\n\r\n" % (path.encode(), head, extra, len(body))
    return wire + body, path, body


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    assert head.startswith(b"HTTP/1.1 200 "), head
    return await reader.readexactly(length)


async def read_answers(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    return [await read_answer(reader) for _ in range(count)]


@pytest.mark.parametrize("seed", range(ROUNDS))
async def test_pipelined_requests_split_anywhere_arrive_whole_and_in_order(rig: Any, seed: int) -> None:
    rng = random.Random(seed)
    requests = [one_request(i, rng) for i in range(rng.randint(1, 5))]
    stream = b"".join(wire for wire, _, _ in requests)
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 30))))
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy_port)
    try:
        async with asyncio.timeout(20):
            answers = asyncio.create_task(read_answers(reader, len(requests)))
            for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
                writer.write(stream[start:end])
                await writer.drain()
                await asyncio.sleep(0)
            got = await answers
    finally:
        writer.close()
    expected = [
        f"{'GET' if path.startswith('/get') else 'POST'} {path} {len(body)}".encode() for _, path, body in requests
    ]
    assert got == expected
    assert rig.seen == [(path, body) for _, path, body in requests]
