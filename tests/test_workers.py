"""`workers`: several proxy processes on one port, real processes on 127.0.0.1. The primary fetches every token
(emulator control plane and Entra ID) and pushes it to the workers; a recording upstream sees what each request
carried, and /proc tells which process accepted each caller connection."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.emulator.runner import RunningEmulator, start_emulator
from proxy.emulator.tls import make_local_tls
from proxy.workers import auto_workers, cgroup_cpu_limit
from tests.support.procs import ProxyProcess
from tests.support.servers import start_app
from tests.support.session import remember
from tests.test_tokens_e2e import FAST, ep2_auth

CLIENT = "11111111-1111-1111-1111-111111111111"


@dataclass(eq=False)
class Upstream:
    """Records the Authorization header of each request; 401 for revoked tokens; optional delay."""

    url: str = ""
    seen: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    delay: float = 0.0


@dataclass(eq=False)
class Env:
    emu: RunningEmulator
    upstream: Upstream
    issued: list[str]


@pytest.fixture
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    secret = "client-secret-0123456789abcdef"
    remember(secret)
    config = {
        "entra": {"clients": {CLIENT: secret}},
        "services": [
            {"name": "ep2", "api": "v2", "region": "eastus", "auth_mode": "aml_token", "deployments": {"blue": "echo"}}
        ],
    }
    upstream = Upstream()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        auth = request.headers.get("Authorization", "")
        upstream.seen.append(auth)
        if upstream.delay:
            await asyncio.sleep(upstream.delay)
        if auth in upstream.revoked:
            return web.json_response({"error": "revoked"}, status=401)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner, upstream.url = await start_app(app)
    tls = make_local_tls(tmp_path_factory.mktemp("tls"))
    async with await start_emulator(config, ssl_context=tls.server_context(), ca_file=tls.ca_file) as emu:
        emu.secret = secret  # type: ignore[attr-defined]
        issued: list[str] = []
        original = emu.state.issue_aml_token

        def issue(name: str, **kw: Any) -> Any:
            token = original(name, **kw)
            issued.append("Bearer " + token.access_token)
            remember(token.access_token)
            return token

        emu.state.issue_aml_token = issue  # type: ignore[method-assign]
        yield Env(emu, upstream, issued)
    await runner.cleanup()


def token_route(env: Env, tmp_path: Path) -> dict[str, Any]:
    """An aml-endpoint-token route: the token from the emulator's control plane, the recording upstream."""
    return {"name": "ep", "upstream": env.upstream.url, "auth": ep2_auth(env.emu, tmp_path, refresh=FAST)}


async def start_proxy(env: Env, tmp_path: Path, workers: int = 3, **extra: Any) -> ProxyProcess:
    config = {"routes": [token_route(env, tmp_path)], "workers": workers, **extra}
    proxy = await ProxyProcess.start(config, tmp_path)
    await until_running(proxy, workers)
    return proxy


