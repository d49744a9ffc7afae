"""Framing an upstream cannot break: interim answers, framing headers named in Connection, endless trailers, an
oversized head that arrives whole, a large 401 body, a pooled connection left paused; and the caller's TRACE and
`Transfer-Encoding: gzip, chunked`. Each was reproduced against the proxy before its fix (issue 16, items 2, 4-8).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

import aiohttp
import pytest

from proxy.app import ProxyService
from tests.faults import upstreams as u
from tests.faults.test_upstream_faults import ROUTE, assert_json_error, call, errors, proxy_url, warm_pool
from tests.faults.upstreams import Behaviour, Exchange, FaultyUpstream
from tests.support.servers import ProxyFactory
from tests.support.session import new_key

__all__ = ["proxy", "up"]  # the fixtures, shared with test_upstream_faults
from tests.faults.test_upstream_faults import proxy, up


def keep_open(*parts: bytes) -> Behaviour:
    """Write these bytes verbatim and keep the connection open for the next request (as a keep-alive server)."""

    async def run(ex: Exchange) -> bool:
        for part in parts:
            ex.writer.write(part)
            await ex.writer.drain()
        return True

    return run


INJECTED = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 199 X\r\nContent-Length: %d\r\n\r\n" % len(INJECTED) + INJECTED,
        b"HTTP/1.1 100 Continue\r\nContent-Length: %d\r\n\r\n" % len(INJECTED) + INJECTED,
        b"HTTP/1.1 199 X\r\n\r\n",
        b"HTTP/1.1 000 X\r\n\r\n",
    ],
    ids=["unknown 1xx with a body", "100 with a body", "unknown 1xx", "status 000"],
)
async def test_an_interim_answer_that_cannot_be_framed_is_a_502_and_never_reaches_the_caller(
    proxy: ProxyService, up: FaultyUpstream, interim: bytes
) -> None:
    up.script(keep_open(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    answer = await call(proxy)
    assert b"EVIL" not in answer.body
    assert json.loads(answer.body)["error"] in (
        "upstream sent an interim answer with a body",
        "upstream sent an unknown 1xx",
        "upstream sent an invalid status",
    )
    assert answer.status == 502 and errors(proxy, "protocol") == 1
    # The connection that carried it is not reused: the next request gets a clean answer.
    assert (await call(proxy)).body == b"ok"


async def test_interim_answers_100_102_103_are_passed_over(proxy: ProxyService, up: FaultyUpstream) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: <a>\r\n\r\n"
    )
    up.script(keep_open(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"))
    answer = await call(proxy)
    assert (answer.status, answer.body) == (200, b"hi") and "Link" not in answer.headers


async def test_connection_naming_content_length_does_not_strip_the_framing(
    proxy: ProxyService, up: FaultyUpstream
) -> None:
    answer_bytes = b"HTTP/1.1 200 OK\r\nConnection: Content-Length, X-Hop\r\nX-Hop: 1\r\nContent-Length: 5\r\n\r\nhello"
    up.script(keep_open(answer_bytes), keep_open(answer_bytes))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.proxy_port)
    try:
        for _ in range(2):  # a keep-alive caller reads two answers: each must be framed
            writer.write(b"GET /score HTTP/1.1\r\nHost: a\r\n\r\n")
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().lower().split("\r\n")
                assert lines[0] == "http/1.1 200 ok"
                assert "content-length: 5" in lines and not any(x.startswith("x-hop") for x in lines)
                assert await reader.readexactly(5) == b"hello"
    finally:
        writer.close()


async def test_endless_trailers_are_cut_off_at_the_framing_bound(proxy: ProxyService, up: FaultyUpstream) -> None:
    written = 0

    async def endless(ex: Exchange) -> bool:
        nonlocal written
        ex.writer.write(u.response_head(200, {"Transfer-Encoding": "chunked"}) + u.chunk(b"hello") + b"0\r\nX-T: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(256):  # at most 16 MiB
                ex.writer.write(b"a" * 65536)
                await ex.writer.drain()
                written += 65536
                await asyncio.sleep(0)
        return False

    up.script(endless)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with client.get(proxy_url(proxy)) as resp:
                await resp.read()
    assert errors(proxy, "protocol") == 1
    assert written < 4 << 20, written  # the proxy hung up after about 64 KiB, not after the 16 MiB


async def test_a_head_over_the_bound_in_one_read_is_a_502(proxy: ProxyService, up: FaultyUpstream) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"a: b\r\n" * 13000 + b"Content-Length: 2\r\n\r\nok"  # 78 KB, 13,000 fields
    up.script(keep_open(head))
    answer = await call(proxy)
    assert_json_error(answer, 502, "upstream sent an oversized response head")


async def test_a_pooled_connection_whose_answer_came_while_reading_was_paused_is_read_again(
    proxy: ProxyService, up: FaultyUpstream
) -> None:
    await warm_pool(proxy, up)
    big = b"x" * 200_000  # over the 128 KiB that pauses reading, in one write: often one read, whole
    up.script(u.ok(big), u.ok(big), u.ok(b"after"))
    for expected in (big, big, b"after"):
        answer = await call(proxy)
        assert (answer.status, answer.body) == (200, expected)
        pool = proxy.routes[0].pool
        assert pool is not None
        for conn in pool._idle:
            assert conn.transport is not None and conn.transport.is_reading()
    assert {a.connection for a in up.arrivals} == {0}  # one connection throughout: it was reused, and answered


@pytest.fixture
async def two_keys(
    up: FaultyUpstream, make_proxy: ProxyFactory, key_dir: Callable[..., dict[str, str]]
) -> tuple[ProxyService, str, str]:
    primary, secondary = new_key("framing-primary"), new_key("framing-secondary")
    svc = await make_proxy(
        {
            "name": ROUTE,
            "upstream": up.url,
            "timeouts": {"connect": 1.0, "read": 1.0, "total": 10.0},
            "auth": key_dir(primary, secondary),
        }
    )
    return svc, primary, secondary


async def test_a_401_with_a_large_body_is_not_read_before_the_retry(
    two_keys: tuple[ProxyService, str, str], up: FaultyUpstream
) -> None:
    svc, _primary, secondary = two_keys

    async def big_401(ex: Exchange) -> bool:
        ex.writer.write(u.response_head(401, {"Content-Length": str(400 << 20)}) + b"n" * (1 << 20))
        await ex.writer.drain()
        await asyncio.sleep(3)  # the rest of the 400 MB never comes in time: reading it would wait for ever
        return False

    up.script(big_401, u.ok(b"second key"))
    answer = await call(svc, "POST", b"body")
    assert (answer.status, answer.body) == (200, b"second key")
    assert [a.headers["authorization"] for a in up.arrivals][-1] == f"Bearer {secondary}"


async def test_trace_and_a_transfer_coding_other_than_chunked_are_refused(
    proxy: ProxyService, up: FaultyUpstream
) -> None:
    cases = {
        b"TRACE /score HTTP/1.1\r\nHost: a\r\n\r\n": 405,
        b"TRACK /score HTTP/1.1\r\nHost: a\r\n\r\n": 400,  # not a method llhttp knows: refused as it parses
        b"POST /score HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n": 501,
    }
    for data, expected in cases.items():
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.proxy_port)
        writer.write(data)
        async with asyncio.timeout(5):
            answer = await reader.read(65536)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == str(expected).encode(), answer[:200]
        assert "request_id" in json.loads(body[: body.index(b"}") + 1])
    assert up.arrivals == []
