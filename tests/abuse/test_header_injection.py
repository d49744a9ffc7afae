"""Header injection: CR, LF or NUL in anything that flows into an upstream header (config values, key files,
fetched tokens) or back to the caller (upstream answers) is refused, never passed on. A key file's trailing
newline is trimmed, not sent. (Tokens with control characters: tests/test_refresher.py. A bare LF in an upstream
answer is a line end that HTTP/1.1 lets a recipient accept, so it ends a header rather than hiding one.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config.reader import parse
from proxy.config.settings import ConfigError
from tests.support.servers import ProxyFactory
from tests.support.session import new_key, remember

INJECTED = "X-Injected"


@pytest.fixture
async def recorder(serve: Callable[..., Awaitable[str]]) -> tuple[str, list[list[tuple[bytes, bytes]]]]:
    """An upstream that records the raw header lines of each request."""
    seen: list[list[tuple[bytes, bytes]]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(list(request.raw_headers))
        return web.Response(text="reached")

    app = web.Application()
    app.router.add_route("*", "/{t:.*}", record)
    return await serve(app), seen


async def call(port: int, path: str = "/score") -> tuple[int, str]:
    async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.text()


def raw_value(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name.lower()]


async def test_a_key_files_trailing_newline_is_trimmed_not_sent(
    recorder: Any, make_proxy: ProxyFactory, key_dir: Any
) -> None:
    upstream, seen = recorder
    key = new_key("nl")
    svc = await make_proxy({"name": "nl", "upstream": upstream, "auth": key_dir(key, trailing_newline=True)})
    assert await call(svc.proxy_port) == (200, "reached")
    assert raw_value(seen[0], b"Authorization") == [f"Bearer {key}".encode()]


@pytest.mark.parametrize("tail", ["\r\nX-Injected: yes", "\nX-Injected: yes", "\x00X-Injected: yes", "\rX"])
async def test_a_key_file_with_control_characters_is_refused_and_nothing_is_injected(
    recorder: Any, make_proxy: ProxyFactory, key_dir: Any, tail: str
) -> None:
    upstream, seen = recorder
    key = new_key("inj")
    remember(key + tail)
    svc = await make_proxy({"name": "inj", "upstream": upstream, "auth": key_dir(key + tail)})
    status, body = await call(svc.proxy_port)
    assert status == 503 and "contains control characters" in body
    assert seen == []


async def test_a_bad_secondary_key_leaves_the_primary_in_use_and_injects_nothing(
    recorder: Any, make_proxy: ProxyFactory, key_dir: Any
) -> None:
    upstream, seen = recorder
    primary, secondary = new_key("good"), new_key("bad")
    remember(secondary + "\r\nX-Injected: yes")
    svc = await make_proxy(
        {"name": "half", "upstream": upstream, "auth": key_dir(primary, secondary + "\r\nX-Injected: yes")}
    )
    assert await call(svc.proxy_port) == (200, "reached")
    assert raw_value(seen[0], b"Authorization") == [f"Bearer {primary}".encode()]
    assert not any(raw_value(h, INJECTED.encode()) for h in seen)


ROUTE = {"name": "r", "upstream": "http://127.0.0.1:9", "auth": {"type": "key", "primary_file": "/k"}}


@pytest.mark.parametrize(
    ("key", "patch"),
    [
        ("routes[0].auth.template", {"auth": {**ROUTE["auth"], "template": "Bearer {key}\r\nX-Injected: yes"}}),
        ("routes[0].auth.template", {"auth": {**ROUTE["auth"], "template": "Bearer {key}\x00"}}),
        ("routes[0].auth.header", {"auth": {**ROUTE["auth"], "header": "X-Key\r\nX-Injected"}}),
        ("routes[0].auth.header", {"auth": {**ROUTE["auth"], "header": "X Key"}}),
        ("routes[0].deployment", {"deployment": "blue\nX-Injected: yes"}),
        ("routes[0].upstream", {"upstream": "http://127.0.0.1:9/\r\nX-Injected: yes"}),
    ],
)
def test_config_values_that_would_inject_a_header_are_refused_naming_the_key(key: str, patch: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"routes": [{**ROUTE, **patch}]}, {})
    assert any(line.startswith(key + ":") for line in caught.value.problems), caught.value.problems


@pytest.fixture
async def bad_answer() -> AsyncIterator[Callable[[bytes], Awaitable[str]]]:
    """A raw upstream that answers every request with the given bytes."""
    servers: list[asyncio.Server] = []

    async def start(answer: bytes) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\rX-Injected: yes\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\x00X-Injected: yes\r\n\r\nok",
    ],
    ids=["bare CR", "NUL"],
)
async def test_an_upstream_answer_with_control_characters_in_a_header_becomes_a_502(
    bad_answer: Any, make_proxy: ProxyFactory, key_dir: Any, answer: bytes
) -> None:
    upstream = await bad_answer(answer)
    svc = await make_proxy({"name": "ans", "upstream": upstream, "auth": key_dir(new_key("ans"))})
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{svc.proxy_port}/score") as resp,
    ):
        assert resp.status == 502
        assert INJECTED not in resp.headers
        assert (await resp.json())["error"] == "upstream sent an invalid response"
