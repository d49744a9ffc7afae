"""The chart's alert rules and Grafana dashboard, checked by the real tools.

The PrometheusRule is rendered with helm, its groups extracted and run through `promtool check rules` and
`promtool test rules` (tests/monitoring/alerts-test.yaml: every alert fires on a bad series and stays silent on
a healthy one). The dashboard ships verbatim in a ConfigMap, and every query
uses the template variables and documented metrics only.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.tools import ROOT, tool

CHART = ROOT / "charts" / "aml-auth-proxy"
# The chart's smallest valid install (one route); the monitoring flags are set on top of it.
BASE_VALUES = CHART / "ci" / "default-values.yaml"
DASHBOARD = CHART / "dashboards" / "aml-auth-proxy.json"
ALERTS_TEST = ROOT / "tests" / "monitoring" / "alerts-test.yaml"
NAMESPACE = "demo"  # the release namespace the alert unit tests are written for
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
