"""The Helm chart, checked by the real tools.

Every `ci/*-values.yaml` is linted (`helm lint --strict`) and rendered once (`helm template`, cached per file);
every rendered object is validated offline against the Kubernetes 1.30 schemas (kubernetes-validate, strict), or
structurally when it is a Prometheus Operator object; the rendered proxy config is accepted by the proxy's own
`check-config`. Bad values are rejected by values.schema.json or by the chart's `fail` messages, and the named
template `aml-auth-proxy.sidecar` is rendered from a parent chart that depends on this one.
"""

from __future__ import annotations

import atexit
import base64
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.tools import ROOT, proxy_cli, tool

CHART = ROOT / "charts" / "aml-auth-proxy"
CI_DIR = CHART / "ci"
CI_FILES = sorted(p.name for p in CI_DIR.glob("*-values.yaml"))
RELEASE = "demo"
NAMESPACE = "scoring"
FULLNAME = f"{RELEASE}-aml-auth-proxy"
KUBE_VERSION = "1.30.0"  # the version rendered for (unless a ci file names another) and validated against
ADMIN_PORT = 9090
PROXY_CONFIG_PATH = "/etc/aml-auth-proxy/config.yaml"
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
HELM_HOME = Path(tempfile.mkdtemp(prefix="aml-auth-proxy-helm-home-"))
atexit.register(shutil.rmtree, HELM_HOME, ignore_errors=True)

Obj = dict[str, Any]

# A valid standalone install; bad-values cases change one thing on top of it.
BASE: Obj = {
    "app": {"image": "registry.example.com/scoring-client:1.0.0", "ports": [{"name": "http", "containerPort": 8000}]},
    "config": {
        "routes": [
            {
                "name": "scoring",
                "upstream": "https://my-endpoint.eastus.inference.ml.azure.com",
                "auth": {"type": "key", "primary_file": "/var/run/secrets/aml-auth-proxy/primaryKey"},
            }
        ]
    },
    "secrets": {"existingSecret": "scoring-endpoint-keys"},
}


# --- running helm --------------------------------------------------------------------------------------------


