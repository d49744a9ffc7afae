"""Load generators: wrk (closed loop: N connections, each sends its next request when the answer arrives) and k6
(open loop: a fixed arrival rate, independent of how fast answers come back). Both are bounded in time."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

WRK_SCRIPT = """
wrk.method = "{method}"
{body}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""

K6_SCRIPT = """
import http from 'k6/http';
const body = JSON.stringify({{ data: 'x'.repeat({fill}) }});
const params = {{ headers: {{ 'Content-Type': 'application/json' }} }};
export const options = {{
  discardResponseBodies: true,
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(99)', 'p(99.9)', 'max'],
  scenarios: {{
    open: {{
      executor: 'constant-arrival-rate', rate: {rate}, timeUnit: '1s', duration: '{duration}s',
      preAllocatedVUs: {vus}, maxVUs: {vus}, gracefulStop: '5s',
    }},
  }},
}};
export default function () {{ http.post('{url}', body, params); }}
export function handleSummary(data) {{ return {{ '{out}': JSON.stringify(data) }}; }}
"""


def json_body(size: int) -> str:
    """A JSON document of exactly `size` bytes: {"data":"xxx..."}."""
    return '{"data":"' + "x" * (size - 11) + '"}'


@dataclass
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _pin(cpus: set[int] | None) -> Callable[[], None] | None:
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def _run_sampled(
    argv: list[str], *, cpus: set[int] | None, timeout: float, sample: Callable[[], None] | None, env: dict[str, str]
) -> str:
    """Run a load generator to its end (killed after `timeout`), calling `sample` every 0.25 s meanwhile."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        preexec_fn=_pin(cpus),
    )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not finish within {timeout:.0f} s")
            if sample is not None:
                sample()
            time.sleep(0.25)
        out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited with {proc.returncode}:\n{out[-2000:]}")
    return out


def wrk(
    url: str,
    *,
    workdir: Path,
    connections: int,
    seconds: float,
    cpus: set[int] | None,
    method: str = "GET",
    body_bytes: int = 0,
    sample: Callable[[], None] | None = None,
) -> LoadResult:
    """Closed loop: `connections` keep-alive connections on one wrk thread for `seconds`."""
    body = ""
    if body_bytes:
        body = f'wrk.body = \'{json_body(body_bytes)}\'\nwrk.headers["Content-Type"] = "application/json"'
    script = workdir / f"wrk-{method.lower()}-{body_bytes}.lua"
    script.write_text(WRK_SCRIPT.format(method=method, body=body))
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(script)]
    out = _run_sampled([*argv, url], cpus=cpus, timeout=seconds + 30, sample=sample, env=dict(os.environ))
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out[-2000:]}")
    data = json.loads(line.split(" ", 1)[1])
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=errors,
        extra={"p90_ms": data["p90_us"] / 1000, "p999_ms": data["p999_us"] / 1000, "max_ms": data["max_us"] / 1000},
    )


def k6(
    url: str,
    *,
    workdir: Path,
    rate: int,
    vus: int,
    seconds: float,
    body_bytes: int,
    cpus: set[int] | None,
    k6_bin: str = "k6",
    sample: Callable[[], None] | None = None,
) -> LoadResult:
    """Open loop: `rate` POSTs of `body_bytes` per second for `seconds`, on at most `vus` connections."""
    out_file = workdir / "k6-summary.json"
    out_file.unlink(missing_ok=True)
    script = workdir / "k6-open.js"
    duration = max(1, round(seconds))
    script.write_text(
        K6_SCRIPT.format(fill=body_bytes - 11, rate=rate, duration=duration, vus=vus, url=url, out=out_file)
    )
    env = {**os.environ, "K6_NO_USAGE_REPORT": "true", "K6_NO_COLOR": "true"}
    argv = [k6_bin, "run", "--quiet", "--no-usage-report", "--no-thresholds", str(script)]
    _run_sampled(argv, cpus=cpus, timeout=duration + 40, sample=sample, env=env)
    metrics = json.loads(out_file.read_text())["metrics"]
    dur = metrics["http_req_duration"]["values"]
    reqs = int(metrics["http_reqs"]["values"]["count"])
    failed = metrics.get("http_req_failed", {}).get("values", {})
    dropped = int(metrics.get("dropped_iterations", {}).get("values", {}).get("count", 0))
    return LoadResult(
        requests=reqs,
        seconds=float(duration),
        p50_ms=float(dur["med"]),
        p99_ms=float(dur["p(99)"]),
        errors=int(failed.get("passes", round(failed.get("rate", 0.0) * reqs))),
        extra={"p999_ms": float(dur["p(99.9)"]), "max_ms": float(dur["max"]), "dropped": float(dropped)},
    )
