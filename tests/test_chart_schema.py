"""The chart's `config` schema is generated from the proxy's own (scripts/chart_schema.py) and stays so.

The committed values.schema.json must be what the generator writes from proxy/config/schema.py, so a key added to the
proxy and not regenerated fails here. Every key of the proxy's config passes through the chart: the documented
example config pasted under `config:` renders, and what the chart writes into the ConfigMap is that config, which
the proxy accepts. A value the proxy refuses is refused by `helm template` too, naming the key.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from proxy.config.reader import parse
from proxy.config.schema import ROUTE_LEAVES, TOP_LEAVES, Leaf
from proxy.config.settings import ConfigError, Settings
from tests.support.tools import ROOT
from tests.test_chart import BASE, CHART, KUBE_VERSION, NAMESPACE, RELEASE, helm, parse_manifests, proxy_config

SCRIPT = ROOT / "scripts" / "chart_schema.py"
SCHEMA_FILE = CHART / "values.schema.json"
EXAMPLE_CONFIG = ROOT / "docs" / "example-config.yaml"

Obj = dict[str, Any]


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_chart_schema", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return load_generator()


def committed_config_schema() -> Obj:
    schema: Obj = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))["properties"]["config"]
    return schema


# --- the committed file is the generated one -------------------------------------------------------------------


def test_committed_schema_is_what_the_generator_writes(generator: ModuleType) -> None:
    committed = SCHEMA_FILE.read_text(encoding="utf-8")
    assert generator.render(committed, generator.config_schema()) == committed, (
        "values.schema.json is out of date: run .venv/bin/python scripts/chart_schema.py"
    )
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""


def test_only_the_config_section_is_generated(generator: ModuleType) -> None:
    text = SCHEMA_FILE.read_text(encoding="utf-8")
    committed = json.loads(text)
    rendered = json.loads(generator.render(text, {"type": "object"}))
    assert list(rendered["properties"]) == list(committed["properties"])  # config keeps its place
    assert rendered["properties"].pop("config") == {"type": "object"}
    del committed["properties"]["config"]
    assert rendered == committed


def test_a_key_added_to_the_proxy_but_not_regenerated_fails_the_check(
    generator: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    committed = committed_config_schema()
    assert generator.config_schema() == committed
    top_leaf = Leaf("tracing.sample_ratio", "float", 0.0, "Share of requests traced.", minimum=0, maximum=1)
    route_leaf = Leaf("auth.audience", "optstr", None, "Audience of the token.", auth_types=("aad",))

    with_top = generator.config_schema(top_leaves=(*TOP_LEAVES, top_leaf))
    assert with_top != committed
    assert with_top["properties"]["tracing"] == {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "sample_ratio": {"type": "number", "minimum": 0, "maximum": 1, "description": "Share of requests traced."}
        },
    }
    with_route = generator.config_schema(route_leaves=(*ROUTE_LEAVES, route_leaf))
    assert with_route != committed
    auth = with_route["properties"]["routes"]["items"]["properties"]["auth"]["properties"]
    assert auth["audience"] == {"type": ["string", "null"], "minLength": 1, "description": "Audience of the token."}

    # The same drift through the command line: --check names the file, exits 1 and writes nothing.
    before = SCHEMA_FILE.read_bytes()
    monkeypatch.setattr(generator, "TOP_LEAVES", (*TOP_LEAVES, top_leaf))
    assert generator.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "charts/aml-auth-proxy/values.schema.json is out of date" in err, err
    assert SCHEMA_FILE.read_bytes() == before


def test_schema_mirrors_the_proxys_rules() -> None:
    config = committed_config_schema()
    props = config["properties"]
    assert config["additionalProperties"] is False
    assert {leaf.key.split(".")[0] for leaf in TOP_LEAVES} | {"routes"} == set(props)
    workers = props["workers"]
    assert (workers["type"], workers["minimum"], workers["maximum"]) == ("integer", 0, 256)
    assert props["log_level"]["enum"] == ["debug", "info", "warning", "error"]
    route = props["routes"]["items"]
    assert route["additionalProperties"] is False and route["required"] == ["upstream"]
    assert route["properties"]["timeouts"]["properties"]["total"]["type"] == ["number", "null"]
    assert (
        route["properties"]["auth"]["properties"]["identity"]["properties"]["client_secret_ref"]["additionalProperties"]
        is False
    )
    # The chart's own rules: it sets kubernetes.events from events.enabled, and a pod needs fixed ports.
    assert "events" not in props["kubernetes"]["properties"]
    assert props["listen"]["properties"]["port"]["minimum"] == 1
    assert props["admin"]["properties"]["port"]["minimum"] == 1


def schema_nodes(node: Obj, where: str = "config") -> Iterator[tuple[str, Obj]]:
    """Every schema in the tree under `node`, with its path."""
    yield where, node
    for name, child in node.get("properties", {}).items():
        yield from schema_nodes(child, f"{where}.{name}")
    if "items" in node:
        yield from schema_nodes(node["items"], f"{where}[]")


def test_schema_sets_no_defaults_and_describes_every_value() -> None:
    nodes = list(schema_nodes(committed_config_schema()))
    assert len(nodes) > len(TOP_LEAVES) + len(ROUTE_LEAVES)
    assert [where for where, node in nodes if "default" in node] == []
    values = [(where, node) for where, node in nodes if node["type"] not in ("object", "array")]
    assert [where for where, node in values if not node.get("description")] == []


# --- every key of the proxy's config renders and reaches the proxy ---------------------------------------------


def helm_template(tmp_path: Path, values: Obj | str, *set_args: str) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with one values file (a mapping, or YAML text as written) and --set args."""
    values_file = tmp_path / "values.yaml"
    values_file.write_text(values if isinstance(values, str) else yaml.safe_dump(values))
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    args += ["-f", str(values_file)]
    for item in set_args:
        args += ["--set", item]
    return helm(*args)