def helm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real helm, with its config, cache and data kept in a throwaway directory."""
    env = {
        **os.environ,
        "HELM_CONFIG_HOME": str(HELM_HOME / "config"),
        "HELM_CACHE_HOME": str(HELM_HOME / "cache"),
        "HELM_DATA_HOME": str(HELM_HOME / "data"),
    }
    return subprocess.run(
        [tool("helm"), *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd, check=False
    )


def kube_version_of(ci_file: str) -> str:
    """The version a ci file asks for in a `# kube-version: X` comment, else KUBE_VERSION."""
    found = re.search(r"^# kube-version:\s*(\S+)", (CI_DIR / ci_file).read_text(), re.MULTILINE)
    return found.group(1) if found else KUBE_VERSION


def parse_manifests(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def template(values_files: list[Path], *, kube_version: str = KUBE_VERSION) -> subprocess.CompletedProcess[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube_version]
    for path in values_files:
        args += ["-f", str(path)]
    return helm(*args)


@functools.cache
def render_ci(ci_file: str) -> tuple[Obj, ...]:
    """Render one ci values file (once per session)."""
    result = template([CI_DIR / ci_file], kube_version=kube_version_of(ci_file))
    assert result.returncode == 0, f"helm template -f ci/{ci_file} failed:\n{result.stderr}"
    return tuple(parse_manifests(result.stdout))


def deep_merge(base: Obj, override: Obj) -> Obj:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@functools.cache
def _render_json(values_json: str, kube_version: str) -> subprocess.CompletedProcess[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(json.loads(values_json), fh)
    try:
        return template([Path(fh.name)], kube_version=kube_version)
    finally:
        os.unlink(fh.name)


def render_values(values: Obj, *, kube_version: str = KUBE_VERSION) -> subprocess.CompletedProcess[str]:
    """Render with these values (on top of the chart defaults); cached, the result is not checked."""
    return _render_json(json.dumps(values, sort_keys=True), kube_version)


def render_ok(values: Obj, *, kube_version: str = KUBE_VERSION) -> list[Obj]:
    result = render_values(values, kube_version=kube_version)
    assert result.returncode == 0, result.stderr
    return parse_manifests(result.stdout)


# --- picking things out of rendered objects ------------------------------------------------------------------


def find(objs: tuple[Obj, ...] | list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: tuple[Obj, ...] | list[Obj], kind: str, name: str | None = None) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_spec(objs: tuple[Obj, ...] | list[Obj]) -> Obj:
    spec: Obj = one(objs, "Deployment")["spec"]["template"]["spec"]
    return spec


def all_containers(spec: Obj) -> Iterator[Obj]:
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def proxy_container(spec: Obj) -> Obj:
    found = [c for c in all_containers(spec) if c["name"] == "aml-auth-proxy"]
    assert len(found) == 1, [c["name"] for c in all_containers(spec)]
    return found[0]


def proxy_config(objs: tuple[Obj, ...] | list[Obj]) -> str:
    text: str = one(objs, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"]
    return text


def pod_specs_everywhere(objs: tuple[Obj, ...] | list[Obj]) -> Iterator[Obj]:
    for obj in objs:
        if obj["kind"] == "Deployment":
            yield obj["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            yield obj["spec"]


# The ci files that turn on a feature calling the Kubernetes API (and so get a Role and the API token).
KUBE_API_FILES = ("secret-watch-values.yaml", "events-values.yaml", "share-values.yaml")

STANDALONE_FILES = [
    f for f in CI_FILES if (yaml.safe_load((CI_DIR / f).read_text()) or {}).get("standalone", {}).get("enabled", True)
]


# --- every ci file: lint, render, validate, check-config -----------------------------------------------------


def test_there_is_a_ci_values_file_per_feature() -> None:
    expected = {
        "default-values.yaml",
        "native-sidecar-values.yaml",
        "legacy-sidecar-values.yaml",
        "existing-secret-values.yaml",
        "chart-secret-values.yaml",
        "workload-identity-values.yaml",
        "networkpolicy-values.yaml",
        "pdb-values.yaml",
        "servicemonitor-values.yaml",
        "podmonitor-values.yaml",
        "token-auth-values.yaml",
        "monitoring-values.yaml",
        "sidecar-only-values.yaml",
        *KUBE_API_FILES,
    }
    assert expected <= set(CI_FILES)


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_helm_lint_strict_passes(ci_file: str) -> None:
    result = helm(
        "lint", "--strict", str(CHART), "-f", str(CI_DIR / ci_file), "--kube-version", kube_version_of(ci_file)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_every_rendered_object_is_valid_kubernetes_1_30(ci_file: str) -> None:
    objs = render_ci(ci_file)
    assert objs
    for obj in objs:
        where = f"ci/{ci_file}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        assert obj["metadata"]["name"].startswith(RELEASE), where
        if obj["kind"] in CRD_KINDS:
            check_prometheus_operator_object(obj, where)
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {'/'.join(map(str, exc.path))}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}")


DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_prometheus_operator_object(obj: Obj, where: str) -> None:
    """kubernetes-validate has no schema for Prometheus Operator CRDs: check their shape here."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1", where
    # The metadata is ordinary ObjectMeta: validate it as such.
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, KUBE_VERSION, strict=True
    )
    assert DNS_1123.match(obj["metadata"]["name"]) and len(obj["metadata"]["name"]) <= 63, where
    assert obj["metadata"]["namespace"] == NAMESPACE, where
    spec = obj["spec"]
    if obj["kind"] in ("ServiceMonitor", "PodMonitor"):
        endpoints_key = "endpoints" if obj["kind"] == "ServiceMonitor" else "podMetricsEndpoints"
        assert set(spec) <= {"selector", "namespaceSelector", endpoints_key, "jobLabel"}, where
        assert spec["selector"]["matchLabels"], where
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}, where
        assert spec[endpoints_key], where
        for endpoint in spec[endpoints_key]:
            assert isinstance(endpoint["port"], str) and endpoint["port"], where
            assert endpoint["path"] == "/metrics", where
            for key in ("interval", "scrapeTimeout"):
                if key in endpoint:
                    assert DURATION.match(endpoint[key]), f"{where}: {key} {endpoint[key]!r}"
            for key in ("relabelings", "metricRelabelings"):
                assert isinstance(endpoint.get(key, []), list), where
    else:
        assert set(spec) == {"groups"}, where
        assert spec["groups"], where
        for group in spec["groups"]:
            assert group["name"] and group["rules"], where
            for rule in group["rules"]:
                assert ("alert" in rule) != ("record" in rule), f"{where}: {rule}"
                assert isinstance(rule["expr"], str | int) and str(rule["expr"]).strip(), f"{where}: {rule}"
                if "for" in rule:
                    assert DURATION.match(rule["for"]), f"{where}: {rule}"


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_rendered_proxy_config_passes_the_proxys_own_check(ci_file: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(proxy_config(render_ci(ci_file)))
    # The downward API variables the chart gives the proxy, as kubelet would fill them in.
    env: dict[str, str] = {}
    for spec in pod_specs_everywhere(render_ci(ci_file)):
        for container in all_containers(spec):
            if container["name"] == "aml-auth-proxy":
                env.update({e["name"]: f"demo-{e['name'].lower()}" for e in downward_env(container)})
    result = proxy_cli("check-config", "--config", str(config), env=env)
    assert result.returncode == 0, f"ci/{ci_file}:\n{result.stderr}\n{config.read_text()}"
    assert result.stdout.startswith("config ok:")


@pytest.mark.parametrize("ci_file", STANDALONE_FILES)
def test_proxy_mounts_its_config_and_is_told_where_it_is(ci_file: str) -> None:
    spec = pod_spec(render_ci(ci_file))
    proxy = proxy_container(spec)
    assert proxy["args"] == ["run", "--config", PROXY_CONFIG_PATH]
    assert "command" not in proxy  # the image's ENTRYPOINT is aml-auth-proxy
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    assert mounts["aml-auth-proxy-config"]["mountPath"] == str(Path(PROXY_CONFIG_PATH).parent)
    assert mounts["aml-auth-proxy-tmp"]["mountPath"] == "/tmp"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["aml-auth-proxy-config"]["configMap"]["name"] == f"{FULLNAME}-config"
    assert "emptyDir" in volumes["aml-auth-proxy-tmp"]
    for mount in proxy["volumeMounts"]:
        assert mount["name"] in volumes


def test_notes_render_for_standalone_and_sidecar_mode() -> None:
    for ci_file, expected in (
        ("default-values.yaml", "calls the proxy at http://127.0.0.1:8080"),
        ("sidecar-only-values.yaml", 'include "aml-auth-proxy.sidecar"'),
        ("chart-secret-values.yaml", "for development"),
    ):
        result = helm("install", "--dry-run=client", RELEASE, str(CHART), "-f", str(CI_DIR / ci_file))
        assert result.returncode == 0, result.stderr
        notes = result.stdout.split("NOTES:", 1)[1]
        assert expected in notes, notes


def install_notes(ci_file: str, *set_values: str) -> str:
    args = [f"--set={v}" for v in set_values]
    result = helm("install", "--dry-run=client", RELEASE, str(CHART), "-f", str(CI_DIR / ci_file), *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


QUIT_CALL = f"curl -fsS -X POST http://127.0.0.1:{ADMIN_PORT}/quitquitquit"


@pytest.mark.parametrize(
    ("ci_file", "native", "warned"),
    [
        ("sidecar-only-values.yaml", "false", True),  # what `auto` gives before Kubernetes 1.29
        ("sidecar-only-values.yaml", "true", False),  # kubelet stops a native sidecar after the app
        ("default-values.yaml", "false", False),  # the chart's own Deployment is no Job
    ],
)
def test_notes_warn_that_a_job_with_a_plain_container_proxy_must_ask_it_to_quit(
    ci_file: str, native: str, warned: bool
) -> None:
    notes = install_notes(ci_file, f"sidecar.native={native}")
    assert (QUIT_CALL in notes) is warned, notes
    if warned:
        assert "Job" in notes and "never completes" in notes
    moved = install_notes(ci_file, f"sidecar.native={native}", "config.admin.port=9191")
    assert ("http://127.0.0.1:9191/quitquitquit" in moved) is warned


# --- schema and fail messages ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"resources": {"limitz": {}}}, "at '/resources': additional properties 'limitz' not allowed"),
        ({"podDisruptionBuget": {"enabled": True}}, "additional properties 'podDisruptionBuget' not allowed"),
        ({"sidecar": {"native": "maybe"}}, "at '/sidecar/native': value must be one of 'auto', true, false"),
        ({"standalone": {"replicas": "two"}}, "at '/standalone/replicas': got string, want integer"),
        ({"config": {"log_level": "verbose"}}, "at '/config/log_level': value must be one of 'debug', 'info'"),
        ({"config": {"admin": {"port": 70000}}}, "at '/config/admin/port'"),
        ({"config": {"routes": [{"name": "no-upstream"}]}}, "at '/config/routes/0': missing property 'upstream'"),
        ({"workloadIdentity": {"clientId": "not-a-guid"}}, "at '/workloadIdentity/clientId': 'not-a-guid' does not"),
        ({"secrets": {"data": {"primaryKey": 12345}}}, "at '/secrets/data/primaryKey': got number, want string"),
        ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "at '/metrics/serviceMonitor/interval'"),
        ({"probes": {"startup": {"path": "/metrics"}}}, "at '/probes/startup/path': value must be one of"),
        ({"prometheusRule": {"thresholds": {"upstream5xxRatio": 5}}}, "at '/prometheusRule/thresholds/upstream5x"),
        ({"grafanaDashboard": {"label": {}}}, "at '/grafanaDashboard': additional properties 'label' not allowed"),
        ({"podDisruptionBudget": {"minAvailable": "half"}}, "at '/podDisruptionBudget/minAvailable'"),
        ({"config": {"kubernetes": {"events": True}}}, "at '/config/kubernetes': additional properties 'events'"),
        ({"rbac": {"extraSecretNames": ["Bad_Name"]}}, "at '/rbac/extraSecretNames/0'"),
        ({"events": {"enabled": "yes"}}, "at '/events/enabled': got string, want boolean"),
    ],
)
def test_schema_rejects_bad_values_with_a_readable_message(values: Obj, message: str) -> None:
    result = render_values(deep_merge(BASE, values))
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("values", "kube_version", "message"),
    [
        (
            {"sidecar": {"native": True}},
            "1.27.0",
            "sidecar.native is true but the cluster is Kubernetes v1.27.0: native sidecars need 1.28 or newer",
        ),
        (
            {"secrets": {"existingSecret": "keys", "create": True, "data": {"primaryKey": "k"}}},
            KUBE_VERSION,
            "secrets.existingSecret and secrets.create are both set",
        ),
        (
            {"secrets": {"existingSecret": "", "create": True}},
            KUBE_VERSION,
            "secrets.create is true but secrets.data is empty",
        ),
        (
            {"secrets": {"data": {"primaryKey": "k"}}},
            KUBE_VERSION,
            "secrets.data is set but secrets.create is false",
        ),
        (
            {"workloadIdentity": {"enabled": True}},
            KUBE_VERSION,
            "workloadIdentity.enabled is true but workloadIdentity.clientId is empty",
        ),
        (
            {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
            KUBE_VERSION,
            "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled are both true",
        ),
        (
            {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
            KUBE_VERSION,
            "metrics.serviceMonitor.enabled needs metrics.service.enabled",
        ),
        (
            {"podDisruptionBudget": {"enabled": True, "minAvailable": 1, "maxUnavailable": 1}},
            KUBE_VERSION,
            "podDisruptionBudget.minAvailable and podDisruptionBudget.maxUnavailable are both set",
        ),
        (
            {"podDisruptionBudget": {"enabled": True}, "standalone": {"enabled": False}},
            KUBE_VERSION,
            "podDisruptionBudget.enabled needs standalone.enabled",
        ),
        ({"config": {"routes": []}}, KUBE_VERSION, "config.routes is empty"),
        ({"app": {"image": ""}}, KUBE_VERSION, "app.image is required in standalone mode"),
        ({"config": {"admin": {"host": "127.0.0.1"}}}, KUBE_VERSION, "config.admin.host is 127.0.0.1"),
        (
            {"config": {"admin": {"port": 8080}}},
            KUBE_VERSION,
            "config.admin.port and config.listen.port are both 8080",
        ),
        (
            {"app": {"ports": [{"name": "http", "containerPort": 9090}]}},
            KUBE_VERSION,
            "app.ports[0].containerPort 9090 is taken by the proxy",
        ),
        (
            {"app": {"ports": []}},
            KUBE_VERSION,
            "standalone.service.enabled is true but app.ports is empty",
        ),
        (
            {"standalone": {"terminationGracePeriodSeconds": 25}},
            KUBE_VERSION,
            "standalone.terminationGracePeriodSeconds (25) must be greater than sidecar.preStopSeconds + "
            "config.shutdown_grace_seconds (30)",
        ),
        (
            {
                "sidecar": {
                    "extraEnv": [
                        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "primaryKey"}}}
                    ]
                }
            },
            KUBE_VERSION,
            "sidecar.extraEnv[0] (TOKEN) reads a Secret into an environment variable",
        ),
        (
            {"events": {"enabled": True}, "sidecar": {"extraEnv": [{"name": "POD_NAME", "value": "x"}]}},
            KUBE_VERSION,
            "sidecar.extraEnv[0] sets POD_NAME, which the chart already sets from the downward API",
        ),
        (
            {"secrets": {"existingSecret": ""}},
            KUBE_VERSION,
            "config.routes[0].auth.primary_file (/var/run/secrets/aml-auth-proxy/primaryKey) is under "
            "secrets.mountPath but no Secret is mounted",
        ),
        (
            {"secrets": {"existingSecret": "", "create": True, "data": {"primary": "k"}}},
            KUBE_VERSION,
            'names "primaryKey", which is not a key of secrets.data',
        ),
        # The API server refuses a container whose limit is below its request; the chart says so first.
        (
            {"resources": {"limits": {"memory": "64Mi"}}},  # the default request is 96Mi
            KUBE_VERSION,
            "resources.limits.memory (64Mi) is below resources.requests.memory (96Mi)",
        ),
        (
            {"resources": {"limits": {"cpu": "40m"}}},  # the default request is 50m
            KUBE_VERSION,
            "resources.limits.cpu (40m) is below resources.requests.cpu (50m)",
        ),
        (
            {"resources": {"requests": {"memory": "1Gi"}, "limits": {"memory": "1000Mi"}}},
            KUBE_VERSION,
            "resources.limits.memory (1000Mi) is below resources.requests.memory (1Gi)",
        ),
        (
            {"resources": {"requests": {"memory": "1G"}, "limits": {"memory": "999M"}}},
            KUBE_VERSION,
            "resources.limits.memory (999M) is below resources.requests.memory (1G)",
        ),
        (
            {"resources": {"requests": {"memory": "2Ki"}, "limits": {"memory": 2047}}},
            KUBE_VERSION,
            "resources.limits.memory (2047) is below resources.requests.memory (2Ki)",
        ),
        (
            {"resources": {"requests": {"cpu": 1}, "limits": {"cpu": "999m"}}},
            KUBE_VERSION,
            "resources.limits.cpu (999m) is below resources.requests.cpu (1)",
        ),
        (
            {"resources": {"requests": {"cpu": "1500m"}, "limits": {"cpu": 1.25}}},
            KUBE_VERSION,
            "resources.limits.cpu (1.25) is below resources.requests.cpu (1500m)",
        ),
        (
            {"resources": {"limits": {"memory": "256 MB"}}},
            KUBE_VERSION,
            'resources.limits.memory ("256 MB") is not a Kubernetes quantity',
        ),
    ],
)
def test_contradictory_values_fail_with_a_clear_message(values: Obj, kube_version: str, message: str) -> None:
    result = render_values(deep_merge(BASE, values), kube_version=kube_version)
    assert result.returncode != 0, result.stdout
    assert "execution error" in result.stderr
    assert message in result.stderr, result.stderr


