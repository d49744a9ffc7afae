"""`make bench-injector` (and the last step of `make bench`): the sidecar injector's reviews per second and latency
on one core, loopback only, bounded in time and count.

    python -m bench.injector            # about 25 s
    python -m bench.injector --quick    # about 8 s (a smoke test; numbers are noisy)

The injector runs as `aml-auth-proxy injector` (the chart's sidecar template rendered by helm, a trustme
certificate, --native true, no Kubernetes API) pinned to one CPU; the load generator runs in this process on
another CPU and POSTs AdmissionReviews of realistic pods (tests/support/injector.py: a Deployment's pod, a Job's,
one with its own init containers; a quarter already injected, so skipped) over HTTPS keep-alive connections, as
the API server does. Two measurements:

- closed loop: CONCURRENCY reviews in flight, as fast as they are answered, for the time or REVIEW_CAP reviews:
  the most reviews per second one core answers;
- open loop: TARGET_RATE reviews a second on a fixed schedule (latency measured from the scheduled send time, so
  a stall is not hidden): p50, p99 and max.

The target (issue 18): 200 reviews/s with p99 under 20 ms. Exit 1 when missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import trustme

from bench.procs import Procs, cpu_plan, free_port, wait_http
from tests.support.injector import (
    admission_review,
    deployment_pod,
    job_pod,
    pod_with_init_containers,
    write_template,
)

VENV_BIN = Path(sys.executable).parent
TARGET_RATE = 200.0
TARGET_P99_MS = 20.0
CONCURRENCY = 8
REVIEW_CAP = 50_000  # reviews per measurement at most, whatever the time


def bodies() -> list[bytes]:
    """The reviews sent, in turn: three pods to inject and one already injected (skipped)."""
    injected = deployment_pod()
    injected["spec"]["initContainers"] = [
        {"name": "aml-auth-proxy", "image": "ghcr.io/aml-auth-proxy/aml-auth-proxy:0.1.0"}
    ]
    pods = [deployment_pod(), job_pod(), pod_with_init_containers(), injected]
    return [json.dumps(admission_review(pod)).encode() for pod in pods]


async def closed_loop(url: str, context: ssl.SSLContext, seconds: float) -> tuple[int, float, list[float]]:
    reviews = bodies()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=CONCURRENCY)) as session:

        async def worker(n: int) -> None:
            i = n
            while time.perf_counter() < deadline and len(latencies) < REVIEW_CAP:
                started = time.perf_counter()
                async with session.post(url, data=reviews[i % len(reviews)], headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"review answered {resp.status}")
                latencies.append(time.perf_counter() - started)
                i += 1

        begun = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
        elapsed = time.perf_counter() - begun
    return len(latencies), elapsed, latencies


async def open_loop(url: str, context: ssl.SSLContext, rate: float, seconds: float) -> list[float]:
    reviews = bodies()
    count = min(int(rate * seconds), REVIEW_CAP)
    latencies: list[float] = []
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=64)) as session:

        async def send(body: bytes) -> None:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"review answered {resp.status}")

        # Warm the connections (the API server keeps its connections to a webhook open).
        await asyncio.gather(*(send(reviews[0]) for _ in range(4)))
        start = time.perf_counter() + 0.05

        async def one(i: int) -> None:
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            await send(reviews[i % len(reviews)])
            latencies.append(time.perf_counter() - scheduled)

        await asyncio.gather(*(one(i) for i in range(count)))
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.injector", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s measurements instead of 10")
    args = parser.parse_args(argv)
    seconds = 3.0 if args.quick else 10.0
    server_cpus, load_cpus = cpu_plan()
    if load_cpus is not None:
        os.sched_setaffinity(0, load_cpus)
    tmp = Path(tempfile.mkdtemp(prefix="aml-bench-injector-"))
    procs = Procs(tmp)
    try:
        template = write_template(tmp)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(tmp / "tls.crt"))
        cert.private_key_pem.write_to_path(str(tmp / "tls.key"))
        context = ssl.create_default_context()
        ca.configure_trust(context)
        port, admin = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "POD_"))}
        proc = procs.start(
            "injector",
            [
                str(VENV_BIN / "aml-auth-proxy"),
                "injector",
                f"--tls-cert={tmp / 'tls.crt'}",
                f"--tls-key={tmp / 'tls.key'}",
                f"--sidecar-template={template}",
                f"--listen=127.0.0.1:{port}",
                f"--admin=127.0.0.1:{admin}",
                "--native=true",
                "--namespace=aml-auth-proxy",
            ],
            cpus=server_cpus,
            env=env,
        )
        wait_http(f"http://127.0.0.1:{admin}/readyz", proc)
        url = f"https://127.0.0.1:{port}/mutate"
        cpu_before = proc.cpu()
        count, elapsed, closed = asyncio.run(closed_loop(url, context, seconds))
        busy = (proc.cpu() - cpu_before) / elapsed
        rate = count / elapsed
        latencies = asyncio.run(open_loop(url, context, TARGET_RATE, seconds))
        proc.check()
        rss = proc.rss()
    finally:
        procs.stop_all()
    p50, p99, worst = (percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000, max(latencies) * 1000)
    pinned = f"pinned to CPU {sorted(server_cpus)[0]}" if server_cpus else "not pinned (one CPU available)"
    print(f"injector ({pinned}; {seconds:g} s per measurement; HTTPS keep-alive; RSS {rss:.0f} MiB after the run)")
    print(
        f"  closed loop, {CONCURRENCY} in flight: {rate:,.0f} reviews/s ({count:,} reviews), "
        f"p50 {statistics.median(closed) * 1000:.2f} ms, p99 {percentile(closed, 0.99) * 1000:.2f} ms, "
        f"injector CPU {busy:.0%} of one core"
    )
    print(
        f"  open loop, {TARGET_RATE:.0f} reviews/s: {len(latencies):,} reviews, p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
        f"max {worst:.2f} ms"
    )
    met = rate >= TARGET_RATE and p99 < TARGET_P99_MS
    verdict = "met" if met else "MISSED"
    print(f"  target {TARGET_RATE:.0f} reviews/s with p99 under {TARGET_P99_MS:.0f} ms: {verdict}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