async def readyz(proxy: ProxyProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as client, client.get(proxy.admin_url + "/readyz") as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def admin_post(proxy: ProxyProcess, path: str) -> int:
    async with aiohttp.ClientSession() as client, client.post(proxy.admin_url + path) as resp:
        return resp.status


async def until_running(proxy: ProxyProcess, workers: int) -> None:
    async with asyncio.timeout(20):
        while (await readyz(proxy)).get("workers", {}).get("running") != workers:
            await asyncio.sleep(0.05)


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def owner(server_port: int, client_port: int, pids: list[int]) -> int:
    """The pid holding the accepted socket of the connection from `client_port` to `server_port`."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote = parts[1], parts[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            inode = parts[9]
    assert inode is not None, "connection not found in /proc/net/tcp"
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no proxy process holds the connection")


@dataclass(eq=False)
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pid: int = 0

    async def post(self, body: bytes = b'{"data": [1]}') -> int:
        head = f"POST /score HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        self.writer.write(head.encode() + b"\r\n\r\n" + body)
        got = await self.reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", got)
        assert length is not None
        await self.reader.readexactly(int(length[1]))
        return int(got.split()[1])

    def close(self) -> None:
        self.writer.close()


async def connections(proxy: ProxyProcess, count: int) -> list[Conn]:
    """`count` caller connections, each tagged with the pid of the process that accepted it."""
    conns = [Conn(*await asyncio.open_connection("127.0.0.1", proxy.port)) for _ in range(count)]
    await asyncio.sleep(0.1)  # accepted by now
    pids = [proxy.process.pid, *children(proxy.process.pid)]
    for c in conns:
        c.pid = owner(proxy.port, c.writer.get_extra_info("sockname")[1], pids)
    return conns


async def metrics_text(proxy: ProxyProcess) -> str:
    async with aiohttp.ClientSession() as client, client.get(proxy.admin_url + "/metrics") as resp:
        return await resp.text()


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def test_three_processes_share_the_port_and_one_token_fetch_per_refresh(env: Env, tmp_path: Path) -> None:
    proxy = await start_proxy(env, tmp_path)
    try:
        workers = children(proxy.process.pid)
        assert len(workers) == 2
        assert env.emu.state.token_calls["ep2"] == 1  # the primary fetched; the workers did not
        conns = await connections(proxy, 48)
        assert {c.pid for c in conns} == {proxy.process.pid, *workers}  # the kernel spread them over all three
        for c in conns:
            assert await c.post() == 200
        assert env.upstream.seen == [env.issued[-1]] * 48
        for round_ in range(2):
            assert await admin_post(proxy, "/refresh?route=ep") == 200
            assert env.emu.state.token_calls["ep2"] == 2 + round_  # one fetch per refresh, not one per process
            await asyncio.sleep(0.2)  # pushed to the workers within the 50 ms check
            env.upstream.seen.clear()
            for c in conns:
                assert await c.post() == 200
            assert env.upstream.seen == [env.issued[-1]] * 48
        body = await readyz(proxy)
        assert body["ready"] and body["workers"] == {"expected": 3, "running": 3}
        sent = 48 * 3
        async with asyncio.timeout(10):  # workers report every second
            while sample(text := await metrics_text(proxy), "aml_auth_proxy_requests_total", route="ep") != sent:
                await asyncio.sleep(0.2)
        names = [f.name for f in text_string_to_metric_families(text)]
        assert len(names) == len(set(names))  # merged into the primary's families, none exposed twice
        assert sample(text, "aml_auth_proxy_requests_total", route="ep", method="POST", code="200") == sent
        assert sample(text, "aml_auth_proxy_request_duration_seconds_count", route="ep") == sent
        assert sample(text, "aml_auth_proxy_time_to_first_byte_seconds_count", route="ep") == sent
        assert sample(text, "aml_auth_proxy_token_refreshes_total", route="ep", outcome="success") == 3
        for c in conns:
            c.close()
    finally:
        assert await proxy.stop() == 0


async def test_a_401_in_a_worker_means_one_refresh_and_a_retried_200(env: Env, tmp_path: Path) -> None:
    proxy = await start_proxy(env, tmp_path)
    try:
        conns = await connections(proxy, 24)
        on_worker = next(c for c in conns if c.pid != proxy.process.pid)
        await asyncio.sleep(0.1)  # past min_interval_seconds: a refused token may be refreshed
        old = env.issued[-1]
        env.upstream.revoked.add(old)
        assert await on_worker.post() == 200
        assert env.emu.state.token_calls["ep2"] == 2  # exactly one refresh, by the primary
        assert env.upstream.seen == [old, env.issued[-1]]
        await asyncio.sleep(0.2)
        env.upstream.seen.clear()
        for c in conns:  # every process now sends the new token, with no further refresh
            assert await c.post() == 200
        assert env.upstream.seen == [env.issued[-1]] * 24
        assert env.emu.state.token_calls["ep2"] == 2
        async with asyncio.timeout(10):
            while sample(await metrics_text(proxy), "aml_auth_proxy_auth_retries_total", route="ep") != 1:
                await asyncio.sleep(0.2)
        for c in conns:
            c.close()
    finally:
        assert await proxy.stop() == 0
    assert old[len("Bearer ") :] not in proxy.log_path.read_text()


async def test_a_killed_worker_is_restarted_and_sigterm_drains_every_process(env: Env, tmp_path: Path) -> None:
    proxy = await start_proxy(env, tmp_path, shutdown_grace_seconds=5)
    victim = children(proxy.process.pid)[0]
    os.kill(victim, signal.SIGKILL)
    async with asyncio.timeout(15):
        while victim in (kids := children(proxy.process.pid)) or len(kids) != 2:
            await asyncio.sleep(0.05)
    await until_running(proxy, 3)
    assert [e.get("event") for e in proxy.events()].count("worker_exited") == 1
    workers = children(proxy.process.pid)
    conns = await connections(proxy, 48)
    assert {c.pid for c in conns} == {proxy.process.pid, *workers}
    env.upstream.delay = 1.0
    in_flight = [asyncio.create_task(c.post()) for c in conns]
    async with asyncio.timeout(5):
        while len(env.upstream.seen) < len(conns):
            await asyncio.sleep(0.02)
    proxy.process.send_signal(signal.SIGTERM)
    assert await asyncio.gather(*in_flight) == [200] * len(conns)  # every process drained its requests
    assert await proxy.wait(within=15) == 0
    stopped = {e.get("pid") for e in proxy.events() if e.get("event") == "worker_stopped"}
    assert set(workers) <= stopped
    assert "worker_killed" not in [e.get("event") for e in proxy.events()]
    for c in conns:
        c.close()


async def test_run_workers_1_overrides_the_config_and_is_one_process(env: Env, tmp_path: Path) -> None:
    config = {"routes": [token_route(env, tmp_path)], "workers": 3}
    proxy = await ProxyProcess.start(config, tmp_path, args=("--workers", "1"))
    try:
        assert children(proxy.process.pid) == []
        assert "workers" not in await readyz(proxy)
    finally:
        assert await proxy.stop() == 0


def test_cgroup_v2_quota_rounds_up_and_max_means_no_limit(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2
    assert auto_workers(tmp_path, affinity=8) == 2
    assert auto_workers(tmp_path, affinity=1) == 1  # capped by the CPUs the process may run on
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert auto_workers(tmp_path, affinity=8) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert auto_workers(tmp_path, affinity=6) == 6


def test_cgroup_v1_quota_and_no_cgroup(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None
    assert auto_workers(tmp_path, affinity=3) == 3
    cpu = tmp_path / "cpu,cpuacct"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("400000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 4
    assert auto_workers(tmp_path, affinity=16) == 4
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (cpu / "cpu.cfs_quota_us").write_text("garbage\n")
    assert auto_workers(tmp_path, affinity=2) == 2
