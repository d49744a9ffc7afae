"""What the proxy adds to each event of a streamed answer: `make bench-streaming`.

    python -m bench.streaming [--quick]

An upstream process answers `text/event-stream` like a chat completion streamed token by token: EVENTS events,
INTERVAL apart, each carrying the monotonic time it was written (CLOCK_MONOTONIC is one clock for every process of
the machine). A client in this process reads the same streams directly from the upstream and through
aml-auth-proxy (its own process, a key route), STREAMS at a time, and records for each event the time from its
write to its arrival. The upstream and the proxy share one CPU and the client has the other when two are allowed.
The two distributions, direct and proxied, are compared: the difference is what the proxy adds. Rounds alternate
direct and proxied. Loopback only; bounded in streams, events and seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.procs import Procs, cpu_plan, free_port, wait_http

VENV_BIN = Path(sys.executable).parent
EVENTS = 100
INTERVAL = 0.01  # seconds between two events of one stream
STREAMS = 20  # streams at a time
TIMEOUT = 60.0  # the whole measurement, at most


async def _events(request: web.Request) -> web.StreamResponse:
    count = int(request.query.get("events", EVENTS))
    answer = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await answer.prepare(request)
    for i in range(count):
        await asyncio.sleep(INTERVAL)
        sent = time.monotonic()
        await answer.write(f"data: {json.dumps({'i': i, 'sent': sent})}\n\n".encode())
    await answer.write(b"data: [DONE]\n\n")
    await answer.write_eof()
    return answer


async def _read(session: aiohttp.ClientSession, url: str, delays: list[float]) -> int:
    """Read one stream; append each event's delay (arrival minus write); return the events read."""
    seen = 0
    async with session.get(url) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            arrived = time.monotonic()
            if not line.startswith(b"data: {"):
                continue
            delays.append(arrived - json.loads(line[6:])["sent"])
            seen += 1
    return seen


async def _measure(url: str, streams: int, events: int) -> list[float]:
    delays: list[float] = []
    async with aiohttp.ClientSession() as session:
        counts = await asyncio.wait_for(
            asyncio.gather(*(_read(session, f"{url}?events={events}", delays) for _ in range(streams))), TIMEOUT
        )
    if counts != [events] * streams:
        raise RuntimeError(f"{url}: expected {events} events per stream, read {counts}")
    return delays


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def serve_upstream(port: int) -> None:
    """The upstream process (`--serve-upstream PORT`)."""
    app = web.Application()
    app.router.add_get("/events", _events)
    app.router.add_get("/ready", lambda _r: _ok())
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def _ok() -> web.Response:
    return web.Response(text="ok")


async def _run(proxy_url: str, upstream_url: str, streams: int, events: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"direct": [], "proxied": []}
    for _ in range(2):  # interleaved, so that drift of the machine falls on both
        out["direct"] += await _measure(f"{upstream_url}/events", streams, events)
        out["proxied"] += await _measure(f"{proxy_url}/events", streams, events)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 events per stream instead of 100")
    parser.add_argument("--streams", type=int, default=STREAMS, help=f"streams at a time (default {STREAMS})")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    events = 20 if args.quick else EVENTS
    streams = min(max(args.streams, 1), 200)
    server_cpus, load_cpus = cpu_plan()
    if load_cpus is not None:
        os.sched_setaffinity(0, load_cpus)
    tmp = Path(tempfile.mkdtemp(prefix="aml-bench-streaming-"))
    procs = Procs(tmp)
    upstream_port, port, admin = free_port(), free_port(), free_port()
    key = tmp / "primary"
    key.write_text("bench-streaming-key-0001\n")
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin},
        "access_log": False,
        "routes": [
            {"name": "bench", "upstream": f"http://127.0.0.1:{upstream_port}", "auth": {"primary_file": str(key)}}
        ],
    }
    path = tmp / "proxy.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    try:
        upstream = procs.start(
            "upstream",
            [sys.executable, "-m", "bench.streaming", "--serve-upstream", str(upstream_port)],
            cpus=server_cpus,
            cwd=Path(__file__).resolve().parent.parent,
        )
        wait_http(f"http://127.0.0.1:{upstream_port}/ready", upstream)
        proc = procs.start("proxy", [str(VENV_BIN / "aml-auth-proxy"), "run", "--config", str(path)], cpus=server_cpus)
        wait_http(f"http://127.0.0.1:{admin}/readyz", proc)
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        found = asyncio.run(_run(f"http://127.0.0.1:{port}", upstream_url, streams, events))
        proc.check()
        upstream.check()
    finally:
        procs.stop_all()
    pinned = f"proxy pinned to CPU {sorted(server_cpus)[0]}" if server_cpus else "not pinned (one CPU available)"
    print(
        f"streamed answers ({pinned}; {streams} streams at a time, {events} events each {INTERVAL * 1000:g} ms apart, "
        "two rounds interleaved)"
    )
    medians = {}
    for side, delays in found.items():
        ms = [d * 1000 for d in delays]
        medians[side] = statistics.median(ms)
        print(
            f"  {side:8} {len(ms):,} events: delay p50 {statistics.median(ms):.3f} ms, "
            f"p99 {percentile(ms, 0.99):.3f} ms, max {max(ms):.3f} ms"
        )
    print(f"  added by the proxy (p50): {medians['proxied'] - medians['direct']:.3f} ms per event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
