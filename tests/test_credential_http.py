"""The control-plane client (proxy/credentials/http.py) on the proxy's own HTTP/1.1 client: what it sends, what it
keeps across calls, and how it classifies answers it must not trust."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from proxy import __version__
from proxy.credentials.http import MAX_ANSWER_BYTES, CredentialHttp
from proxy.credentials.tokens import PermanentError, TransientError

Serve = Callable[..., Awaitable[str]]


async def test_a_call_sends_json_with_its_framing_and_reuses_the_connection(serve: Serve) -> None:
    seen: list[dict[str, Any]] = []
    peers: set[Any] = set()

    async def token(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        seen.append({"headers": dict(request.headers), "body": await request.read(), "path": request.path_qs})
        return web.json_response({"accessToken": "t", "expiryOn": 1}, headers={"Date": "Tue, 24 Nov 2026 07:00:00 GMT"})

    app = web.Application()
    app.router.add_post("/tok", token)
    base = await serve(app)
    http = CredentialHttp(what="AML token endpoint", ca_file=None, timeout=5)
    try:
        first = await http.request("POST", base + "/tok?api-version=1", headers={"Authorization": "Bearer e"})
        second = await http.request("POST", base + "/tok", json_body={"a": 1})
        assert second.status == 200
    finally:
        await http.close()
    assert first.status == 200 and first.body == {"accessToken": "t", "expiryOn": 1}
    assert first.server_now == 1795503601.0  # the end of the second the Date header names
    assert seen[0]["path"] == "/tok?api-version=1" and seen[0]["body"] == b""
    assert seen[0]["headers"]["Content-Length"] == "0"  # a POST without a body, as the SDKs send it
    assert seen[0]["headers"]["Authorization"] == "Bearer e"
    assert seen[0]["headers"]["User-Agent"] == f"aml-auth-proxy/{__version__}"
    assert seen[0]["headers"]["Host"] == base.removeprefix("http://")
    assert seen[1]["body"] == b'{"a": 1}' and seen[1]["headers"]["Content-Type"] == "application/json; charset=utf-8"
    assert len(peers) == 1  # one keep-alive connection for both calls


async def test_an_endless_answer_is_cut_and_transient_and_a_non_http_url_is_permanent(serve: Serve) -> None:
    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"x" * 65536
        for _ in range(MAX_ANSWER_BYTES // len(chunk) + 4):
            await response.write(chunk)
        return response

    app = web.Application()
    app.router.add_get("/huge", huge)
    base = await serve(app)
    http = CredentialHttp(what="ML Server login", ca_file=None, timeout=5)
    try:
        with pytest.raises(TransientError, match=r"^ML Server login: the answer is larger than a credential answer"):
            await http.request("GET", base + "/huge")
        with pytest.raises(PermanentError, match=r"^ML Server login: not an http\(s\) URL$"):
            await http.request("GET", "ftp://127.0.0.1/x")
    finally:
        await http.close()


async def test_a_server_that_never_answers_times_out_within_the_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # takes the request, never answers, until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    http = CredentialHttp(what="AML keys", ca_file=None, timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(TransientError, match=r"^AML keys: timed out$"):
            await http.request("GET", f"http://127.0.0.1:{port}/hang")
    finally:
        await http.close()
        server.close()
        await server.wait_closed()
    assert loop.time() - started < 5
