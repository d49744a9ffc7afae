"""The one results table: absolute numbers, and ratios to the nginx proxy in the same scenario."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.load import LoadResult

NGINX_PROXY = "nginx proxy"
DIRECT = "upstream direct (nginx)"


@dataclass
class Row:
    scenario: str
    target: str
    result: LoadResult
    cpu_seconds: float
    rss_mib: float
    rss_min_mib: float
    idle_rss_mib: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_seconds / self.result.requests * 1e6 if self.result.requests else 0.0

    @property
    def vcpu_per_1k(self) -> float:
        """vCPU needed for 1,000 requests per second at this cost per request."""
        return self.cpu_us_per_request / 1000

    def one_line(self) -> str:
        r = self.result
        refreshed = f", {self.extra['refreshes']:.0f} token refreshes" if "refreshes" in self.extra else ""
        return (
            f"  {self.scenario:<36} {self.target:<44} {r.rps:8.0f} req/s  p50 {r.p50_ms:6.2f} ms  "
            f"p99 {r.p99_ms:6.2f} ms  CPU {self.cpu_us_per_request:6.0f} us/req  RSS {self.rss_mib:5.1f} MiB  "
            f"errors {r.errors}{refreshed}"
        )


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def render(rows: list[Row], header: dict[str, str], notes: list[str]) -> str:
    out = ["# aml-auth-proxy bench: latest results", ""]
    out += [f"- {key}: {value}" for key, value in header.items()]
    out += [
        "",
        "| scenario | target | req/s | p50 ms | p99 ms | added p50 / p99 ms vs direct | req/s vs nginx proxy "
        "| p99 vs nginx proxy | CPU µs/req | CPU vs nginx proxy | vCPU per 1k req/s | RSS MiB idle / peak | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        same = [r for r in rows if r.scenario == row.scenario]
        nginx = next((r for r in same if r.target == NGINX_PROXY), None)
        direct = next((r for r in same if r.target == DIRECT), None)
        r = row.result
        added = "-"
        if direct is not None and row is not direct:
            added = f"{r.p50_ms - direct.result.p50_ms:+.2f} / {r.p99_ms - direct.result.p99_ms:+.2f}"
        target = row.target
        if "refreshes" in row.extra:
            target += f" ({row.extra['refreshes']:.0f} refreshes)"
        errors = str(r.errors)
        if r.extra.get("dropped"):
            errors += f" ({r.extra['dropped']:.0f} dropped)"
        out.append(
            f"| {row.scenario} | {target} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {added} "
            f"| {_ratio(r.rps, nginx.result.rps if nginx else None)} "
            f"| {_ratio(r.p99_ms, nginx.result.p99_ms if nginx else None)} "
            f"| {row.cpu_us_per_request:.0f} "
            f"| {_ratio(row.cpu_us_per_request, nginx.cpu_us_per_request if nginx else None)} "
            f"| {row.vcpu_per_1k:.3f} | {row.idle_rss_mib:.1f} / {row.rss_mib:.1f} | {errors} |"
        )
    out += ["", *_sizing(rows), *([""] + [f"- {n}" for n in notes] if notes else []), ""]
    return "\n".join(out)


def _sizing(rows: list[Row]) -> list[str]:
    lines = ["Sizing (aml-auth-proxy):", ""]
    for row in rows:
        if not row.target.startswith("aml-auth-proxy"):
            continue
        if row.scenario.startswith("GET"):
            where = "with every CPU shared" if "whole machine" in row.scenario else "on one core"
            lines.append(
                f"- {row.target}: idle RSS {row.idle_rss_mib:.1f} MiB; RSS under {row.scenario} "
                f"{row.rss_min_mib:.1f} to {row.rss_mib:.1f} MiB; {row.vcpu_per_1k:.3f} vCPU per 1,000 req/s "
                f"at saturation ({row.result.rps:.0f} req/s {where})"
            )
        elif "k6" in row.scenario:
            lines.append(
                f"- {row.target}, {row.scenario}: {row.cpu_seconds / row.result.seconds:.3f} vCPU used at "
                f"{row.result.rps:.0f} req/s"
            )
    return lines
