"""Property-based fuzzing (hypothesis): random methods, request targets, header sets and bodies, sent as raw bytes.

Every request either reaches the upstream intact (method, path, query, body and every end-to-end header
byte-identical and in order) or gets one of the documented 4xx answers as JSON with a request id. The proxy
never answers 5xx to a well-formed request and never logs an unhandled exception.

The proxy and the upstream run on their own event loop in a thread, so hypothesis drives plain sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from proxy.app import ProxyService
from proxy.config.reader import parse
from proxy.emulator.secretdir import write_secret_dir
from tests.support.logsetup import ErrorRecords
from tests.support.session import new_key

DOCUMENTED_4XX = {400, 404, 405, 413, 414, 431}
# Headers the proxy owns on the way up: the caller's are dropped or replaced (docs/security.md).
PROXY_OWNED = {"authorization", "x-request-id", "x-ms-client-request-id", "host", "content-length"}
HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "expect"}
TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Rig:
    """The running pair; a plain class so that hypothesis prints only its repr for a failing example."""

    def __init__(self) -> None:
        self.port = 0
        self.seen: list[dict[str, Any]] = []
        self.errors: list[logging.LogRecord] = []

    def __repr__(self) -> str:
        return f"Rig(port={self.port})"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig()
    key_root = tmp_path_factory.mktemp("fuzz") / "secret"
    write_secret_dir(key_root, {"primary": new_key("fuzz") + "\n"})
    started = threading.Event()
    stop: asyncio.Future[None] | None = None
    loop = asyncio.new_event_loop()

    async def record(request: web.BaseRequest) -> web.Response:
        rig.seen.append(
            {
                "method": request.method,
                "target": request.raw_path,
                "headers": [
                    (k.decode("latin-1"), "<credential>" if k.lower() == b"authorization" else v.decode("latin-1"))
                    for k, v in request.raw_headers
                ],
                "body": await request.read(),
            }
        )
        return web.Response(body=b"reached")

    async def main() -> None:
        nonlocal stop
        stop = loop.create_future()
        # A low-level server: no router, so no path is refused upstream (a router's .* does not match a decoded LF).
        runner = web.ServerRunner(web.Server(record, access_log=None))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        upstream_port = runner.addresses[0][1]
        doc = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "access_log": False,
            "limits": {"max_body_bytes": 4096},
            "routes": [
                {
                    "name": "fuzz",
                    "upstream": f"http://127.0.0.1:{upstream_port}",
                    "auth": {"type": "key", "primary_file": str(key_root / "primary")},
                }
            ],
        }
        service = ProxyService(parse(doc, {}), registry=CollectorRegistry())
        await service.start()
        rig.port = service.proxy_port
        started.set()
        await stop
        await service.stop()
        await runner.cleanup()

    handler = ErrorRecords(rig.errors)
    for name in ("aiohttp", "aml_auth_proxy", "asyncio"):
        logging.getLogger(name).addHandler(handler)
    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    yield rig
    assert stop is not None
    loop.call_soon_threadsafe(stop.set_result, None)
    thread.join(10)
    loop.close()
    for name in ("aiohttp", "aml_auth_proxy", "asyncio"):
        logging.getLogger(name).removeHandler(handler)


methods = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]),
    st.text(alphabet=TCHAR, min_size=1, max_size=12).map(str.upper),
)
path_chars = "abcXYZ019-._~!$&'()*+,;=:@/%"
paths = st.lists(
    st.one_of(
        st.text(alphabet=path_chars, min_size=0, max_size=12),
        st.sampled_from(["%2e%2e", "..", ".", "%2F", "%252F", "%00", "%0d%0a", "%zz", "ü", "//"]),
    ),
    max_size=5,
).map(lambda parts: "/score/" + "/".join(parts))
queries = st.one_of(st.just(""), st.text(alphabet="abc=&%20+;/?:@x019", max_size=20).map(lambda q: "?" + q))
header_names = st.one_of(
    st.text(alphabet=TCHAR, min_size=1, max_size=16),
    st.sampled_from(
        [
            "Authorization",
            "Proxy-Authorization",
            "Proxy-Foo",
            "X-Request-Id",
            "x-ms-client-request-id",
            "Keep-Alive",
            "TE",
            "Upgrade",
            "Connection",
            "Cookie",
            "Accept-Encoding",
            "Content-Type",
        ]
    ),
)
header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)


@st.composite
def header_sets(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Random headers; often a Connection header that names some of them (hop-by-hop for this hop only)."""
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=12))
    if headers and draw(st.booleans()):
        named = draw(st.lists(st.sampled_from([n for n, _ in headers]), min_size=1, max_size=3))
        headers.insert(draw(st.integers(0, len(headers))), ("Connection", ", ".join(named)))
    return headers


bodies = st.binary(max_size=6000)


def send(port: int, data: bytes, head_only: bool) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {buf!r}"
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        length = 0 if head_only else int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside the answer body"
            rest += chunk
        return int(lines[0].split(" ")[1]), headers, rest[:length]


def expected_end_to_end(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    names = {n.lower() for n in HOP_BY_HOP}
    for name, value in headers:
        if name.lower() == "connection":
            names |= {t.strip().lower() for t in value.split(",") if t.strip()}
    return [
        (n, v)
        for n, v in headers
        if n.lower() not in names and not n.lower().startswith("proxy-") and n.lower() not in PROXY_OWNED
    ]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=methods, path=paths, query=queries, headers=header_sets(), body=bodies)
def test_random_requests_reach_the_upstream_intact_or_get_a_documented_4xx(
    rig: Rig, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes
) -> None:
    target = path + query
    head = f"{method} {target} HTTP/1.1\r\nHost: fuzz\r\n"
    for name, value in headers:
        if name.lower() in ("content-length", "transfer-encoding", "host", "expect"):
            continue  # framing is fuzzed by the smuggling tests; here each request is well framed
        head += f"{name}: {value}\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    sent = [(n, v) for n, v in (line.split(": ", 1) for line in head.split("\r\n")[2:-2])]
    before = len(rig.seen)
    status, answer_headers, answer = send(rig.port, head.encode("utf-8") + body, head_only=method == "HEAD")
    assert not rig.errors, [r.getMessage() for r in rig.errors]
    if len(rig.seen) == before:
        event(f"refused {status}")
        assert status in DOCUMENTED_4XX, (status, answer)
        if method != "HEAD":
            document = json.loads(answer)
            assert document["request_id"] and answer_headers["x-request-id"] == document["request_id"]
        return
    event("forwarded")
    assert status == 200, (status, answer)
    got = rig.seen[-1]
    assert got["method"] == method
    assert got["target"] == target  # byte for byte, a bare '?' included
    assert got["body"] == body
    upstream_end_to_end = [(n, v) for n, v in got["headers"] if n.lower() not in PROXY_OWNED]
    assert upstream_end_to_end == expected_end_to_end(sent)
