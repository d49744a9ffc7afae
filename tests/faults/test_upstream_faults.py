"""Upstream faults against the in-process proxy: a raw-TCP upstream (tests/faults/upstreams.py) refuses, resets,
stalls, trickles, sends invalid HTTP, answers 5xx and drops keep-alive connections.

Before the answer starts the caller gets the proxy's JSON 502/504 with a reason and its request id; after it
started the caller's connection is cut, never a truncated body presented as complete. Each fault is counted in
aml_auth_proxy_upstream_errors_total, a POST is never resent except once after a 401, and afterwards the same
route (same pool, at most 4 connections, so a leaked connection shows) serves normal requests again.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from proxy.app import ProxyService
from tests.faults import upstreams as u
from tests.faults.upstreams import FaultyUpstream
from tests.support.servers import ProxyFactory
from tests.support.session import new_key

ROUTE = "faulty"
READ_TIMEOUT = 0.3
_ids = itertools.count()


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    rid: str


@pytest.fixture
async def up() -> AsyncIterator[FaultyUpstream]:
    upstream = await FaultyUpstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def proxy(up: FaultyUpstream, make_proxy: ProxyFactory, key_dir: Callable[..., dict[str, str]]) -> ProxyService:
    return await make_proxy(
        {
            "name": ROUTE,
            "upstream": up.url,
            "timeouts": {"connect": 1.0, "read": READ_TIMEOUT, "total": 10.0},
            "pool": {"max_connections": 4, "keepalive_seconds": 30},
            "auth": key_dir(new_key("fault-primary"), new_key("fault-secondary")),
        }
    )


def proxy_url(svc: ProxyService, path: str = "/score") -> str:
    return f"http://127.0.0.1:{svc.proxy_port}{path}"


async def call(svc: ProxyService, method: str = "GET", data: bytes | None = None, *, path: str = "/score") -> Answer:
    """One request through the proxy on a fresh client connection, with a request id of our own."""
    rid = f"fault-{next(_ids)}"
    timeout = aiohttp.ClientTimeout(total=5)
    headers = {"x-ms-client-request-id": rid}
    async with (
        aiohttp.ClientSession(timeout=timeout) as client,
        client.request(method, proxy_url(svc, path), data=data, headers=headers) as resp,
    ):
        return Answer(resp.status, resp.headers, await resp.read(), rid)


async def call_cut(svc: ProxyService) -> tuple[int, bytes]:
    """A GET whose answer must start and then be cut: returns the status and what arrived before the cut."""
    got = bytearray()
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with client.get(proxy_url(svc)) as resp:
                status = resp.status
                async for part in resp.content.iter_any():
                    got += part
    return status, bytes(got)


def errors(svc: ProxyService, kind: str) -> float:
    value = svc.metrics.registry.get_sample_value(
        "aml_auth_proxy_upstream_errors_total", {"route": ROUTE, "kind": kind}
    )
    return 0.0 if value is None else value


def all_errors(svc: ProxyService) -> dict[str, float]:
    return {k: errors(svc, k) for k in ("timeout", "connect", "tls", "reset", "protocol") if errors(svc, k)}


def assert_json_error(answer: Answer, status: int, reason: str) -> None:
    assert answer.status == status, answer
    assert answer.headers["Content-Type"] == "application/json"
    assert json.loads(answer.body) == {"error": reason, "route": ROUTE, "request_id": answer.rid}
    assert answer.headers["x-request-id"] == answer.rid


async def warm_pool(svc: ProxyService, up: FaultyUpstream) -> None:
    """One answered request first: the next request finds an idle pooled connection, so the proxy sends it at once
    and answers from the upstream connection's callback (the request path without a task). The warm-up's
    arrival is forgotten."""
    assert (await call(svc)).status == 200
    assert svc.routes[0].pool is not None and svc.routes[0].pool.idle == 1
    up.arrivals.clear()


@pytest.fixture(params=[False, True], ids=["new connection", "pooled connection"])
async def pooled(request: pytest.FixtureRequest, up: FaultyUpstream, proxy: ProxyService) -> bool:
    """A test that asks for it runs twice: its request goes out on a new upstream connection, and on a pooled one
    (`warm_pool` first). True for the pooled run."""
    if request.param:
        await warm_pool(proxy, up)
    return bool(request.param)


async def assert_recovers(svc: ProxyService, up: FaultyUpstream) -> None:
    """Once the upstream answers normally again (its default answer `ok`, as it starts), normal requests through the
    same route and pool succeed again, GETs and a POST, more than the pool holds."""
    up.default = u.ok()
    before = len(up.arrivals)
    answers = await asyncio.gather(*(call(svc) for _ in range(6)), call(svc, "POST", b"after the fault"))
    assert [(a.status, a.body) for a in answers] == [(200, b"ok")] * 7
    assert len(up.arrivals) == before + 7


# ---- before the answer started: JSON 502/504 --------------------------------------------------------------------


async def test_connection_refused_gives_json_502_and_the_route_recovers(
    up: FaultyUpstream, proxy: ProxyService
) -> None:
    assert (await call(proxy)).status == 200  # a pooled connection exists, then the upstream goes away
    await up.stop_listening()
    for _ in range(2):
        assert_json_error(await call(proxy), 502, "upstream connection failed")
    assert all_errors(proxy) == {"connect": 2}
    await up.listen_again()
    await assert_recovers(proxy, up)


async def test_stall_before_the_headers_gives_json_504(up: FaultyUpstream, proxy: ProxyService, pooled: bool) -> None:
    up.script(u.stall_before_headers(2.0))
    assert_json_error(await call(proxy), 504, "upstream timed out")
    assert all_errors(proxy) == {"timeout": 1}
    await assert_recovers(proxy, up)


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("garbage status line", b"HTTP/1.1 abc nonsense\r\n\r\n"),
        ("not http at all", b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
        ("header without a colon", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nno colon here\r\n\r\nok"),
        ("invalid content-length", b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nok"),
        ("nul in a header", b"HTTP/1.1 200 OK\r\nX-A: b\x00c\r\nContent-Length: 2\r\n\r\nok"),
    ],
)
async def test_malformed_response_head_gives_json_502(
    up: FaultyUpstream, proxy: ProxyService, name: str, answer: bytes, pooled: bool
) -> None:
    up.script(u.raw(answer))
    assert_json_error(await call(proxy), 502, "upstream sent an invalid response")
    assert all_errors(proxy) == {"protocol": 1}, name
    await assert_recovers(proxy, up)


# ---- after the answer started: the caller's connection is cut ---------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
async def test_reset_mid_response_cuts_the_callers_connection(
    up: FaultyUpstream, proxy: ProxyService, chunked: bool, pooled: bool
) -> None:
    up.script(u.reset_mid_body(chunked=chunked, sent=4096))
    status, got = await call_cut(proxy)
    assert status == 200 and len(got) <= 4096 + 100
    assert all_errors(proxy) == {"reset": 1}
    await assert_recovers(proxy, up)


async def test_stall_after_the_headers_cuts_the_callers_connection_as_a_timeout(
    up: FaultyUpstream, proxy: ProxyService, pooled: bool
) -> None:
    up.script(u.stall_after_headers(2.0, first=b"first part"))
    status, got = await call_cut(proxy)
    assert (status, got) == (200, b"first part")
    assert all_errors(proxy) == {"timeout": 1}
    await assert_recovers(proxy, up)


async def test_trickle_slower_than_the_read_timeout_is_cut_as_a_timeout(
    up: FaultyUpstream, proxy: ProxyService
) -> None:
    up.script(u.trickle([b"a", b"b", b"c", b"d"], interval=READ_TIMEOUT * 2))
    status, got = await call_cut(proxy)
    assert (status, got) == (200, b"")  # the first gap is already too long
    assert all_errors(proxy) == {"timeout": 1}
    await assert_recovers(proxy, up)


async def test_trickle_within_the_read_timeout_is_delivered_intact(up: FaultyUpstream, proxy: ProxyService) -> None:
    parts = [bytes([65 + i]) * (1000 + i) for i in range(12)]  # 12 gaps of 0.1 s: 1.2 s, four read timeouts
    up.script(u.trickle(parts, interval=READ_TIMEOUT / 3))
    answer = await call(proxy)
    assert answer.status == 200
    assert hashlib.sha256(answer.body).hexdigest() == hashlib.sha256(b"".join(parts)).hexdigest()
    assert all_errors(proxy) == {}
    await assert_recovers(proxy, up)


async def test_bad_chunked_encoding_cuts_the_callers_connection(up: FaultyUpstream, proxy: ProxyService) -> None:
    head = u.response_head(200, {"Transfer-Encoding": "chunked"})
    up.script(u.raw(head + u.chunk(b"a" * 1000), b"zz\r\nnot a chunk size\r\n0\r\n\r\n"))
    status, got = await call_cut(proxy)
    assert (status, got) == (200, b"a" * 1000)
    assert sum(all_errors(proxy).values()) == 1 and set(all_errors(proxy)) <= {"protocol", "reset"}
    await assert_recovers(proxy, up)


# ---- answers that are not failures, and what is never resent ----------------------------------------------------


async def test_5xx_burst_is_passed_through_with_its_body_and_never_retried(
    up: FaultyUpstream, proxy: ProxyService
) -> None:
    bodies = [json.dumps({"message": f"overloaded {i}"}).encode() for i in range(20)]
    up.script(*(u.status(500 if i % 2 else 503, body) for i, body in enumerate(bodies)))
    answers = [await call(proxy, "POST" if i % 3 else "GET", b"x" * i) for i in range(20)]
    assert [(a.status, a.body) for a in answers] == [(500 if i % 2 else 503, b) for i, b in enumerate(bodies)]
    assert len(up.arrivals) == 20  # one arrival per request: no retry, GET or POST
    assert all_errors(proxy) == {}  # a 5xx is an answer, not an upstream failure
    await assert_recovers(proxy, up)


async def test_post_is_not_resent_after_the_upstream_read_its_body_and_reset(
    up: FaultyUpstream, proxy: ProxyService, pooled: bool
) -> None:
    body = b"charge the card once" * 100
    up.script(u.reset_now())
    assert_json_error(await call(proxy, "POST", body), 502, "upstream closed the connection")
    (arrival,) = up.arrivals
    assert (arrival.method, arrival.body_bytes, arrival.complete) == ("POST", len(body), True)
    assert all_errors(proxy) == {"reset": 1}
    await assert_recovers(proxy, up)


async def test_post_is_resent_once_after_a_401_and_never_again(
    up: FaultyUpstream, proxy: ProxyService, pooled: bool
) -> None:
    up.script(u.status(401, b'{"message": "key expired"}'), u.reset_now())
    assert_json_error(await call(proxy, "POST", b"score me"), 502, "upstream closed the connection")
    assert [(a.method, a.body_bytes) for a in up.arrivals] == [("POST", 8), ("POST", 8)]
    auth = [a.headers["authorization"] for a in up.arrivals]
    assert auth[0] != auth[1]  # the documented retry, with the other key
    assert all_errors(proxy) == {"reset": 1}
    await assert_recovers(proxy, up)


async def test_every_401_and_403_the_upstream_sends_is_counted_once(
    up: FaultyUpstream, proxy: ProxyService, pooled: bool
) -> None:
    """The first answer (on a pooled connection it is answered from the connection's callback, on a new one in a
    task) and the retry with the other key after a 401 are each counted as they arrive."""

    def failures(code: str) -> float:
        value = proxy.metrics.registry.get_sample_value(
            "aml_auth_proxy_upstream_auth_failures_total", {"route": ROUTE, "code": code}
        )
        return value or 0.0

    up.script(u.status(401, b'{"message": "key expired"}'), u.status(401, b'{"message": "key expired"}'))
    assert (await call(proxy, "POST", b"score me")).status == 401
    assert (failures("401"), failures("403")) == (2.0, 0.0)
    if pooled:
        await warm_pool(proxy, up)
    up.script(u.status(403, b'{"message": "not allowed"}'))
    assert (await call(proxy)).status == 403
    assert (failures("401"), failures("403")) == (2.0, 1.0)
    await assert_recovers(proxy, up)


# ---- keep-alive connections the upstream closes -----------------------------------------------------------------


async def test_upstream_closing_after_each_response_without_connection_close_fails_nothing(
    up: FaultyUpstream, proxy: ProxyService
) -> None:
    up.default = u.close_after_response()
    methods = ["GET", "POST", "PUT", "DELETE"] * 5
    answers = [await call(proxy, m, b"body" if m in ("POST", "PUT") else None) for m in methods]
    assert [a.status for a in answers] == [200] * 20
    assert [a.method for a in up.arrivals] == methods  # each exactly once
    assert up.connections == 20 and all_errors(proxy) == {}
    await assert_recovers(proxy, up)


async def test_get_on_a_reused_connection_the_upstream_just_closed_succeeds(
    up: FaultyUpstream, proxy: ProxyService
) -> None:
    up.default = u.close_when_idle(2.0)
    answers = [await call(proxy) for _ in range(5)]
    assert [a.status for a in answers] == [200] * 5
    # Requests 2..5 each met a pooled connection the upstream closed as they arrived, and were resent on a new one.
    assert up.dropped == 4 and len(up.arrivals) == 5
    assert all_errors(proxy) == {}
    await assert_recovers(proxy, up)


async def test_post_on_a_reused_connection_the_upstream_just_closed_is_not_resent(
    up: FaultyUpstream, proxy: ProxyService
) -> None:
    up.default = u.close_when_idle(2.0)
    assert (await call(proxy, "POST", b"first")).status == 200
    assert_json_error(await call(proxy, "POST", b"second"), 502, "upstream closed the connection")
    assert [a.body_bytes for a in up.arrivals] == [5] and up.dropped == 1
    assert all_errors(proxy) == {"reset": 1}
    await assert_recovers(proxy, up)
