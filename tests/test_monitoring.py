"""The chart's alert rules and Grafana dashboard, checked by the real tools.

The PrometheusRule is rendered with helm, its groups extracted and run through `promtool check rules` and
`promtool test rules` (tests/monitoring/alerts-test.yaml: every alert fires on a bad series and stays silent on
a healthy one).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.tools import ROOT, tool

CHART = ROOT / "charts" / "aml-auth-proxy"
# The chart's smallest valid install (one route); the monitoring flags are set on top of it.
BASE_VALUES = CHART / "ci" / "default-values.yaml"
ALERTS_TEST = ROOT / "tests" / "monitoring" / "alerts-test.yaml"
NAMESPACE = "demo"  # the release namespace the alert unit tests are written for


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
