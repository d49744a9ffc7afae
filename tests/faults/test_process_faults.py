"""Process faults: SIGTERM to the `aml-auth-proxy` console script (tests/procs.py) while work is in flight.

tests/test_e2e.py already covers SIGTERM with 50 slow GETs, requests past the grace period, a 1 GiB upload
without a signal, and a caller that breaks off its upload. What it does not cover, and this file does: SIGTERM in
the middle of a 1 GiB upload, with a Content-Length and chunked, once with a grace period long enough to finish and
once too short; and 500 requests in flight at SIGTERM.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults import upstreams as u
from tests.faults.upstreams import FaultyUpstream
from tests.support.procs import ProxyProcess
from tests.support.session import new_key

GIB = 1 << 30
BLOCK = bytes(range(256)) * 4096  # 1 MiB
SIGNAL_AT = 128  # MiB sent when SIGTERM goes out


@functools.cache
def gib_sha256() -> str:
    digest = hashlib.sha256()
    for _ in range(GIB // len(BLOCK)):
        digest.update(BLOCK)
    return digest.hexdigest()


@pytest.fixture
async def up() -> AsyncIterator[FaultyUpstream]:
    upstream = await FaultyUpstream.start()
    yield upstream
    await upstream.stop()


async def start_proxy(
    up: FaultyUpstream, tmp_path: Path, key_dir: Callable[..., dict[str, str]], *, grace: float, **route: Any
) -> ProxyProcess:
    return await ProxyProcess.start(
        {
            "shutdown_grace_seconds": grace,
            "routes": [{"name": "p", "upstream": up.url, "auth": key_dir(new_key("process-fault")), **route}],
        },
        tmp_path,
    )


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("grace", [20.0, 0.5], ids=["grace-long-enough", "grace-too-short"])
async def test_sigterm_during_a_1_gib_upload_never_passes_on_a_truncated_body(
    up: FaultyUpstream, tmp_path: Path, key_dir: Callable[..., dict[str, str]], framing: str, grace: float
) -> None:
    up.default = u.digest()
    proxy = await start_proxy(up, tmp_path, key_dir, grace=grace, timeouts={"read": 30})
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for i in range(GIB // len(BLOCK)):
            if i == SIGNAL_AT:
                proxy.process.send_signal(signal.SIGTERM)
            if i > SIGNAL_AT and grace < 1:
                await asyncio.sleep(0.005)  # ~200 MiB/s: the rest cannot arrive within the short grace
            yield BLOCK
            sent += len(BLOCK)

    headers = {"Content-Length": str(GIB)} if framing == "content-length" else {}
    answer: tuple[int, bytes] | BaseException
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client,
            client.post(proxy.proxy_url + "/upload", data=body(), headers=headers) as resp,
        ):
            answer = (resp.status, await resp.read())
    except (aiohttp.ClientError, ConnectionError) as exc:
        answer = exc
    finally:
        exit_code = await proxy.wait(within=30)
    assert exit_code == 0
    assert sent >= SIGNAL_AT * len(BLOCK)
    # Whatever happened, the upstream never accepted a body that was not the whole upload.
    accepted = [(a.body_bytes, a.sha256) for a in up.arrivals if a.complete]
    assert accepted in ([], [(GIB, gib_sha256())]), accepted
    if grace > 1:
        assert answer == (200, f"{GIB} {gib_sha256()}".encode())
        assert accepted == [(GIB, gib_sha256())]
    else:
        # The caller sees its connection close, or the proxy's 502 once the upstream saw the body break off.
        assert isinstance(answer, BaseException) or answer[0] == 502, answer
        ((arrival_complete, arrival_bytes),) = [(a.complete, a.body_bytes) for a in up.arrivals]
        assert not arrival_complete and SIGNAL_AT * len(BLOCK) // 2 < arrival_bytes < GIB
    print(f"\n{framing}, grace {grace} s: caller got {answer!r:.60}, upstream framing {up.arrivals[0].framing}")


async def test_sigterm_with_500_requests_in_flight_lets_all_finish_and_exits_0(
    up: FaultyUpstream, tmp_path: Path, key_dir: Callable[..., dict[str, str]]
) -> None:
    up.default = u.hold(1.0)
    grace = 10.0
    proxy = await start_proxy(up, tmp_path, key_dir, grace=grace, pool={"max_connections": 600})
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as client:

            async def one(i: int) -> tuple[int, bytes]:
                async with client.get(f"{proxy.proxy_url}/held/{i}") as resp:
                    return resp.status, await resp.read()

            calls = [asyncio.create_task(one(i)) for i in range(500)]
            async with asyncio.timeout(15):
                while len(up.arrivals) < 500:
                    await asyncio.sleep(0.02)
            assert await proxy.metric("aml_auth_proxy_requests_in_flight", route="p") == 500
            signalled = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*calls)
        assert answers == [(200, b"held")] * 500
        assert await proxy.wait(within=grace + 5) == 0
        assert time.monotonic() - signalled < grace
        assert len(up.arrivals) == 500
    finally:
        await proxy.stop()
