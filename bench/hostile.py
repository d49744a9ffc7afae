"""The proxy's memory under hostile callers and upstreams: `make bench-hostile [BEFORE=<commit>]`.

    python -m bench.hostile [--before COMMIT] [--seconds 15]

Runs the proxy as users run it (one process, `aml-auth-proxy run`, a key route with two keys) and, one scenario
at a time, measures its resident set (/proc/PID/statm, every 0.1 s) while a peer misbehaves:

- admin-pipeline: a caller pipelines `GET /healthz` to the admin port and never reads the answers;
- refusal-pipeline: the same on the proxy port with `GET /./x`, a keep-alive 400 the proxy answers itself;
- proxied-pipeline: the same with proxied 20 KB answers;
- endless-trailers: the upstream ends a chunked body and then sends one trailer line that never ends (192 MB);
- large-401: the upstream answers the primary key with a 401 whose body is 400 MB (the retry with the secondary
  key gets a 200);
- slowloris: 1,000 callers each send half a request head and one more byte every half second.

With --before, the same scenarios also run against COMMIT, built in a temporary git worktree (bench/ab.py), so a
fix and its absence are measured side by side. Loopback only; every scenario is bounded in time (--seconds), in
bytes sent, and by a 1.5 GiB ceiling on the proxy's RSS past which the scenario stops early.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.ab import ROOT, build_before, remove_worktree
from bench.procs import Proc, Procs, free_port, wait_http
from proxy.emulator.secretdir import write_secret_dir

PRIMARY = "p" * 40
SECONDARY = "s" * 40
CEILING_MIB = 1536.0
TRAILER_BYTES = 192 * 1000 * 1000
BODY_401_BYTES = 400 * 1000 * 1000
SLOW_CLIENTS = 1000
PIECE = b"a" * (1 << 20)
TIMEOUT = 10.0  # limits.client_timeout_seconds: a caller that does not read is cut off after it


class Upstream:
    """A scripted upstream on 127.0.0.1: /big answers 20 KB, /trailers an endless trailer, /auth a 400 MB 401 to
    the primary key and a 200 to the secondary; anything else a small 200. Keep-alive, GET only."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.open: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for writer in list(self.open):
            writer.transport.abort()  # its handler reads EOF and ends
        await asyncio.sleep(0.1)
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1]
                if target.endswith(b"/big"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n" + b"b" * 20000)
                elif target.endswith(b"/trailers"):
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: ")
                    await self._stream(writer, TRAILER_BYTES)
                    return
                elif target.endswith(b"/auth") and PRIMARY.encode() in head:
                    writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n\r\n" % BODY_401_BYTES)
                    await self._stream(writer, BODY_401_BYTES)
                    return
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open.discard(writer)
            writer.close()

    @staticmethod
    async def _stream(writer: asyncio.StreamWriter, total: int) -> None:
        sent = 0
        while sent < total:
            writer.write(PIECE)
            sent += len(PIECE)
            await writer.drain()


class Sampler:
    """The proxy's RSS every 0.1 s while a scenario runs."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.peak = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.peak = max(self.peak, self.proc.rss())
            if self.peak > CEILING_MIB:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await stop.wait()


async def pipeline_without_reading(port: int, request: bytes, seconds: float, sampler: Sampler) -> str:
    """Pipeline `request` for `seconds` without reading; returns how it ended."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    batch = request * 200
    deadline = time.monotonic() + seconds
    sent = 0
    try:
        while time.monotonic() < deadline and sent < 4 << 30 and sampler.peak <= CEILING_MIB:
            try:
                sent += sock.send(batch)
            except BlockingIOError:
                pass
            except OSError:
                return f"cut by the proxy after {sent / 1e6:.0f} MB sent"
            await asyncio.sleep(0.002)
    finally:
        sock.close()
    return f"still connected after {sent / 1e6:.0f} MB sent" + (" (RSS ceiling)" if sampler.peak > CEILING_MIB else "")


async def read_all(port: int, target: str, seconds: float) -> str:
    """One GET through the proxy, its answer read as it comes; returns the status line and what was read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = 0
    first = b""
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        async with asyncio.timeout(seconds):
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                first = first or data.split(b"\r\n", 1)[0]
                got += len(data)
                if b"\r\n0\r\n\r\n" in data or (b"Content-Length: 2\r\n" in data and data.endswith(b"ok")):
                    break
    except TimeoutError:
        return f"{first.decode(errors='replace')}; {got} bytes read, still open after {seconds:.0f} s"
    finally:
        writer.close()
    return f"{first.decode(errors='replace') or 'connection closed'}; {got} bytes read"


async def slowloris(port: int, seconds: float, sampler: Sampler) -> str:
    conns = []
    for _ in range(SLOW_CLIENTS):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /score HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 2000)
        conns.append(writer)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and sampler.peak <= CEILING_MIB:
        for writer in conns:
            if not writer.transport.is_closing():  # the proxy may have cut it off
                writer.write(b"p")
        await asyncio.sleep(0.5)
    open_ = sum(1 for w in conns if not w.transport.is_closing())
    for writer in conns:
        writer.close()
    return f"{SLOW_CLIENTS} slow callers, {open_} still connected after {seconds:.0f} s"


Scenario = Callable[[int, int, float, Sampler], Awaitable[str]]

SCENARIOS: list[tuple[str, Scenario]] = [
    (
        "admin-pipeline",
        lambda port, admin, sec, s: pipeline_without_reading(
            admin, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n", sec, s
        ),
    ),
    (
        "refusal-pipeline",
        lambda port, admin, sec, s: pipeline_without_reading(port, b"GET /./x HTTP/1.1\r\nHost: a\r\n\r\n", sec, s),
    ),
    (
        "proxied-pipeline",
        lambda port, admin, sec, s: pipeline_without_reading(port, b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n", sec, s),
    ),
    ("endless-trailers", lambda port, admin, sec, s: read_all(port, "/trailers", sec)),
    ("large-401", lambda port, admin, sec, s: read_all(port, "/auth", sec)),
    ("slowloris", lambda port, admin, sec, s: slowloris(port, sec, s)),
]


async def measure(procs: Procs, tmp: Path, name: str, tree: Path, upstream: Upstream, seconds: float) -> None:
    """Each scenario against a proxy process of its own, started from `tree`: one scenario's leftovers (an RSS
    grown to the ceiling) never colour the next."""
    print(f"{name}: {'the checkout' if tree == ROOT else 'the commit'}, client_timeout_seconds {TIMEOUT:.0f}")
    keys = tmp / f"keys-{name}"
    write_secret_dir(keys, {"primary": PRIMARY, "secondary": SECONDARY})
    auth = {"primary_file": str(keys / "primary"), "secondary_file": str(keys / "secondary")}
    for scenario_name, scenario in SCENARIOS:
        port, admin = free_port(), free_port()
        config = {
            "listen": {"host": "127.0.0.1", "port": port},
            "admin": {"host": "127.0.0.1", "port": admin},
            "workers": 1,
            "access_log": False,
            "limits": {"max_connections": 4096, "client_timeout_seconds": TIMEOUT},
            "routes": [{"name": "hostile", "upstream": f"http://127.0.0.1:{upstream.port}", "auth": auth}],
        }
        path = tmp / f"{name}-{scenario_name}.yaml"
        path.write_text(json.dumps(config))
        env = dict(os.environ, PYTHONPATH=str(tree))
        argv = [sys.executable, "-m", "proxy", "run", "--config", str(path)]
        proc = procs.start(f"{name}-{scenario_name}", argv, cpus=None, env=env, cwd=tree)  # `-m` imports from cwd
        try:
            await asyncio.to_thread(wait_http, f"http://127.0.0.1:{admin}/readyz", proc, 30.0)
            baseline = proc.rss()
            sampler = Sampler(proc)
            stop = asyncio.Event()
            sampling = asyncio.create_task(sampler.run(stop))
            outcome = await scenario(port, admin, seconds, sampler)
            stop.set()
            await sampling
            print(f"  {scenario_name:17} RSS {baseline:6.1f} -> peak {sampler.peak:7.1f} MiB; {outcome}", flush=True)
        finally:
            procs.stop(proc)


async def main_async(before: str | None, seconds: float) -> int:
    with tempfile.TemporaryDirectory(prefix="aml-auth-proxy-hostile-") as tmpdir:
        tmp = Path(tmpdir)
        procs = Procs(tmp)
        upstream = Upstream()
        await upstream.start()
        tree = None
        try:
            if before:
                tree = await asyncio.to_thread(build_before, before, tmp)
                await measure(procs, tmp, "before", tree, upstream, seconds)
            await measure(procs, tmp, "after", ROOT, upstream, seconds)
        finally:
            procs.stop_all()
            await upstream.close()
            if tree is not None:
                remove_worktree(tree)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--before", help="also measure this commit, built in a temporary worktree")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per scenario (default 15, at most 60)")
    args = parser.parse_args()
    return asyncio.run(main_async(args.before, min(max(args.seconds, 2.0), 60.0)))


if __name__ == "__main__":
    raise SystemExit(main())
