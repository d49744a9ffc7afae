"""The references in docs/ stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


def test_every_metric_and_label_is_documented_and_nothing_else() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    metrics = Metrics(CollectorRegistry())
    metrics.for_route("r", kind="aml-keys")
    metrics.for_route("r").request_done("GET", 200, 0.01)
    metrics.rejected.labels("no_route").inc()
    metrics.entra_requests.labels("workload", "acquired").inc()
    metrics.entra_duration.labels("workload").observe(0.1)
    metrics.share_role.labels("r", "leader").set(1)
    metrics.share_transitions.labels("r").inc()
    exposed: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        exposed[name] = {k for s in family.samples for k in s.labels if k != "le"}
    rows = dict(re.findall(r"^\| `(aml_auth_proxy_[a-z_]+)` \| \w+ \| ([a-z, ]+) \|", doc, re.M))
    assert set(rows) == set(exposed)
    for name, labels in exposed.items():
        assert {x.strip() for x in rows[name].split(",")} == labels, name


def test_readme_quick_start_has_exactly_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(make \w+)$", quick, re.M)
    assert commands == ["make demo", "make test"]


def test_demo_runs_end_to_end_and_shows_both_auth_kinds() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--token-seconds", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert '-> 200 {"result": [2, 4, 6]}' in out and "-> 401" in out
    assert out.count('-> 200 {"result"') == 5
    assert "east (eastus    ) requests {200:" in out and "west (westeurope) requests {200:" in out
    assert "Demo finished in" in out and "ready=False" not in out
