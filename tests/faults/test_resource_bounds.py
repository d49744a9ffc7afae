"""Resource bounds of the proxy process under hostile clients: memory under 1,000 slow (slowloris) clients, and
file descriptors and sockets under connection churn. The proxy runs as users run it, in its own process, so
its RSS and descriptor table can be read from /proc."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from tests.support.procs import ProxyProcess
from tests.support.session import new_key

SLOW_CLIENTS = 1000
# What one slow client may cost the proxy at most: its protocol object, parser state and a partial head.
BYTES_PER_SLOW_CLIENT = 48 * 1024


@pytest.fixture
async def proxy(serve: Callable[..., Awaitable[str]], key_dir: Any, tmp_path: Path) -> AsyncIterator[ProxyProcess]:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{t:.*}", ok)
    upstream = await serve(app)
    config = {
        "access_log": False,
        "limits": {"max_connections": 4096, "client_timeout_seconds": 30},
        "routes": [{"name": "bounds", "upstream": upstream, "auth": key_dir(new_key("bounds"))}],
    }
    process = await ProxyProcess.start(config, tmp_path, name="bounds")
    yield process
    await process.stop()


def tcp_sockets() -> dict[str, tuple[int, int, str]]:
    """Every IPv4 TCP socket by inode: (local port, remote port, state)."""
    found: dict[str, tuple[int, int, str]] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        found[fields[9]] = (int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16), fields[3])
    return found


def open_fds(pid: int, upstream_port: int) -> int:
    """The process's descriptors, less its pooled upstream connections: the pool grows with concurrency (and may
    shrink), which is its job; anything else that grows with churned callers is a leak."""
    sockets = tcp_sockets()
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        inode = target[len("socket:[") : -1] if target.startswith("socket:[") else ""
        if inode in sockets and sockets[inode][1] == upstream_port:
            continue
        count += 1
    return count


def proxy_side_sockets(port: int) -> dict[str, int]:
    """Sockets whose local port is the proxy port, by TCP state (LISTEN excluded, TIME_WAIT holds no fd)."""
    names = {"01": "ESTABLISHED", "08": "CLOSE_WAIT", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT"}
    counts: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        if int(local.split(":")[1], 16) == port and state != "0A":
            key = names.get(state, state)
            counts[key] = counts.get(key, 0) + 1
    counts.pop("TIME_WAIT", None)
    return counts


async def score(proxy: ProxyProcess, client: aiohttp.ClientSession) -> int:
    async with client.post(proxy.proxy_url + "/score", json={"x": 1}) as resp:
        await resp.read()
        return resp.status


async def test_memory_stays_bounded_under_1000_slow_clients_and_real_calls_still_get_through(
    proxy: ProxyProcess,
) -> None:
    async with aiohttp.ClientSession() as client:
        for _ in range(200):  # warm up: pools, caches, the allocator's arenas
            assert await score(proxy, client) == 200
        baseline = proxy.status_kib("VmRSS")
        slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for _ in range(SLOW_CLIENTS):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /score HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 2000)
            slow.append((reader, writer))
        peak = 0
        served = 0
        for _ in range(6):  # 3 s of dripping: one more byte per client every half second, never the blank line
            for _, writer in slow:
                writer.write(b"p")
            await asyncio.sleep(0.5)
            peak = max(peak, proxy.status_kib("VmRSS"))
            served += await score(proxy, client) == 200  # a real caller is not starved
        assert all(not reader.at_eof() for reader, _ in slow), "the slow clients should still be connected"
        for _, writer in slow:
            writer.close()
    growth = (peak - baseline) * 1024
    print(f"RSS {baseline} KiB -> peak {peak} KiB with {SLOW_CLIENTS} slow clients: {growth / SLOW_CLIENTS:.0f} B each")
    assert served == 6
    assert growth < SLOW_CLIENTS * BYTES_PER_SLOW_CLIENT, f"{growth / SLOW_CLIENTS:.0f} bytes per slow client"


async def churn(port: int, rounds: int, per_round: int) -> None:
    """Connections that finish a request, break off in the head, or break off in the body; all bounded."""
    head = b"POST /score HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            if i % 3 == 0:
                writer.write(head + b"x" * 1000)
                async with asyncio.timeout(5):
                    await reader.readuntil(b"\r\n\r\n")
            elif i % 3 == 1:
                writer.write(head[:20])  # mid-head
            else:
                writer.write(head + b"x" * 10)  # mid-body
            await writer.drain()
        finally:
            writer.close()

    for _ in range(rounds):
        await asyncio.gather(*(one(i) for i in range(per_round)))


async def settled(check: Callable[[], bool], within: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if check():
            return True
        await asyncio.sleep(0.05)
    return check()


async def test_descriptors_and_sockets_return_to_baseline_after_connection_churn(proxy: ProxyProcess) -> None:
    pid = proxy.process.pid
    upstream_port = urlsplit(proxy.config["routes"][0]["upstream"]).port
    await churn(proxy.port, rounds=2, per_round=150)  # reach the steady state: upstream pool, allocator
    assert await settled(lambda: proxy_side_sockets(proxy.port) == {}), proxy_side_sockets(proxy.port)
    baseline = open_fds(pid, upstream_port)
    await churn(proxy.port, rounds=10, per_round=150)  # 1,500 more connections
    assert await settled(lambda: proxy_side_sockets(proxy.port) == {}), proxy_side_sockets(proxy.port)
    after = open_fds(pid, upstream_port)
    print(f"proxy fds: {baseline} after warm-up, {after} after 1,500 churned connections")
    # Pooled upstream connections are not counted; caller sockets and everything else must be back.
    assert after <= baseline + 2, (baseline, after)
    async with aiohttp.ClientSession() as client:
        assert await score(proxy, client) == 200