def test_base_values_used_by_the_failure_cases_render() -> None:
    assert find(render_ok(BASE), "Deployment")


# --- native and plain sidecars -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("native", "kube_version", "expect_native"),
    [
        ("auto", "1.30.0", True),
        ("auto", "1.29.0", True),
        ("auto", "1.28.5", False),
        ("auto", "1.27.0", False),
        (True, "1.28.0", True),
        (False, "1.33.0", False),
        ("false", "1.30.0", False),
    ],
)
def test_native_sidecar_follows_the_setting_and_the_cluster_version(
    native: str | bool, kube_version: str, expect_native: bool
) -> None:
    spec = pod_spec(render_ok(deep_merge(BASE, {"sidecar": {"native": native}}), kube_version=kube_version))
    init_names = [c["name"] for c in spec.get("initContainers", [])]
    names = [c["name"] for c in spec["containers"]]
    if expect_native:
        assert init_names == ["aml-auth-proxy"]
        assert names == ["app"]
        assert spec["initContainers"][0]["restartPolicy"] == "Always"
    else:
        assert init_names == []
        assert names == ["aml-auth-proxy", "app"]  # the proxy starts first
        assert "restartPolicy" not in spec["containers"][0]


def test_native_sidecar_file_renders_an_init_container_with_restart_always_and_a_startup_probe() -> None:
    spec = pod_spec(render_ci("native-sidecar-values.yaml"))
    (proxy,) = spec["initContainers"]
    assert proxy["name"] == "aml-auth-proxy"
    assert proxy["restartPolicy"] == "Always"
    assert proxy["startupProbe"]["httpGet"] == {"path": "/readyz", "port": ADMIN_PORT}
    assert "lifecycle" not in proxy  # kubelet stops a native sidecar after the app: no preStop wait needed
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert spec["containers"][0]["image"] == "registry.example.com/scoring-client:1.0.0"


def test_legacy_sidecar_file_renders_a_plain_container_with_a_prestop_wait() -> None:
    objs = render_ci("legacy-sidecar-values.yaml")
    spec = pod_spec(objs)
    assert "initContainers" not in spec
    proxy = spec["containers"][0]
    assert proxy["name"] == "aml-auth-proxy"
    assert "restartPolicy" not in proxy
    assert proxy["lifecycle"]["preStop"]["exec"]["command"] == ["/bin/sh", "-c", "sleep 15"]
    assert [c["name"] for c in spec["containers"]] == ["aml-auth-proxy", "app"]
    grace = yaml.safe_load(proxy_config(objs))["shutdown_grace_seconds"]
    assert spec["terminationGracePeriodSeconds"] == 60 > 15 + grace


def test_termination_grace_defaults_to_prestop_plus_proxy_grace_plus_margin() -> None:
    spec = pod_spec(render_ci("default-values.yaml"))
    assert spec["terminationGracePeriodSeconds"] == 10 + 20 + 10
    values = deep_merge(BASE, {"sidecar": {"preStopSeconds": 5}, "config": {"shutdown_grace_seconds": 2.5}})
    assert pod_spec(render_ok(values))["terminationGracePeriodSeconds"] == 5 + 3 + 10


# --- hardening, probes, resources ------------------------------------------------------------------------------


