"""Every request the proxy refuses itself leaves one INFO line with the reason and the request id of its answer;
a body broken mid-upload is logged and answered under the request's own id; a chunked upload's access line
counts its bytes (issue 16, item 13)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from tests.support.servers import ProxyFactory
from tests.support.session import new_key


@pytest.fixture
async def svc(serve: Callable[..., Awaitable[str]], make_proxy: ProxyFactory, key_dir: Any) -> Any:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_route("*", "/{t:.*}", echo)
    upstream = await serve(app)
    return await make_proxy({"name": "logged", "match": "/score", "upstream": upstream, "auth": key_dir(new_key("l"))})


async def raw(port: int, data: bytes, *, close_after: bool = False) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
            body = await reader.readexactly(int(headers["content-length"]))
        return int(lines[0].split(" ")[1]), headers, body
    finally:
        writer.close()


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [
        {"level": r.levelname, **r.fields}  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "event", None) == name
    ]


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"GET http://example.com/score HTTP/1.1\r\nHost: a\r\n\r\n", 400, "absolute_form"),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405, "connect"),
        (b"TRACE /score HTTP/1.1\r\nHost: a\r\n\r\n", 405, "trace"),
        (b"GET /score/../x HTTP/1.1\r\nHost: a\r\n\r\n", 400, "dot_segment"),
        (b"GET /elsewhere HTTP/1.1\r\nHost: a\r\n\r\n", 404, "no_route"),
    ],
    ids=["absolute-form", "CONNECT", "TRACE", "dot segment", "no route"],
)
async def test_every_refusal_leaves_one_info_line_with_its_reason_and_request_id(
    svc: Any, caplog: pytest.LogCaptureFixture, data: bytes, status: int, reason: str
) -> None:
    caplog.set_level(logging.INFO, logger="aml_auth_proxy")
    got, headers, body = await raw(svc.proxy_port, data)
    assert got == status
    rid = json.loads(body)["request_id"]
    assert headers["x-request-id"] == rid
    (line,) = events(caplog, "request_refused")
    assert line["level"] == "INFO" and line["reason"] == reason and line["status"] == status
    assert line["request_id"] == rid
    assert b"example.com" not in json.dumps(line).encode() and "/../" not in json.dumps(line)


async def test_a_body_broken_mid_upload_is_logged_and_answered_under_the_request_id(
    svc: Any, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="aml_auth_proxy")
    head = b"POST /score HTTP/1.1\r\nHost: a\r\nx-ms-client-request-id: broken-1\r\nTransfer-Encoding: chunked\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.proxy_port)
    writer.write(head + b"5\r\nhello\r\n")
    await asyncio.sleep(0.2)  # the request is on its way upstream when its framing breaks
    writer.write(b"zz\r\nbad\r\n")
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["request_id"] == "broken-1"
    (line,) = events(caplog, "bad_request")
    assert line["request_id"] == "broken-1"
    await asyncio.sleep(0.3)  # the access log is written in batches
    access = [json.loads(x) for x in capsys.readouterr().out.splitlines() if '"access"' in x]
    assert [a["request_id"] for a in access] == ["broken-1"]


async def test_a_chunked_upload_counts_its_bytes_in_the_access_line(
    svc: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = (
        b"POST /score HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    status, _headers, body = await raw(svc.proxy_port, data)
    assert (status, body) == (200, b"hello world")
    await asyncio.sleep(0.3)
    (access,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if '"access"' in x]
    assert access["bytes_in"] == 11 and access["bytes_out"] == 11