def rendered_settings(result: subprocess.CompletedProcess[str]) -> tuple[Obj, Settings]:
    """The config.yaml the chart rendered, as YAML and as the proxy reads it (no environment)."""
    assert result.returncode == 0, result.stderr
    raw: Obj = yaml.safe_load(proxy_config(parse_manifests(result.stdout)))
    return raw, parse(raw, {})


@pytest.mark.parametrize(
    ("set_args", "expected"),
    [
        (["config.workers=2"], {"workers": 2}),
        (
            ["config.limits.max_body_bytes=104857600", "config.limits.max_connections=2048"],
            {"limits": {"max_body_bytes": 104857600, "max_connections": 2048}},
        ),
        (
            ["config.admin.allow_remote_refresh=true"],
            {"admin": {"host": "0.0.0.0", "port": 9090, "allow_remote_refresh": True}},
        ),
    ],
)
def test_keys_the_chart_used_to_refuse_render_and_reach_the_proxy(
    tmp_path: Path, set_args: list[str], expected: Obj
) -> None:
    raw, settings = rendered_settings(helm_template(tmp_path, BASE, *set_args))
    for key, value in expected.items():
        assert raw[key] == value
    assert settings.workers == raw.get("workers", 0)
    assert settings.limits.max_body_bytes == raw.get("limits", {}).get("max_body_bytes", 0)
    assert settings.limits.max_connections == raw.get("limits", {}).get("max_connections", 1024)
    assert settings.admin_allow_remote_refresh is raw["admin"].get("allow_remote_refresh", False)


def test_the_example_config_pasted_under_config_renders_as_it_is(tmp_path: Path) -> None:
    example_text = EXAMPLE_CONFIG.read_text()
    others = {key: value for key, value in BASE.items() if key != "config"}
    values_text = yaml.safe_dump(others) + "config:\n" + textwrap.indent(example_text, "  ")
    result = helm_template(tmp_path, values_text)
    raw, settings = rendered_settings(result)
    example = yaml.safe_load(example_text)
    # events comes from events.enabled, and workers (unset in the example) from resources.limits.cpu (500m: 1)
    assert raw == {**example, "kubernetes": {"events": False}, "workers": 1}
    assert [r.name for r in settings.routes] == [r["name"] for r in example["routes"]]
    assert settings.limits.max_body_bytes == example["limits"]["max_body_bytes"]
    assert "max_body_bytes: 104857600" in proxy_config(parse_manifests(result.stdout))  # never 1.048576e+08


# --- what the proxy refuses, helm refuses ----------------------------------------------------------------------


def set_value(text: str) -> Any:
    """A `--set` value as helm types it: true and false are booleans, whole numbers integers, the rest strings."""
    if text in ("true", "false"):
        return text == "true"
    return int(text) if text.lstrip("-").isdigit() else text


def with_route(**changes: Any) -> Obj:
    route = {**BASE["config"]["routes"][0], **changes}
    return {**BASE, "config": {**BASE["config"], "routes": [route]}}


@pytest.mark.parametrize(
    ("values", "set_args", "proxy_key", "helm_message"),
    [
        (BASE, ["config.workers=-1"], "workers", "at '/config/workers': minimum: got -1, want 0"),
        (BASE, ["config.workers=257"], "workers", "at '/config/workers': maximum: got 257, want 256"),
        (BASE, ["config.limits.nope=1"], "limits.nope", "at '/config/limits': additional properties 'nope'"),
        (BASE, ["config.limits.max_headers=4"], "limits.max_headers", "at '/config/limits/max_headers'"),
        (BASE, ["config.admin.allow_remote_refresh=yes"], "admin.allow_remote_refresh", "got string, want boolean"),
        (
            with_route(auth={"type": "key", "primary_fil": "/var/run/secrets/aml-auth-proxy/primaryKey"}),
            [],
            "routes[0].auth.primary_fil",
            "at '/config/routes/0/auth': additional properties 'primary_fil' not allowed",
        ),
        (
            with_route(timeouts={"read": 0}),
            [],
            "routes[0].timeouts.read",
            "at '/config/routes/0/timeouts/read': minimum: got 0, want 0.001",
        ),
        (
            with_route(auth={"type": "basic", "primary_file": "/var/run/secrets/aml-auth-proxy/primaryKey"}),
            [],
            "routes[0].auth.type",
            "at '/config/routes/0/auth/type': value must be one of 'key', 'aml-keys'",
        ),
    ],
)
def test_a_value_the_proxy_refuses_is_refused_by_helm_naming_the_key(
    tmp_path: Path, values: Obj, set_args: list[str], proxy_key: str, helm_message: str
) -> None:
    config = json.loads(json.dumps(values["config"]))
    for item in set_args:
        dotted, text = item.removeprefix("config.").split("=", 1)
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = set_value(text)
    with pytest.raises(ConfigError) as refused:
        parse(config, {})
    assert any(line.startswith(f"{proxy_key}: ") for line in refused.value.problems), refused.value.problems

    result = helm_template(tmp_path, values, *set_args)
    assert result.returncode != 0, result.stdout
    assert "values don't meet the specifications of the schema" in result.stderr
    assert helm_message in result.stderr, result.stderr
