"""Interleaved before/after runs of the request path: `make bench-ab BEFORE=<commit>`.

    python -m bench.ab --before COMMIT [--rounds 3] [--seconds 10]

Builds COMMIT in a temporary git worktree (compiled like the checkout, with this venv's Python) and runs the
same load against it and against the checkout, alternating A, B, A, B, ... so that drift of the machine (other
load, thermal state, noisy neighbours) falls on both sides. Each run: nginx as the upstream and aml-auth-proxy
(one process, a key route) pinned to the first CPU, wrk with 32 keep-alive connections on the other, GET of a
200-byte answer for `seconds`. What is compared is the proxy's CPU time per request (user + system, from /proc),
which does not depend on how busy the load generator is, and its requests per second.

Each run also prints a calibration row, so that runs on different machines can be compared: the time of a fixed
pure-Python workload (CPython's speed on this CPU) and nginx's own CPU per request as a proxy (the machine's
speed at the same job in C). Loopback only; every run is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import load
from bench.procs import Proc, Procs, cpu_plan, free_port, wait_http
from bench.run import GET_BODY_BYTES, _json_sized, start_nginx
from proxy.emulator.secretdir import write_secret_dir

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 32


def calibration_ms() -> float:
    """A fixed pure-Python workload (dicts, strings, ints, calls; about 0.3 s on a 2020s x86 core): the best of 3."""

    def work() -> int:
        total = 0
        table: dict[str, int] = {}
        for i in range(300_000):
            key = f"k{i % 997}"
            table[key] = table.get(key, 0) + i
            total += len(key) * (i & 7)
        return total + sum(table.values())

    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def build_before(commit: str, dest: Path) -> Path:
    tree = dest / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True)
    env = dict(os.environ, AML_AUTH_PROXY_COMPILE="1")
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
    )
    return tree


def remove_worktree(tree: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def measure(
    procs: Procs, tmp: Path, name: str, tree: Path, upstream: str, cpus: tuple[set[int] | None, set[int] | None]
) -> tuple[float, float, float]:
    """Start the proxy from `tree`, load it; returns (CPU µs per request, requests per second, p99 ms)."""
    server_cpus, load_cpus = cpus
    keys = tmp / f"keys-{name}"
    write_secret_dir(keys, {"primary": "k" * 693})
    port, admin = free_port(), free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin},
        "workers": 1,
        "routes": [{"name": "bench", "upstream": upstream, "auth": {"primary_file": str(keys / "primary")}}],
    }
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(config))
    # `python -m proxy` imports from its working directory first: it must run in `tree`, or every side would run
    # the checkout (PYTHONPATH alone comes after the working directory).
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [sys.executable, "-m", "proxy", "run", "--config", str(path)]
    proc = procs.start(name, argv, cpus=server_cpus, env=env, cwd=tree)
    try:
        wait_http(f"http://127.0.0.1:{admin}/readyz", proc, timeout=30)
        url = f"http://127.0.0.1:{port}/score"
        load.wrk(url, workdir=tmp, connections=CONNECTIONS, seconds=2, cpus=load_cpus)  # warm up
        before = proc.cpu()
        result = load.wrk(url, workdir=tmp, connections=CONNECTIONS, seconds=SECONDS, cpus=load_cpus)
        used = proc.cpu() - before
        if result.errors:
            raise RuntimeError(f"{name}: {result.errors} errors")
        return used / result.requests * 1e6, result.rps, result.p99_ms
    finally:
        procs.stop(proc)


SECONDS = 10.0


def main() -> int:
    global SECONDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--before", required=True, help="the commit to compare the checkout with")
    parser.add_argument("--rounds", type=int, default=3, help="A/B pairs (default 3)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load per run (default 10)")
    args = parser.parse_args()
    SECONDS = min(max(args.seconds, 2.0), 60.0)
    rounds = min(max(args.rounds, 1), 10)
    if shutil.which("nginx") is None or shutil.which("wrk") is None:
        print("nginx and wrk are needed: run scripts/install-bench-tools.sh (make bench-ab does)", file=sys.stderr)
        return 2
    cpus = cpu_plan()
    with tempfile.TemporaryDirectory(prefix="aml-auth-proxy-ab-") as tmpdir:
        tmp = Path(tmpdir)
        procs = Procs(tmp)
        tree = build_before(args.before, tmp)
        try:
            up_port, px_port = free_port(), free_port()
            bodies = {"get_body": _json_sized(GET_BODY_BYTES), "post_body": '{"result":[0.5]}'}
            start_nginx(procs, tmp, "nginx-upstream", "upstream.conf", cpus[0], port=up_port, **bodies)
            upstream = f"http://127.0.0.1:{up_port}"
            nginx_proxy = start_nginx(
                procs,
                tmp,
                "nginx-proxy",
                "proxy.conf",
                cpus[0],
                port=px_port,
                upstream_port=up_port,
                authorization="Bearer " + "k" * 693,
                workers=1,
            )
            results: dict[str, list[tuple[float, float, float]]] = {"before": [], "after": []}
            builds: dict[str, Path] = {"before": tree, "after": ROOT}
            for i in range(rounds):
                for side in ("before", "after") if i % 2 == 0 else ("after", "before"):
                    us, rps, p99 = measure(procs, tmp, f"{side}-{i}", builds[side], upstream, cpus)
                    results[side].append((us, rps, p99))
                    print(
                        f"round {i + 1} {side:<6} {us:6.1f} µs/request  {rps:8.0f} req/s  p99 {p99:.2f} ms", flush=True
                    )
            nginx_us = nginx_cost(nginx_proxy, f"http://127.0.0.1:{px_port}/score", tmp, cpus[1])
        finally:
            procs.stop_all()
            remove_worktree(tree)
    print()
    for side in ("before", "after"):
        costs = [r[0] for r in results[side]]
        rates = [r[1] for r in results[side]]
        print(
            f"{side:<6} ({args.before if side == 'before' else 'checkout'}): {min(costs):.1f}-{max(costs):.1f} "
            f"µs/request (median {statistics.median(costs):.1f}), {min(rates):.0f}-{max(rates):.0f} req/s"
        )
    change = statistics.median(r[0] for r in results["after"]) / statistics.median(r[0] for r in results["before"])
    print(f"after/before CPU per request (medians): {change:.3f}")
    print(f"calibration: pure-Python workload {calibration_ms():.0f} ms; nginx as the proxy {nginx_us:.1f} µs/request")
    return 0


def nginx_cost(proc: Proc, url: str, tmp: Path, load_cpus: set[int] | None) -> float:
    before = proc.cpu()
    result = load.wrk(url, workdir=tmp, connections=CONNECTIONS, seconds=SECONDS, cpus=load_cpus)
    return (proc.cpu() - before) / result.requests * 1e6


if __name__ == "__main__":
    sys.exit(main())
