"""The chart's alert rules and Grafana dashboard, checked by the real tools.

The PrometheusRule is rendered with helm, its groups extracted and run through `promtool check rules` and
`promtool test rules` (tests/monitoring/alerts-test.yaml: every alert fires on a bad series and stays silent on
a healthy one). The dashboard's queries run against a real Prometheus that scrapes a real proxy, which keeps
short-lived tokens fresh from the emulator in two regions while requests flow: every panel must return data.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.support.emulated import control_plane_auth, short_token_service, token_route
from tests.support.procs import ProxyProcess, start_emulator_process
from tests.support.session import remember, subprocess_log
from tests.support.tools import ROOT, tool

CHART = ROOT / "charts" / "aml-auth-proxy"
# The chart's smallest valid install (one route); the monitoring flags are set on top of it.
BASE_VALUES = CHART / "ci" / "default-values.yaml"
DASHBOARD = CHART / "dashboards" / "aml-auth-proxy.json"
ALERTS_TEST = ROOT / "tests" / "monitoring" / "alerts-test.yaml"
NAMESPACE = "demo"  # the release namespace the alert unit tests are written for
POD = "aml-auth-proxy-0"
CLIENT = "55555555-5555-5555-5555-555555555555"
TRAFFIC_SECONDS = 30.0
# Grafana's interval macros, as Grafana would set them for a 1 s scrape interval and a short time range.
MACROS = {"$__rate_interval": "15s", "$__interval": "5s"}
VARIABLES = ("namespace", "pod", "route", "region")


# -- rendering -------------------------------------------------------------------------------------------------


def helm_template(*args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [tool("helm"), "template", "rel", str(CHART), "--namespace", NAMESPACE, "-f", str(BASE_VALUES), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


def rendered_rules(tmp_path: Path, thresholds: dict[str, Any] | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """Render the PrometheusRule and write its groups as a Prometheus rules file."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"prometheusRule": {"enabled": True, "thresholds": thresholds or {}}}))
    rule = only(helm_template("-f", str(values)), "PrometheusRule")
    groups = rule["spec"]["groups"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path, [r for g in groups for r in g["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60, check=False)


def unit_test_file(tmp_path: Path, rules_path: Path) -> Path:
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    doc["rule_files"] = [str(rules_path)]
    path = tmp_path / "alerts-test.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def alert_cases() -> dict[str, list[bool]]:
    """For each alert the unit tests evaluate: one entry per evaluation, True when it expects the alert to fire."""
    cases: dict[str, list[bool]] = {}
    for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            cases.setdefault(case["alertname"], []).append(bool(case.get("exp_alerts")))
    return cases


# -- alert rules -----------------------------------------------------------------------------------------------


def test_monitoring_objects_render_only_when_enabled() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in helm_template()}
    assert ("PrometheusRule", "rel-aml-auth-proxy") not in kinds
    assert ("ConfigMap", "rel-aml-auth-proxy-dashboard") not in kinds


def test_rendered_alert_rules_pass_promtool_check_and_unit_tests(tmp_path: Path) -> None:
    rules_path, rules = rendered_rules(tmp_path)
    names = [r["alert"] for r in rules]
    print("\nalerts: " + ", ".join(f"{r['alert']} ({r['labels']['severity']})" for r in rules))
    assert len(names) == len(set(names)) >= 6
    assert all(r["labels"]["severity"] in ("warning", "critical") for r in rules)
    assert all({"summary", "description"} <= set(r["annotations"]) for r in rules)

    check = promtool("check", "rules", str(rules_path))
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules)} rules found" in check.stdout

    cases = alert_cases()
    for name in names:
        assert name in cases, f"{name} has no promtool unit test"
        assert True in cases[name], f"{name}: no unit test where it fires"
        assert False in cases[name], f"{name}: no unit test where it stays silent"
    assert set(cases) == set(names)

    result = promtool("test", "rules", str(unit_test_file(tmp_path, rules_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_thresholds_come_from_values_and_the_unit_tests_notice_a_change(tmp_path: Path) -> None:
    thresholds = {
        "refreshFailingFor": "7m",
        "expiringSoonSeconds": 123,
        "notReadyFor": "4m",
        "upstream5xxRatio": 0.5,
        "upstream401PerSecond": 3,
        "refreshLatencyP95Seconds": 9,
    }
    rules_path, rules = rendered_rules(tmp_path, thresholds)
    by_name = {r["alert"]: r for r in rules}
    assert by_name["AmlAuthProxyTokenRefreshFailing"]["for"] == "7m"
    assert "< 123" in by_name["AmlAuthProxyTokenExpiringSoon"]["expr"]
    assert by_name["AmlAuthProxyRouteNotReady"]["for"] == "4m"
    assert by_name["AmlAuthProxyUpstream5xxRatioHigh"]["expr"].rstrip().endswith("> 0.5")
    assert by_name["AmlAuthProxyUpstream401Spike"]["expr"].rstrip().endswith("> 3")
    assert by_name["AmlAuthProxyTokenRefreshSlow"]["expr"].rstrip().endswith("> 9")
    # The unit tests are written for the defaults: with these thresholds every alert's expectations break.
    result = promtool("test", "rules", str(unit_test_file(tmp_path, rules_path)))
    assert result.returncode != 0
    for name in by_name:
        assert f"alertname: {name}," in result.stderr, name


def test_rules_are_scoped_to_the_release_namespace(tmp_path: Path) -> None:
    _, rules = rendered_rules(tmp_path)
    for rule in rules:
        selectors = re.findall(r"aml_auth_proxy_\w+\{([^}]*)\}", rule["expr"])
        assert selectors, rule["alert"]
        assert all(f'namespace="{NAMESPACE}"' in s for s in selectors), rule["expr"]


# -- dashboard, statically -------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def panel_exprs(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(doc) for t in p.get("targets", [])]


def documented_metrics() -> dict[str, set[str]]:
    """Metric name -> labels, from the table in docs/metrics.md (the source of truth)."""
    doc = (ROOT / "docs" / "metrics.md").read_text()
    rows = re.findall(r"^\| `(aml_auth_proxy_[a-z_]+)` \| (\w+) \| ([a-z, ]+) \|", doc, re.M)
    out: dict[str, set[str]] = {}
    for name, kind, labels in rows:
        label_set = {x.strip() for x in labels.split(",")}
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[name + suffix] = label_set | ({"le"} if suffix == "_bucket" else set())
        else:
            out[name] = label_set
    return out


def test_dashboard_configmap_carries_the_json_verbatim() -> None:
    docs = helm_template(
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "grafanaDashboard.namespace=monitoring",
        "--set-string",
        "grafanaDashboard.annotations.grafana_folder=AML",
    )
    cm = only([d for d in docs if d["metadata"]["name"].endswith("-dashboard")], "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "AML"}
    assert json.loads(cm["data"]["aml-auth-proxy.json"]) == dashboard()
    docs = helm_template("--set", "grafanaDashboard.enabled=true")
    cm = only([d for d in docs if d["metadata"]["name"].endswith("-dashboard")], "ConfigMap")
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert "annotations" not in cm["metadata"]


def test_every_dashboard_query_uses_the_variables_and_documented_metrics() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] >= 39 and doc["uid"] == "aml-auth-proxy"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in VARIABLES:
        var = variables[name]
        assert var["type"] == "query" and var["multi"] and var["includeAll"], name
        assert var["definition"].startswith("label_values("), name
        assert var["datasource"]["uid"] == "${datasource}"
    metrics = documented_metrics()
    exprs = panel_exprs(doc)
    assert len(exprs) >= 20
    for panel in panels(doc):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    for title, expr in exprs:
        names = re.findall(r"aml_auth_proxy_\w+", expr)
        assert names, title
        for name in names:
            assert name in metrics, f"{title}: {name} is not in docs/metrics.md"
        for name, selector in re.findall(r"(aml_auth_proxy_\w+)\{([^}]*)\}", expr):
            matchers = dict(re.findall(r'(\w+)=~"([^"]*)"', selector))
            want = {"namespace", "pod"} | ({"route", "region"} & metrics[name])
            assert {k: v for k, v in matchers.items() if k in want} == {k: f"${k}" for k in want}, (title, expr)
        assert len(re.findall(r"aml_auth_proxy_\w+\{", expr)) == len(names), f"{title}: a metric without selector"


# -- dashboard against real data -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def start_prometheus(target: str, tmp_path: Path) -> tuple[asyncio.subprocess.Process, str]:
    """A real Prometheus on 127.0.0.1 scraping `target` every second, with the labels a ServiceMonitor adds."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "aml-auth-proxy",
                "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE, "pod": POD}}],
            }
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    with subprocess_log("prometheus").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            tool("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={url.removeprefix('http://')}",
            stdout=log,
            stderr=log,
        )
    try:
        async with aiohttp.ClientSession() as client, asyncio.timeout(30):
            while True:
                assert process.returncode is None, f"prometheus exited {process.returncode}"
                try:
                    async with client.get(url + "/-/ready") as resp:
                        if resp.status == 200:
                            return process, url
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.2)
    except BaseException:
        await stop(process)
        raise


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(20):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()


async def drive_traffic(proxy: ProxyProcess, ready: dict[str, Any], seconds: float) -> dict[int, int]:
    """Scoring calls on both token routes, plus a trickle of 5xx, 401, refused requests and upstream resets."""
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds

    async def get(client: aiohttp.ClientSession, method: str, path: str) -> None:
        async with client.request(method, proxy.proxy_url + path, json={"data": [1, 2]}) as resp:
            await resp.read()
        statuses[resp.status] = statuses.get(resp.status, 0) + 1

    async def scoring(route: str) -> None:
        async with aiohttp.ClientSession() as client:
            for _ in range(100_000):
                if time.monotonic() >= deadline:
                    return
                await get(client, "POST", f"/{route}/score")
                await asyncio.sleep(0.01)

    async def errors() -> None:
        ssl_ctx = ssl.create_default_context(cafile=ready["ca_file"])
        async with aiohttp.ClientSession() as client:
            for i in range(1000):
                if time.monotonic() >= deadline:
                    return
                await get(client, "GET", "/east/status/500")
                await get(client, "GET", "/west/status/503")
                await get(client, "GET", "/nowhere")  # no route: refused by the proxy with a 404
                if i % 4 == 0:
                    await get(client, "GET", "/west/status/401")  # forces one refresh, then answers 401
                if i % 10 == 0:
                    fault = {"target": "scoring", "action": "reset", "service": "east", "count": 1}
                    async with client.post(ready["control_url"] + "/_emulator/faults", json=fault, ssl=ssl_ctx) as r:
                        assert r.status == 201, await r.text()
                await asyncio.sleep(0.5)

    await asyncio.gather(scoring("east"), scoring("west"), errors())
    return statuses


def substitute(expr: str, values: dict[str, str]) -> str:
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)


async def query(client: aiohttp.ClientSession, url: str, expr: str, at: float) -> dict[str, Any]:
    async with client.get(url + "/api/v1/query", params={"query": expr, "time": f"{at:.3f}"}) as resp:
        body: dict[str, Any] = await resp.json()
    return body


async def resolve_variables(client: aiohttp.ClientSession, url: str, doc: dict[str, Any]) -> dict[str, list[str]]:
    """Each variable's label_values(...) query through the label API, in order, as Grafana resolves them."""
    resolved: dict[str, list[str]] = {}
    for var in doc["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
        assert m is not None, var["definition"]
        selector = substitute(m.group(1), {k: "|".join(v) for k, v in resolved.items()})
        async with client.get(f"{url}/api/v1/label/{m.group(2)}/values", params={"match[]": selector}) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        resolved[var["name"]] = body["data"]
    return resolved


async def test_every_dashboard_panel_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    secret = "monitoring-client-secret-" + secrets.token_urlsafe(16)
    remember(secret)
    emulator_config = {
        "tls": True,
        "latency": {"westeurope": 0.15},
        # 5 s Entra ID tokens: azure-identity fetches a new one every few AML refreshes, so the Entra ID panels
        # have acquisitions in the last rate window too.
        "entra": {"clients": {CLIENT: secret}, "token_lifetime_seconds": 5},
        "services": [
            short_token_service(name, api, region)
            for name, api, region in (("east", "v2", "eastus"), ("west", "v1", "westeurope"))
        ],
    }
    emulator, ready = await start_emulator_process(emulator_config, tmp_path, name="monitoring-emulator")
    processes = [emulator]
    try:
        (tmp_path / "secret").write_text(secret + "\n")
        common = control_plane_auth(ready, CLIENT, tmp_path / "secret")
        routes = [
            token_route(ready, "east", "eastus", "aml-endpoint-token", common),
            token_route(ready, "west", "westeurope", "aml-service-token", common),
        ]
        proxy = await ProxyProcess.start({"routes": routes}, tmp_path, name="monitoring-proxy")
        processes.append(proxy.process)
        prometheus, prom_url = await start_prometheus(proxy.admin_url.removeprefix("http://"), tmp_path)
        processes.append(prometheus)

        statuses = await drive_traffic(proxy, ready, TRAFFIC_SECONDS)
        await asyncio.sleep(2.5)  # the last scrapes
        doc = dashboard()
        async with aiohttp.ClientSession() as client:
            variables = await resolve_variables(client, prom_url, doc)
            at = time.time()
            results = {}
            values = {"namespace": NAMESPACE, "pod": POD} | {k: "|".join(variables[k]) for k in ("route", "region")}
            for title, expr in panel_exprs(doc):
                results[(title, expr)] = await query(client, prom_url, substitute(expr, values), at)
    finally:
        for process in reversed(processes):
            await stop(process)

    print(f"\nrequests by status: {dict(sorted(statuses.items()))}")
    print(f"variables: {variables}")
    assert {200, 401, 404, 500, 502, 503} <= set(statuses), statuses
    assert variables["namespace"] == [NAMESPACE] and variables["pod"] == [POD]
    assert variables["route"] == ["east", "west"] and variables["region"] == ["eastus", "westeurope"]
    problems = []
    for (title, expr), body in results.items():
        series = body.get("data", {}).get("result", [])
        shown = ", ".join(
            f"{'/'.join(v for k, v in sorted(s['metric'].items()) if k not in ('namespace', 'pod')) or '-'}="
            f"{float(s['value'][1]):.4g}"
            for s in series
        )
        print(f"  {title}: {shown}")
        if body.get("status") != "success":
            problems.append(f"{title}: {body.get('error')} in {expr}")
        elif not series:
            problems.append(f"{title}: no data for {expr}")
        elif all(s["value"][1] == "NaN" for s in series):
            problems.append(f"{title}: only NaN for {expr}")
    assert not problems, "\n".join(problems)

    latency = [b for (t, _), b in results.items() if t == "Token refresh latency per region"]
    per_region: dict[str, dict[str, float]] = {}
    for quantile, body in zip(("p50", "p95", "p99"), latency, strict=True):
        for s in body["data"]["result"]:
            per_region.setdefault(s["metric"]["region"], {})[quantile] = float(s["value"][1])
    print(
        "token refresh latency per region: "
        + "; ".join(
            f"{region} " + " ".join(f"{q} {v * 1000:.1f} ms" for q, v in sorted(qs.items()))
            for region, qs in sorted(per_region.items())
        )
    )
    assert set(per_region) == {"eastus", "westeurope"}
    assert per_region["westeurope"]["p50"] > per_region["eastus"]["p50"] + 0.1
