"""Request smuggling and malformed HTTP, sent with raw sockets: each is refused with a JSON 400 and a request
id, the connection is closed, nothing reaches the upstream, and the log has one line without a traceback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from tests.support.servers import ProxyFactory
from tests.support.session import LOG_DIR, new_key
from tests.support.wire import exchange

HOSTILE = {
    "content-length with transfer-encoding": (
        b"POST /score HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "duplicate content-length, different": (
        b"POST /score HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    ),
    "duplicate content-length, same": (
        b"POST /score HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    ),
    "obsolete line folding": b"GET /score HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
    "bare LF line endings": b"GET /score HTTP/1.1\nHost: a\nX-A: b\n\n",
    "bare CR in a header": b"GET /score HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n",
    "NUL in a header": b"GET /score HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n",
    "invalid chunk size": (
        b"POST /score HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    ),
    "obfuscated transfer-encoding": b"POST /score HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
    "chunked not last": (b"POST /score HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
    "space before the colon": b"GET /score HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "negative content-length": b"POST /score HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\nhello",
    "missing Host in HTTP/1.1": b"GET /score HTTP/1.1\r\nX-A: b\r\n\r\n",
    "duplicate Host": b"GET /score HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "chunked body with Upgrade": (
        b"POST /score HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "HTTP/2.0 request line": b"GET /score HTTP/2.0\r\nHost: a\r\n\r\n",
}


@pytest.fixture
async def guarded(serve: Callable[..., Awaitable[str]], make_proxy: ProxyFactory, key_dir: Any) -> Any:
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.method)
        await request.read()
        return web.Response(text="reached")

    app = web.Application()
    app.router.add_route("*", "/{t:.*}", record)
    upstream = await serve(app)
    svc = await make_proxy({"name": "guarded", "upstream": upstream, "auth": key_dir(new_key("abuse"))})
    svc.seen = seen
    return svc


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_malformed_or_smuggling_requests_get_a_json_400_and_never_reach_the_upstream(
    guarded: Any, case: str
) -> None:
    answer = await exchange(guarded.proxy_port, HOSTILE[case])  # the proxy closes after the 400
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"400", (case, answer[:200])
    # (reading to EOF above shows the proxy closed the connection)
    document = json.loads(body)
    assert document["error"].startswith("bad request: ") and document["route"] is None
    assert f"x-request-id: {document['request_id']}".encode() in head.lower()
    await asyncio.sleep(0.05)
    assert guarded.seen == []
    bad = guarded.metrics.registry.get_sample_value("aml_auth_proxy_rejected_requests_total", {"reason": "bad_http"})
    assert bad == 1
    lines = [json.loads(x) for x in (LOG_DIR / "in-process.log").read_text().splitlines()]
    mine = [x for x in lines if x.get("request_id") == document["request_id"]]
    assert [x["event"] for x in mine] == ["bad_request"] and "traceback" not in mine[0]
    assert not any(x.get("logger") == "aiohttp.server" and "traceback" in x for x in lines[-20:])


async def test_a_well_formed_request_on_the_same_proxy_still_reaches_the_upstream(guarded: Any) -> None:
    answer = await exchange(
        guarded.proxy_port, b"POST /score HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    )
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"reached")
    assert guarded.seen == ["POST"]
