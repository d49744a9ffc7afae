"""The references in docs/ stay true to the code."""

from __future__ import annotations

import re
import shutil
import tomllib
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


def test_demo_tells_its_story_in_at_most_60_lines_and_says_what_happened() -> None:
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
    lines = out.splitlines()
    assert len(lines) <= 60, len(lines)
    assert not [line for line in lines if line.lstrip().startswith("{")]  # no log line on the screen
    assert "without a key: 401 " in out and out.count('-> 200 {"result"') == 4
    assert '/demo/score {"data": [1, 2, 3]} -> 200 {"result": [2, 4, 6]}' in out
    assert "/score {" not in out.replace("/demo/score {", "")  # every call shows its real path
    # What happened after the regeneration, as the proxy reports it: a failover to the secondary or the new primary.
    assert ("resent the call with the\n     secondary key" in out) or ("already read the new keys" in out), out
    assert "The proxy then re-read the files: it holds the new primary" in out
    # Per region: count of answers, fetches and p50/p95 of the refresh latency histogram, never a running _sum.
    for route, region in (("east", "eastus"), ("west", "westeurope")):
        row = re.search(
            rf"^     {route} +{region} +(\d+) x 200; (\d+) token fetches, refresh latency p50 (\d+) ms, p95 (\d+) ms",
            out,
            re.M,
        )
        assert row, out
        # Quantiles from the histogram's buckets: the 95th lies above the median, as a running sum would not.
        assert int(row[1]) > 50 and int(row[2]) >= 2 and int(row[3]) < int(row[4])
    west_p50 = int(re.search(r"^     west .* p50 (\d+) ms", out, re.M)[1])  # type: ignore[index]
    assert west_p50 >= 150  # the far region's control plane is 150 ms away, and the demo says so
    assert "adds 150 ms to each westeurope control-plane" in out
    assert "_sum" not in out and "ready=true" in out
    log = Path(re.search(r"log \(\d+ JSON lines.*\): (\S+)$", out, re.M)[1])  # type: ignore[index]
    config = Path(re.search(r"ran on: (\S+)", out)[1])  # type: ignore[index]
    try:
        assert '"event":"access"' in log.read_text() and "routes:" in config.read_text()
    finally:
        shutil.rmtree(log.parent, ignore_errors=True)
    assert lines[-4:-1] == [
        "  .venv/bin/aml-auth-proxy emulator --proxy-config dev/proxy.yaml",
        "  .venv/bin/aml-auth-proxy run --config dev/proxy.yaml           # in a second terminal",
        "  curl -d '{\"data\": [1, 2, 3]}' http://127.0.0.1:8080/demo/score",
    ]


def test_readme_layout_names_every_module_and_the_example_route_count() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("Layout of `proxy/`", 1)[1].split("\nDependencies:", 1)[0]
    named = set(re.findall(r"`([a-z_]+(?:\.py|/))`", layout))
    top = {p.name for p in (ROOT / "proxy").glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    packages = {p.name + "/" for p in (ROOT / "proxy").iterdir() if (p / "__init__.py").exists()}
    assert top | packages <= named, sorted((top | packages) - named)
    emulator = {p.name for p in (ROOT / "proxy" / "emulator").glob("*.py")}
    assert {"runner.py", "proxyconfig.py"} <= emulator
    routes = re.findall(r"^  - name: ", (ROOT / "docs" / "example-config.yaml").read_text(), re.M)
    words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
    assert f"with a {words[len(routes)]}-route example in" in readme


def test_readme_dev_loop_is_the_one_the_demo_and_the_emulator_suggest() -> None:
    from proxy.demo import Screen  # noqa: F401  (the demo's module imports; its last lines are checked above)

    readme = (ROOT / "README.md").read_text()
    assert ".venv/bin/aml-auth-proxy emulator --proxy-config dev/proxy.yaml\n" in readme
    assert ".venv/bin/aml-auth-proxy run --config dev/proxy.yaml" in readme
    assert "curl -d '{\"data\": [1, 2, 3]}' http://127.0.0.1:8080/demo/score" in readme


def test_readme_layers_are_the_import_contracts_layers() -> None:
    """README's "From the top: ..." sentence lists the layers of [tool.importlinter] in pyproject.toml, in order."""
    readme = (ROOT / "README.md").read_text()
    sentence = readme.split("From the top:", 1)[1].split("The modules:", 1)[0]
    said = [name.removesuffix(".py").removesuffix("/") for name in re.findall(r"`([a-z_]+(?:\.py|/))`", sentence)]
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layers = [m.strip().removeprefix("proxy.") for layer in contract["layers"] for m in re.split(r"[|:]", layer)]
    assert said == [m for m in layers if m != "__main__"]


def test_the_license_file_is_the_license_pyproject_names() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Permission is hereby granted, free of charge" in text