@pytest.mark.parametrize("ci_file", STANDALONE_FILES)
def test_proxy_container_and_pod_are_hardened(ci_file: str) -> None:
    spec = pod_spec(render_ci(ci_file))
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 10001 and pod["runAsGroup"] == 10001
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    proxy = proxy_container(spec)
    sc = proxy["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001 and sc["runAsGroup"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert proxy["resources"] == {
        "requests": {"cpu": "50m", "memory": "96Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    }
    assert spec["automountServiceAccountToken"] is (ci_file in KUBE_API_FILES)


@pytest.mark.parametrize(
    ("requests", "limits"),
    [
        ({"memory": "96Mi"}, {"memory": "96Mi"}),
        ({"memory": "1G"}, {"memory": "1Gi"}),  # 1e9 < 2^30
        ({"memory": "100663296"}, {"memory": "96Mi"}),
        ({"memory": "0.5Gi"}, {"memory": "512Mi"}),
        ({"memory": "1000M"}, {"memory": "1G"}),
        ({"memory": "64Mi"}, {"memory": "65536Ki"}),
        ({"cpu": "500m"}, {"cpu": "0.5"}),
        ({"cpu": "1"}, {"cpu": "1000m"}),
        ({"cpu": "250m"}, {"cpu": 1}),
        ({"cpu": 0.1}, {"cpu": "100m"}),
        ({"cpu": "50m"}, {}),  # no limit: nothing to compare
    ],
)
def test_limits_at_or_above_their_requests_render(requests: Obj, limits: Obj) -> None:
    unset = {"cpu": None, "memory": None}  # null removes the chart's default
    values = deep_merge(BASE, {"resources": {"requests": {**unset, **requests}, "limits": {**unset, **limits}}})
    objs = render_ok(values)
    validate_all(objs)
    resources = proxy_container(pod_spec(objs))["resources"]
    assert resources["requests"] == requests and resources.get("limits", {}) == limits


def workers_of(objs: tuple[Obj, ...] | list[Obj]) -> Any:
    return yaml.safe_load(proxy_config(objs)).get("workers")


@pytest.mark.parametrize(
    ("cpu_limit", "workers", "expected"),
    [
        ("500m", None, 1),  # the default limit
        ("1", None, 1),
        ("1001m", None, 2),
        ("1500m", None, 2),
        (2, None, 2),
        ("2.5", None, 3),
        ("4000m", 0, 4),  # 0 is auto: the chart decides
        (None, None, 1),  # no CPU limit: one process, not one per CPU of the node
        (None, 0, 1),
        ("4", 2, 2),  # the user's own number wins
        (None, 3, 3),
    ],
)
def test_workers_follow_the_cpu_limit_unless_set(
    cpu_limit: str | int | None, workers: int | None, expected: int
) -> None:
    values = deep_merge(BASE, {"resources": {"limits": {"cpu": cpu_limit}}})
    if workers is not None:
        values["config"]["workers"] = workers
    objs = render_ok(values)
    assert workers_of(objs) == expected
    assert proxy_container(pod_spec(objs))["resources"].get("limits", {}).get("cpu") == cpu_limit
    for ci_file in ("default-values.yaml", "sidecar-only-values.yaml"):
        assert workers_of(render_ci(ci_file)) == 1  # the default limit, 500m


@pytest.mark.parametrize("ci_file", STANDALONE_FILES)
def test_probes_point_at_the_admin_port(ci_file: str) -> None:
    objs = render_ci(ci_file)
    proxy = proxy_container(pod_spec(objs))
    assert yaml.safe_load(proxy_config(objs))["admin"] == {"host": "0.0.0.0", "port": ADMIN_PORT}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": ADMIN_PORT}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": ADMIN_PORT}
    assert proxy["startupProbe"]["httpGet"]["port"] == ADMIN_PORT
    assert proxy["startupProbe"]["httpGet"]["path"] in ("/healthz", "/readyz")
    assert proxy["ports"] == [{"name": "proxy-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}]


def test_probes_follow_a_moved_admin_port() -> None:
    objs = render_ok(deep_merge(BASE, {"config": {"admin": {"port": 9191}}}))
    proxy = proxy_container(pod_spec(objs))
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert proxy[probe]["httpGet"]["port"] == 9191
    assert one(objs, "Service", f"{FULLNAME}-metrics")["spec"]["ports"][0]["port"] == 9191


def test_helm_test_hook_asks_readyz_of_the_metrics_service_and_is_hardened() -> None:
    objs = render_ci("default-values.yaml")
    pod = one(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert container["image"].startswith("busybox:")
    script = " ".join(container["command"])
    assert f"http://{FULLNAME}-metrics:{ADMIN_PORT}/readyz" in script
    assert "wget" in script
    service = one(objs, "Service", f"{FULLNAME}-metrics")
    assert service["spec"]["ports"][0]["port"] == ADMIN_PORT
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert not find(render_ci("podmonitor-values.yaml"), "Pod")  # no metrics Service, no test pod


# --- config, secrets, checksum ---------------------------------------------------------------------------------


def secret_values(objs: tuple[Obj, ...] | list[Obj]) -> list[str]:
    values: list[str] = []
    for secret in find(objs, "Secret"):
        values += [base64.b64decode(v).decode() for v in secret.get("data", {}).values()]
        values += list(secret.get("stringData", {}).values())
    return values


def string_leaves(node: Any) -> Iterator[str]:
    """Every string in an object (keys included), and the base64 decoding of any that decodes."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from string_leaves(key)
            yield from string_leaves(value)
    elif isinstance(node, list):
        for item in node:
            yield from string_leaves(item)
    elif isinstance(node, str):
        yield node
        try:
            yield base64.b64decode(node, validate=True).decode()
        except ValueError:
            pass


def test_chart_secret_values_appear_only_in_the_secret() -> None:
    objs = render_ci("chart-secret-values.yaml")
    data = yaml.safe_load((CI_DIR / "chart-secret-values.yaml").read_text())["secrets"]["data"]
    secret = one(objs, "Secret", f"{FULLNAME}-secrets")
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == data
    for obj in objs:
        if obj is secret:
            continue
        for text in string_leaves(obj):
            for value in data.values():
                assert value not in text, f"a secret value is in {obj['kind']}/{obj['metadata']['name']}"
    # The routes read them as files from the mounted Secret.
    spec = pod_spec(objs)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["aml-auth-proxy-secrets"]["secret"]["secretName"] == f"{FULLNAME}-secrets"
    mount = {m["name"]: m for m in proxy_container(spec)["volumeMounts"]}["aml-auth-proxy-secrets"]
    assert mount == {"name": "aml-auth-proxy-secrets", "mountPath": "/var/run/secrets/aml-auth-proxy", "readOnly": True}
    config = proxy_config(objs)
    for name in data:
        assert f"/var/run/secrets/aml-auth-proxy/{name}" in config


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_no_secret_value_in_any_configmap_or_env_var(ci_file: str) -> None:
    objs = render_ci(ci_file)
    secrets = secret_values(objs)
    for cm in find(objs, "ConfigMap"):
        text = yaml.safe_dump(cm)
        for value in secrets:
            assert value not in text, f"ci/{ci_file}: a secret value is in ConfigMap {cm['metadata']['name']}"
    for spec in pod_specs_everywhere(objs):
        for container in all_containers(spec):
            for env in container.get("env", []):
                assert "secretKeyRef" not in env.get("valueFrom", {}), f"ci/{ci_file}: {container['name']} {env}"
                assert not any(value in str(env.get("value", "")) for value in secrets)
            for env_from in container.get("envFrom", []):
                assert "secretRef" not in env_from, f"ci/{ci_file}: {container['name']} {env_from}"


def test_existing_secret_is_mounted_read_only_with_its_items() -> None:
    objs = render_ci("existing-secret-values.yaml")
    assert not find(objs, "Secret")
    spec = pod_spec(objs)
    volume = {v["name"]: v for v in spec["volumes"]}["aml-auth-proxy-secrets"]["secret"]
    assert volume["secretName"] == "aml-credentials"
    assert volume["defaultMode"] == 0o440
    assert {i["path"] for i in volume["items"]} >= {"mlserver/username", "mlserver/password"}
    assert spec["securityContext"]["fsGroup"] == 10001  # the non-root proxy reads the 0440 files through it
    mounts = {m["name"]: m for m in proxy_container(spec)["volumeMounts"]}
    assert mounts["aml-auth-proxy-secrets"]["readOnly"] is True


def test_no_secret_volume_without_a_secret() -> None:
    spec = pod_spec(render_ci("token-auth-values.yaml"))
    assert "aml-auth-proxy-secrets" not in {v["name"] for v in spec["volumes"]}
    assert "aml-auth-proxy-secrets" not in {m["name"] for m in proxy_container(spec)["volumeMounts"]}


def checksum(objs: list[Obj] | tuple[Obj, ...]) -> str:
    value: str = one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    return value


def test_checksum_config_changes_when_the_config_changes_and_only_then() -> None:
    base = checksum(render_ok(BASE))
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum(render_ok(deep_merge(BASE, {"config": {"log_level": "debug"}}))) != base
    routes = copy.deepcopy(BASE["config"]["routes"])
    routes[0]["region"] = "westeurope"
    assert checksum(render_ok(deep_merge(BASE, {"config": {"routes": routes}}))) != base
    assert checksum(render_ok(deep_merge(BASE, {"standalone": {"replicas": 3}}))) == base
    assert checksum(render_ok(deep_merge(BASE, {"app": {"image": "registry.example.com/other:2"}}))) == base


def test_config_map_holds_the_config_values_and_routes_as_they_are() -> None:
    objs = render_ci("token-auth-values.yaml")
    config = yaml.safe_load(proxy_config(objs))
    values = yaml.safe_load((CI_DIR / "token-auth-values.yaml").read_text())
    assert config["routes"] == values["config"]["routes"]
    assert config["listen"] == {"host": "127.0.0.1", "port": 8080}
    assert config["shutdown_grace_seconds"] == 20
    assert config["log_level"] == "info"
    big = deep_merge(BASE, {"config": {"routes": [{**BASE["config"]["routes"][0], "retry_buffer_bytes": 10485760}]}})
    assert "retry_buffer_bytes: 10485760" in proxy_config(render_ok(big))  # never 1.048576e+07


# --- service account and workload identity ---------------------------------------------------------------------


def test_service_account_token_is_not_mounted_by_default() -> None:
    objs = render_ci("default-values.yaml")
    sa = one(objs, "ServiceAccount", FULLNAME)
    assert sa["automountServiceAccountToken"] is False
    assert pod_spec(objs)["serviceAccountName"] == FULLNAME
    assert pod_spec(objs)["automountServiceAccountToken"] is False
    assert "azure.workload.identity/use" not in one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    opted_in = render_ok(deep_merge(BASE, {"serviceAccount": {"automountToken": True}}))
    assert pod_spec(opted_in)["automountServiceAccountToken"] is True


def test_workload_identity_annotates_the_service_account_and_labels_the_pod() -> None:
    objs = render_ci("workload-identity-values.yaml")
    sa = one(objs, "ServiceAccount", FULLNAME)
    assert sa["metadata"]["annotations"] == {
        "azure.workload.identity/client-id": "0b4a3c2d-1e5f-4a6b-8c7d-9e0f1a2b3c4d",
        "azure.workload.identity/tenant-id": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "example.com/owner": "scoring-team",
    }
    assert sa["automountServiceAccountToken"] is False  # the webhook projects its own token
    template = one(objs, "Deployment")["spec"]["template"]
    assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert template["spec"]["automountServiceAccountToken"] is False


def test_existing_service_account_is_used_by_name() -> None:
    objs = render_ok(deep_merge(BASE, {"serviceAccount": {"create": False, "name": "scoring-sa"}}))
    assert not find(objs, "ServiceAccount")
    assert pod_spec(objs)["serviceAccountName"] == "scoring-sa"


# --- Kubernetes API features: RBAC, API token, downward API -------------------------------------------------------

SECRET_WATCH_RULE = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}
EVENTS_RULES = [
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
]
LEASE_RULE = {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "update"]}
LEASE_CREATE_RULE = {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]}
SHARED_SECRET_RULE = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "update"]}
SECRET_CREATE_RULE = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}
DOWNWARD_ENV = [
    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
]


def downward_env(container: Obj) -> list[Obj]:
    return [e for e in container.get("env", []) if e["name"] in ("POD_NAME", "POD_NAMESPACE")]


def named(rule: Obj, names: list[str]) -> Obj:
    return {**rule, "resourceNames": names}


def role_rules(objs: tuple[Obj, ...] | list[Obj], namespace: str = NAMESPACE) -> list[Obj]:
    """The rules of the one Role in `namespace`, after checking its RoleBinding binds it to the chart's account."""
    here = [o for o in objs if o["metadata"].get("namespace") == namespace]
    role, binding = one(here, "Role", FULLNAME), one(here, "RoleBinding", FULLNAME)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": FULLNAME}
    account = pod_spec(objs)["serviceAccountName"] if find(objs, "Deployment") else FULLNAME
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    rules: list[Obj] = role["rules"]
    return rules


def kube_config(objs: tuple[Obj, ...] | list[Obj]) -> Obj:
    config: Obj = yaml.safe_load(proxy_config(objs))["kubernetes"]
    return config


def validate_all(objs: tuple[Obj, ...] | list[Obj]) -> None:
    for obj in objs:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("ci_file", [f for f in CI_FILES if f not in KUBE_API_FILES])
def test_no_role_no_binding_and_no_api_token_without_a_kubernetes_feature(ci_file: str) -> None:
    objs = render_ci(ci_file)
    assert not find(objs, "Role") and not find(objs, "RoleBinding")
    assert kube_config(objs) == {"events": False}  # never left to POD_NAME/POD_NAMESPACE
    for spec in pod_specs_everywhere(objs):
        assert spec["automountServiceAccountToken"] is False
        for container in all_containers(spec):
            assert not downward_env(container), f"ci/{ci_file}: {container['name']}"


def test_default_values_have_every_kubernetes_feature_off() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["events"] == {"enabled": False}
    assert values["rbac"] == {"create": True, "extraSecretNames": []}
    assert values["config"]["kubernetes"] == {}
    objs = render_ok(BASE)
    assert not find(objs, "Role") and not find(objs, "RoleBinding")
    assert pod_spec(objs)["automountServiceAccountToken"] is False


def test_secret_watch_grants_get_list_watch_on_exactly_the_named_secrets() -> None:
    objs = render_ci("secret-watch-values.yaml")
    # The routes' primary/secondary refs (one Secret) and the identity's client secret, plus rbac.extraSecretNames.
    assert role_rules(objs) == [named(SECRET_WATCH_RULE, ["fraud-keys-next", "managed-sp", "scoring-endpoint-keys"])]
    spec = pod_spec(objs)
    assert spec["automountServiceAccountToken"] is True
    assert not downward_env(proxy_container(spec))  # the Secret watch needs no pod name
    assert kube_config(objs) == {"events": False}
    only_extra = render_ok(deep_merge(BASE, {"rbac": {"extraSecretNames": ["keys-b", "keys-a"]}}))
    assert role_rules(only_extra) == [named(SECRET_WATCH_RULE, ["keys-a", "keys-b"])]
    assert pod_spec(only_extra)["automountServiceAccountToken"] is True


def test_events_grant_create_patch_on_events_and_get_on_pods_and_set_the_downward_api() -> None:
    objs = render_ci("events-values.yaml")
    assert role_rules(objs) == EVENTS_RULES
    spec = pod_spec(objs)
    assert spec["automountServiceAccountToken"] is True
    proxy = proxy_container(spec)
    assert proxy["env"][:2] == DOWNWARD_ENV
    assert kube_config(objs) == {"events": True}
    for container in spec["containers"]:
        if container["name"] != "aml-auth-proxy":
            assert not downward_env(container)  # the app is left alone


def test_share_grants_the_named_leases_and_secrets_plus_create() -> None:
    objs = render_ci("share-values.yaml")
    assert role_rules(objs) == [
        named(LEASE_RULE, ["managed-token-leader", "risk-token-leader"]),
        LEASE_CREATE_RULE,
        # share.secret where set, else the proxy's default <share.lease>-token
        named(SHARED_SECRET_RULE, ["managed-token-leader-token", "risk-shared-token"]),
        SECRET_CREATE_RULE,
    ]
    spec = pod_spec(objs)
    assert spec["automountServiceAccountToken"] is True
    assert proxy_container(spec)["env"] == DOWNWARD_ENV  # the Lease holder is the pod
    assert kube_config(objs) == {"events": False}  # POD_NAME alone does not turn Events on


def test_features_together_get_each_rule_once_and_other_secrets_stay_out() -> None:
    routes = [
        {
            **BASE["config"]["routes"][0],
            "auth": {"type": "key", "primary_secret_ref": {"name": "keys", "key": "primaryKey"}},
        },
        {
            "name": "shared",
            "match": "/shared",
            "upstream": "https://managed.westeurope.inference.ml.azure.com",
            "auth": {"type": "aad", "identity": {"type": "managed"}, "refresh": {"margin_seconds": 60}},
            "share": {"lease": "shared-leader"},
        },
    ]
    values = deep_merge(BASE, {"events": {"enabled": True}, "config": {"routes": routes}})
    objs = render_ok(values)
    validate_all(objs)
    assert role_rules(objs) == [
        named(SECRET_WATCH_RULE, ["keys"]),
        *EVENTS_RULES,
        named(LEASE_RULE, ["shared-leader"]),
        LEASE_CREATE_RULE,
        named(SHARED_SECRET_RULE, ["shared-leader-token"]),
        SECRET_CREATE_RULE,
    ]
    # The mounted Secret (secrets.existingSecret) is read by kubelet, not by the proxy: not in any rule.
    assert all("scoring-endpoint-keys" not in r.get("resourceNames", []) for r in role_rules(objs))
    proxy = proxy_container(pod_spec(objs))
    assert [e["name"] for e in proxy["env"]] == ["POD_NAME", "POD_NAMESPACE"]  # once, however many features

    # Secrets and Leases in another namespace: their rules go to a Role there, Events stay in the pod's.
    elsewhere = render_ok(deep_merge(values, {"config": {"kubernetes": {"namespace": "ml-secrets"}}}))
    validate_all(elsewhere)
    assert role_rules(elsewhere) == EVENTS_RULES
    assert role_rules(elsewhere, "ml-secrets") == [r for r in role_rules(objs) if r not in EVENTS_RULES]
    assert kube_config(elsewhere) == {"namespace": "ml-secrets", "events": True}


def test_rbac_create_false_renders_no_role_but_the_feature_still_gets_its_token() -> None:
    values = deep_merge(BASE, {"events": {"enabled": True}, "rbac": {"create": False}})
    objs = render_ok(values)
    assert not find(objs, "Role") and not find(objs, "RoleBinding")
    spec = pod_spec(objs)
    assert spec["automountServiceAccountToken"] is True
    assert proxy_container(spec)["env"] == DOWNWARD_ENV


def test_role_binding_names_an_existing_service_account() -> None:
    values = deep_merge(BASE, {"events": {"enabled": True}, "serviceAccount": {"create": False, "name": "scoring-sa"}})
    objs = render_ok(values)
    binding = one(objs, "RoleBinding", FULLNAME)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "scoring-sa", "namespace": NAMESPACE}]


# --- network policy, PDB, services and monitors ----------------------------------------------------------------


def pod_labels(objs: tuple[Obj, ...] | list[Obj]) -> dict[str, str]:
    labels: dict[str, str] = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


ADMIN_RULE_PORTS = [{"port": ADMIN_PORT, "protocol": "TCP"}]
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}


def peer_admits(peer: Obj, labels: dict[str, str], namespace: str) -> bool:
    """A NetworkPolicy peer (in the release namespace) admits a pod with these labels in that namespace. The chart's
    peers use matchLabels only; a namespace carries its kubernetes.io/metadata.name label."""
    assert not any("matchExpressions" in s for s in peer.values() if isinstance(s, dict)), peer
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        ns_labels = {"kubernetes.io/metadata.name": namespace}
        if not all(ns_labels.get(k) == v for k, v in peer["namespaceSelector"].get("matchLabels", {}).items()):
            return False
    elif namespace != NAMESPACE:
        return False  # no namespaceSelector: the policy's own namespace only
    pod_selector = peer.get("podSelector", {}).get("matchLabels", {})
    return all(labels.get(k) == v for k, v in pod_selector.items())


def admin_rules(policy: Obj) -> list[Obj]:
    return [rule for rule in policy.get("ingress") or [] if rule.get("ports") == ADMIN_RULE_PORTS]


def admits_to_admin(policy: Obj, labels: dict[str, str], namespace: str) -> bool:
    rules = admin_rules(policy)
    assert all(rule.get("from") for rule in rules), "an admin rule without `from` admits everyone"
    return any(peer_admits(peer, labels, namespace) for rule in rules for peer in rule["from"])


def test_network_policy_admits_only_configured_peers_to_the_admin_port_and_limits_egress() -> None:
    objs = render_ci("networkpolicy-values.yaml")
    policy = one(objs, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels(objs))
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    admin_rule, app_rule = policy["ingress"]
    assert admin_rule["ports"] == ADMIN_RULE_PORTS
    assert {"kubernetes.io/metadata.name": "monitoring"} in [
        peer.get("namespaceSelector", {}).get("matchLabels") for peer in admin_rule["from"]
    ]
    assert app_rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    assert app_rule["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "frontend"}
    egress_ports = [(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]]
    assert egress_ports == [(53, "UDP"), (53, "TCP"), (443, "TCP"), (80, "TCP")]
    assert policy["egress"][2]["to"] == [{"ipBlock": {"cidr": "169.254.169.254/32"}}]


def test_network_policy_admits_the_helm_test_pod_and_the_scraper_to_the_admin_port() -> None:
    objs = render_ci("networkpolicy-values.yaml")
    policy = one(objs, "NetworkPolicy")["spec"]
    test_pod = one(objs, "Pod")
    test_labels = test_pod["metadata"]["labels"]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    # `helm test` asks /readyz through the metrics Service from the release namespace ...
    assert admits_to_admin(policy, test_labels, NAMESPACE)
    # ... and Prometheus scrapes from the monitoring namespace (networkPolicy.ingress.adminFrom).
    assert admits_to_admin(policy, PROMETHEUS, "monitoring")
    assert not admits_to_admin(policy, PROMETHEUS, "default")
    assert not admits_to_admin(policy, test_labels, "default")
    assert not admits_to_admin(policy, {"app": "other"}, NAMESPACE)
    # The test pod is not one of the policy's pods: its own egress (to the metrics Service) stays open.
    assert not selects(policy["podSelector"]["matchLabels"], test_labels)


def test_network_policy_without_admin_peers_has_no_open_admin_rule() -> None:
    values = deep_merge(BASE, {"networkPolicy": {"enabled": True, "ingress": {"adminFrom": []}}})
    objs = render_ok(values)
    policy = one(objs, "NetworkPolicy")["spec"]
    # An ingress rule with no `from` admits everyone: the admin port never gets one. The test pod still gets in.
    assert admits_to_admin(policy, one(objs, "Pod")["metadata"]["labels"], NAMESPACE)
    assert not admits_to_admin(policy, PROMETHEUS, "monitoring")
    no_test = one(render_ok(deep_merge(values, {"helmTest": {"enabled": False}})), "NetworkPolicy")["spec"]
    assert admin_rules(no_test) == []


def test_network_policy_never_selects_your_own_pods_in_sidecar_mode() -> None:
    # Standalone: the policy selects the chart's own Deployment pods, not every pod carrying the proxy's label.
    standalone = render_ok(deep_merge(BASE, {"networkPolicy": {"enabled": True}}))
    selector = one(standalone, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
    assert selects(selector, pod_labels(standalone))
    your_pod = {"app": "scoring-client", "aml-auth-proxy/instance": FULLNAME}  # "aml-auth-proxy.podLabels"
    assert not selects(selector, your_pod)
    # Sidecar mode: the pods are yours. A policy selecting them would deny their own ports and egress: none.
    sidecar = deep_merge(BASE, {"standalone": {"enabled": False}, "networkPolicy": {"enabled": True}})
    assert not find(render_ok(sidecar), "NetworkPolicy")


SHARED_ROUTE = {
    "name": "shared",
    "upstream": "https://managed.westeurope.inference.ml.azure.com",
    "auth": {"type": "aad", "identity": {"type": "managed"}, "refresh": {"margin_seconds": 60}},
    "share": {"lease": "shared-leader"},
}


@pytest.mark.parametrize(
    ("values", "api"),
    [
        ({}, False),
        ({"events": {"enabled": True}}, True),
        ({"rbac": {"extraSecretNames": ["keys"]}}, True),
        ({"config": {"routes": [SHARED_ROUTE]}}, True),
        ({"serviceAccount": {"automountToken": True}}, True),
    ],
    ids=["no feature", "events", "secret watch", "shared token", "automountToken"],
)
def test_network_policy_egress_reaches_the_api_server_when_a_kubernetes_feature_is_on(values: Obj, api: bool) -> None:
    objs = render_ok(deep_merge(deep_merge(BASE, {"networkPolicy": {"enabled": True}}), values))
    validate_all(objs)
    egress = one(objs, "NetworkPolicy")["spec"]["egress"]
    ports = [[(p["port"], p["protocol"]) for p in rule["ports"]] for rule in egress]
    assert ports[:2] == [[(53, "UDP"), (53, "TCP")], [(443, "TCP")]]  # DNS and HTTPS, as always
    api_rules = [rule for rule in egress if {"port": 6443, "protocol": "TCP"} in rule["ports"]]
    if not api:
        assert api_rules == []
        return
    assert api_rules == [{"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]}]
    moved = {"networkPolicy": {"egress": {"apiServer": {"ports": [6443, 16443], "cidrs": ["10.0.0.1/32"]}}}}
    objs = render_ok(deep_merge(deep_merge(deep_merge(BASE, {"networkPolicy": {"enabled": True}}), values), moved))
    validate_all(objs)
    (api_rule,) = [r for r in one(objs, "NetworkPolicy")["spec"]["egress"] if "to" in r and r not in egress]
    assert api_rule == {
        "ports": [{"port": 6443, "protocol": "TCP"}, {"port": 16443, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}],
    }


def test_pod_disruption_budget_selects_the_deployment_pods() -> None:
    objs = render_ci("pdb-values.yaml")
    pdb = one(objs, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb
    deployment = one(objs, "Deployment")
    assert pdb["selector"] == deployment["spec"]["selector"]
    assert deployment["spec"]["replicas"] == 3
    percent = render_ok(deep_merge(BASE, {"podDisruptionBudget": {"enabled": True, "minAvailable": "50%"}}))
    assert one(percent, "PodDisruptionBudget")["spec"] == {
        "selector": deployment["spec"]["selector"],
        "minAvailable": "50%",
    }


def test_common_labels_reach_the_standalone_pod_template() -> None:
    common = {"team": "scoring", "example.com/cost-center": "42"}
    objs = render_ok(deep_merge(BASE, {"commonLabels": common, "standalone": {"podLabels": {"tier": "backend"}}}))
    validate_all(objs)
    labels = pod_labels(objs)
    assert common.items() <= labels.items()
    assert labels["tier"] == "backend" and labels["aml-auth-proxy/instance"] == FULLNAME
    # The selector is immutable: it keeps the chart's two labels whatever commonLabels say.
    selector = one(objs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "aml-auth-proxy", "app.kubernetes.io/instance": RELEASE}
    assert selects(selector, labels)
    for obj in objs:
        assert common.items() <= obj["metadata"]["labels"].items(), f"{obj['kind']}/{obj['metadata']['name']}"


def test_app_service_exposes_the_app_ports_and_selects_the_pods() -> None:
    objs = render_ci("default-values.yaml")
    service = one(objs, "Service", FULLNAME)["spec"]
    assert service["ports"] == [{"name": "http", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]
    assert selects(service["selector"], pod_labels(objs))


def test_service_monitor_scrapes_the_admin_port_through_the_metrics_service() -> None:
    objs = render_ci("servicemonitor-values.yaml")
    monitor = one(objs, "ServiceMonitor", FULLNAME)
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "admin", "path": "/metrics", "scheme": "http", "interval": "15s", "scrapeTimeout": "5s"}
    services = [
        s for s in find(objs, "Service") if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in services] == [f"{FULLNAME}-metrics"]
    service = services[0]["spec"]
    assert service["ports"] == [{"name": "admin", "port": ADMIN_PORT, "targetPort": "proxy-admin", "protocol": "TCP"}]
    assert selects(service["selector"], pod_labels(objs))
    assert not find(objs, "PodMonitor")


def test_pod_monitor_scrapes_the_proxy_container_port() -> None:
    objs = render_ci("podmonitor-values.yaml")
    monitor = one(objs, "PodMonitor", FULLNAME)
    assert selects(monitor["spec"]["selector"]["matchLabels"], pod_labels(objs))
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    port_names = [p["name"] for p in proxy_container(pod_spec(objs))["ports"]]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    assert not find(objs, "ServiceMonitor")
    assert not find(objs, "Service", f"{FULLNAME}-metrics")


def test_monitors_are_off_by_default() -> None:
    kinds = {o["kind"] for o in render_ci("default-values.yaml")}
    assert not kinds & CRD_KINDS
    assert kinds == {"ServiceAccount", "ConfigMap", "Service", "Deployment", "Pod"}


def test_monitoring_values_render_with_the_monitoring_blocks_enabled() -> None:
    values = yaml.safe_load((CI_DIR / "monitoring-values.yaml").read_text())
    assert values["prometheusRule"]["enabled"] is True and values["grafanaDashboard"]["enabled"] is True
    objs = render_ci("monitoring-values.yaml")
    assert one(objs, "ServiceMonitor", FULLNAME)
    assert yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]["thresholds"] == {
        "refreshFailingFor": "5m",
        "expiringSoonSeconds": 600,
        "notReadyFor": "2m",
        "upstream5xxRatio": 0.05,
        "upstream401PerSecond": 1,
        "refreshLatencyP95Seconds": 2,
    }


def test_sidecar_only_mode_renders_no_deployment_but_the_proxys_objects() -> None:
    objs = render_ci("sidecar-only-values.yaml")
    assert {(o["kind"], o["metadata"]["name"]) for o in objs} == {
        ("ServiceAccount", FULLNAME),
        ("ConfigMap", f"{FULLNAME}-config"),
        ("Service", f"{FULLNAME}-metrics"),
        ("Pod", f"{FULLNAME}-test-readyz"),
    }


# --- the named template from a parent chart --------------------------------------------------------------------


README_PARENT_FILES = ("deployment.yaml", "job.yaml", "networkpolicy.yaml")


def readme_parent_templates() -> dict[str, str]:
    """The parent chart's templates exactly as the chart README shows them (`# templates/NAME of your chart`)."""
    readme = (CHART / "README.md").read_text()
    found = dict(re.findall(r"```yaml\n(?=# templates/(\S+) of your chart\n)(.*?)```", readme, re.DOTALL))
    missing = set(README_PARENT_FILES) - set(found)
    assert not missing, f"the chart README lost its parent-chart examples {sorted(missing)}"
    return found


# Your own workloads of other kinds, with the proxy through the named templates, as the README's Deployment does.
PARENT_STATEFULSET = """\
{{- $proxy := index .Subcharts "aml-auth-proxy" }}
{{- $native := eq (include "aml-auth-proxy.native" $proxy) "true" }}
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ .Release.Name }}-feature-store
spec:
  serviceName: feature-store
  selector:
    matchLabels:
      app.kubernetes.io/name: feature-store
  template:
    metadata:
      labels:
        app.kubernetes.io/name: feature-store
        {{- include "aml-auth-proxy.podLabels" $proxy | nindent 8 }}
    spec:
      serviceAccountName: {{ include "aml-auth-proxy.serviceAccountName" $proxy }}
      {{- if $native }}
      initContainers:
        {{- include "aml-auth-proxy.sidecar" $proxy | nindent 8 }}
      {{- end }}
      containers:
        {{- if not $native }}
        {{- include "aml-auth-proxy.sidecar" $proxy | nindent 8 }}
        {{- end }}
        - name: store
          image: registry.example.com/feature-store:1.0.0
      volumes:
        {{- include "aml-auth-proxy.volumes" $proxy | nindent 8 }}
"""
PARENT_CRONJOB = """\
{{- $proxy := index .Subcharts "aml-auth-proxy" }}
{{- $native := eq (include "aml-auth-proxy.native" $proxy) "true" }}
apiVersion: batch/v1
kind: CronJob
metadata:
  name: {{ .Release.Name }}-nightly
spec:
  schedule: "0 2 * * *"
  jobTemplate:
    spec:
      template:
        metadata:
          labels:
            app.kubernetes.io/name: nightly
            {{- include "aml-auth-proxy.podLabels" $proxy | nindent 12 }}
        spec:
          restartPolicy: OnFailure
          serviceAccountName: {{ include "aml-auth-proxy.serviceAccountName" $proxy }}
          {{- if $native }}
          initContainers:
            {{- include "aml-auth-proxy.sidecar" $proxy | nindent 12 }}
          {{- end }}
          containers:
            {{- if not $native }}
            {{- include "aml-auth-proxy.sidecar" $proxy | nindent 12 }}
            {{- end }}
            - name: nightly
              image: registry.example.com/nightly:1.0.0
          volumes:
            {{- include "aml-auth-proxy.volumes" $proxy | nindent 12 }}
"""
# The subchart's commonLabels: on the subchart's own objects, never on your pods.
PARENT_COMMON_LABELS = {"team": "scoring"}


@pytest.fixture(scope="module")
def parent_chart() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="aml-auth-proxy-parent-") as tmp:
        parent = Path(tmp) / "scoring-client"
        (parent / "templates").mkdir(parents=True)
        (parent / "Chart.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v2",
                    "name": "scoring-client",
                    "version": "1.0.0",
                    "dependencies": [{"name": "aml-auth-proxy", "version": "0.1.0", "repository": f"file://{CHART}"}],
                }
            )
        )
        (parent / "values.yaml").write_text(
            yaml.safe_dump(
                {
                    "aml-auth-proxy": {
                        "standalone": {"enabled": False},
                        "workloadIdentity": {"enabled": True, "clientId": "0b4a3c2d-1e5f-4a6b-8c7d-9e0f1a2b3c4d"},
                        "config": BASE["config"],
                        "secrets": BASE["secrets"],
                        "commonLabels": PARENT_COMMON_LABELS,
                        "networkPolicy": {"enabled": True},
                    }
                }
            )
        )
        for name, text in readme_parent_templates().items():
            (parent / "templates" / name).write_text(text)
        (parent / "templates" / "statefulset.yaml").write_text(PARENT_STATEFULSET)
        (parent / "templates" / "cronjob.yaml").write_text(PARENT_CRONJOB)
        result = helm("dependency", "update", str(parent))
        assert result.returncode == 0, result.stderr
        yield parent


def render_parent(parent: Path, *args: str, kube_version: str = KUBE_VERSION) -> list[Obj]:
    result = helm("template", "rel", str(parent), "--namespace", NAMESPACE, "--kube-version", kube_version, *args)
    assert result.returncode == 0, result.stderr
    objs = parse_manifests(result.stdout)
    validate_all(objs)
    return objs


def pod_templates(objs: list[Obj]) -> dict[str, Obj]:
    """kind/name -> the pod template of each of your workloads (not the subchart's objects)."""
    out: dict[str, Obj] = {}
    for obj in objs:
        key = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            out[key] = obj["spec"]["template"]
        elif obj["kind"] == "CronJob":
            out[key] = obj["spec"]["jobTemplate"]["spec"]["template"]
    return out


def subchart_objects(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["metadata"].get("labels", {}).get("helm.sh/chart", "").startswith("aml-auth-proxy-")]


@pytest.mark.parametrize(("kube_version", "native"), [("1.30.0", True), ("1.27.0", False)])
def test_your_pods_keep_their_own_labels_and_no_chart_policy_selects_them(
    parent_chart: Path, kube_version: str, native: bool
) -> None:
    objs = render_parent(parent_chart, kube_version=kube_version)
    templates = pod_templates(objs)
    assert set(templates) == {
        "Deployment/rel-scoring-client",
        "StatefulSet/rel-feature-store",
        "CronJob/rel-nightly",
        "Job/rel-batch-scoring",
    }
    proxy_labels = {"aml-auth-proxy/instance": "rel-aml-auth-proxy", "azure.workload.identity/use": "true"}
    chart_policies = [o for o in subchart_objects(objs) if o["kind"] == "NetworkPolicy"]
    for where, template in templates.items():
        labels = template["metadata"]["labels"]
        own = {k: v for k, v in labels.items() if k not in proxy_labels}
        # The helper adds the proxy's labels and nothing else: no app.kubernetes.io/name: aml-auth-proxy, and
        # the subchart's commonLabels stay on the subchart's objects.
        assert {k: labels[k] for k in proxy_labels} == proxy_labels, where
        assert "aml-auth-proxy" not in own.values(), f"{where}: {labels}"
        assert not PARENT_COMMON_LABELS.items() & labels.items(), f"{where}: {labels}"
        for policy in chart_policies:
            assert not selects(policy["spec"]["podSelector"].get("matchLabels", {}), labels), where
        proxy = proxy_container(template["spec"])
        assert ("restartPolicy" in proxy) is native, where
    assert templates["StatefulSet/rel-feature-store"]["metadata"]["labels"]["app.kubernetes.io/name"] == "feature-store"
    for obj in subchart_objects(objs):
        assert PARENT_COMMON_LABELS.items() <= obj["metadata"]["labels"].items()


@pytest.mark.parametrize(("kube_version", "native"), [("1.30.0", True), ("1.27.0", False)])
def test_readme_job_stops_a_plain_container_proxy_with_quitquitquit(
    parent_chart: Path, kube_version: str, native: bool
) -> None:
    objs = render_parent(parent_chart, kube_version=kube_version)
    job = one(objs, "Job", "rel-batch-scoring")["spec"]["template"]["spec"]
    assert job["restartPolicy"] in ("Never", "OnFailure")
    (app,) = [c for c in job["containers"] if c["name"] != "aml-auth-proxy"]
    script = " ".join(app.get("command", []) + app.get("args", []))
    quit_call = f"curl -fsS -X POST http://127.0.0.1:{ADMIN_PORT}/quitquitquit"
    if native:
        # kubelet stops a native sidecar once the app has exited: nothing to call.
        assert [c["name"] for c in job["initContainers"]] == ["aml-auth-proxy"]
        assert quit_call not in script
    else:
        assert [c["name"] for c in job["containers"]] == ["aml-auth-proxy", app["name"]]
        # A plain container runs until told to stop: the app asks the proxy to quit when it exits, however it exits.
        assert re.search(r"trap '" + re.escape(quit_call) + r"[^']*' EXIT", script), script


def test_your_own_network_policy_takes_the_proxys_rules_from_the_helpers(parent_chart: Path) -> None:
    objs = render_parent(parent_chart, "--set", "aml-auth-proxy.events.enabled=true")
    (policy,) = [o for o in find(objs, "NetworkPolicy") if o not in subchart_objects(objs)]
    spec = policy["spec"]
    app_labels = pod_templates(objs)["Deployment/rel-scoring-client"]["metadata"]["labels"]
    assert selects(spec["podSelector"]["matchLabels"], app_labels)
    # The proxy's admin rules: the subchart's `helm test` pod and Prometheus; your app's own ports stay yours.
    assert admits_to_admin(spec, one(objs, "Pod")["metadata"]["labels"], NAMESPACE)
    assert admits_to_admin(spec, PROMETHEUS, "monitoring")
    assert [8000] in [[p["port"] for p in rule["ports"]] for rule in spec["ingress"]]
    egress_ports = {(p["port"], p["protocol"]) for rule in spec["egress"] for p in rule["ports"]}
    assert {(53, "UDP"), (53, "TCP"), (443, "TCP"), (6443, "TCP")} <= egress_ports  # events: the API server too


@pytest.mark.parametrize(("kube_version", "native"), [("1.30.0", True), ("1.27.0", False)])
def test_sidecar_template_renders_a_container_in_a_parent_chart(
    parent_chart: Path, kube_version: str, native: bool
) -> None:
    result = helm("template", "rel", str(parent_chart), "--namespace", NAMESPACE, "--kube-version", kube_version)
    assert result.returncode == 0, result.stderr
    objs = parse_manifests(result.stdout)
    for obj in objs:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    deployment = one(objs, "Deployment", "rel-scoring-client")
    template = deployment["spec"]["template"]
    spec = template["spec"]
    if native:
        (proxy,) = spec["initContainers"]
        assert proxy["restartPolicy"] == "Always"
        assert [c["name"] for c in spec["containers"]] == ["app"]
    else:
        assert "initContainers" not in spec
        proxy = spec["containers"][0]
        assert proxy["lifecycle"]["preStop"]["exec"]["command"][:2] == ["/bin/sh", "-c"]
        assert [c["name"] for c in spec["containers"]] == ["aml-auth-proxy", "app"]
    assert proxy["name"] == "aml-auth-proxy"
    assert proxy["image"] == "ghcr.io/aml-auth-proxy/aml-auth-proxy:0.1.0"
    assert proxy["args"] == ["run", "--config", PROXY_CONFIG_PATH]
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    # The volumes point at the objects the subchart renders, named for the subchart, not the parent.
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_map = one(objs, "ConfigMap", volumes["aml-auth-proxy-config"]["configMap"]["name"])
    assert config_map["metadata"]["name"] == "rel-aml-auth-proxy-config"
    assert volumes["aml-auth-proxy-secrets"]["secret"]["secretName"] == "scoring-endpoint-keys"
    assert {m["name"] for m in proxy["volumeMounts"]} <= set(volumes)
    assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert template["metadata"]["labels"]["aml-auth-proxy/instance"] == "rel-aml-auth-proxy"
    assert re.fullmatch(r"[0-9a-f]{64}", template["metadata"]["annotations"]["checksum/config"])
    assert spec["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"] == "rel-aml-auth-proxy"
    metrics = one(objs, "Service", "rel-aml-auth-proxy-metrics")
    assert selects(metrics["spec"]["selector"], template["metadata"]["labels"])


def test_sidecar_template_in_a_parent_chart_gets_the_downward_api_and_the_api_token(
    parent_chart: Path, tmp_path: Path
) -> None:
    # As README shows it, the parent's pod takes automountServiceAccountToken from the subchart's helper.
    plain = parse_manifests(helm("template", "rel", str(parent_chart), "--namespace", NAMESPACE).stdout)
    spec = one(plain, "Deployment", "rel-scoring-client")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert not downward_env(proxy_container(spec))
    assert not find(plain, "Role")

    on = tmp_path / "on.yaml"
    on.write_text(yaml.safe_dump({"aml-auth-proxy": {"events": {"enabled": True}}}))
    result = helm("template", "rel", str(parent_chart), "--namespace", NAMESPACE, "-f", str(on))
    assert result.returncode == 0, result.stderr
    objs = parse_manifests(result.stdout)
    validate_all(objs)
    spec = one(objs, "Deployment", "rel-scoring-client")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is True
    assert proxy_container(spec)["env"] == DOWNWARD_ENV
    assert one(objs, "Role", "rel-aml-auth-proxy")["rules"] == EVENTS_RULES
    binding = one(objs, "RoleBinding", "rel-aml-auth-proxy")
    account = {"kind": "ServiceAccount", "name": spec["serviceAccountName"], "namespace": NAMESPACE}
    assert binding["subjects"] == [account]
