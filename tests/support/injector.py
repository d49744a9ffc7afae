"""The sidecar injector under test: its template rendered by the real chart, realistic pods as the API server
hands them to a mutating webhook (defaults and the service account's token volume already applied), their
AdmissionReviews, and an injector served over TLS on 127.0.0.1 with trustme certificates. Shared by
tests/test_injector*.py and bench/injector.py."""

from __future__ import annotations

import atexit
import base64
import copy
import io
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import trustme
import yaml

from proxy.injector.mutate import SidecarTemplate
from proxy.injector.server import Certificate, InjectorMetrics, InjectorServer, Settings
from tests.support.tools import ROOT, tool

Obj = dict[str, Any]

CHART = ROOT / "charts" / "aml-auth-proxy"
RELEASE, RELEASE_NAMESPACE = "demo", "aml-auth-proxy"
INJECTOR_NAMESPACE = RELEASE_NAMESPACE
APP_NAMESPACE = "ml"
TEMPLATE_CONFIGMAP = f"{RELEASE}-aml-auth-proxy-injector-template"
# A chart install with the injector on: the proxy config the chart itself renders is not used by injected pods.
CHART_VALUES: Obj = {
    "standalone": {"enabled": False},
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
    "injector": {"enabled": True},
}
_HELM_HOME = Path(tempfile.mkdtemp(prefix="aml-auth-proxy-injector-helm-"))
atexit.register(shutil.rmtree, _HELM_HOME, ignore_errors=True)


def helm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real helm, its config, cache and data in a throwaway directory; `env` added to the environment."""
    env = {
        **os.environ,
        **(env or {}),
        "HELM_CONFIG_HOME": str(_HELM_HOME / "config"),
        "HELM_CACHE_HOME": str(_HELM_HOME / "cache"),
        "HELM_DATA_HOME": str(_HELM_HOME / "data"),
    }
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=60, env=env, check=False)


def render_chart(values: Obj, *, kube_version: str = "1.30.0", show_only: str | None = None) -> list[Obj]:
    """`helm template` of the chart with these values (the release `demo` in `aml-auth-proxy`)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(values, fh)
    try:
        args = ["template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, "--kube-version", kube_version]
        args += ["-f", fh.name]
        if show_only:
            args += ["--show-only", show_only]
        result = helm(*args)
    finally:
        os.unlink(fh.name)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def template_text(values: Obj = CHART_VALUES, *, kube_version: str = "1.30.0") -> str:
    """sidecar.yaml of the chart's injector-template ConfigMap."""
    (configmap,) = render_chart(values, kube_version=kube_version, show_only="templates/injector-configmap.yaml")
    assert configmap["metadata"]["name"] == TEMPLATE_CONFIGMAP
    text: str = configmap["data"]["sidecar.yaml"]
    return text


def write_template(directory: Path, values: Obj = CHART_VALUES) -> Path:
    path = directory / "sidecar.yaml"
    path.write_text(template_text(values))
    return path


# -- pods as a mutating webhook sees them ----------------------------------------------------------------------


def _token_volume(suffix: str) -> Obj:
    """The volume the ServiceAccount admission plugin adds before any webhook runs."""
    return {
        "name": f"kube-api-access-{suffix}",
        "projected": {
            "defaultMode": 420,
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [
                            {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
                        ]
                    }
                },
            ],
        },
    }


def _container(name: str, image: str, **more: Any) -> Obj:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        **more,
    }


def _spec(**more: Any) -> Obj:
    return {
        "dnsPolicy": "ClusterFirst",
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
        "priority": 0,
        "restartPolicy": "Always",
        "schedulerName": "default-scheduler",
        "securityContext": {},
        "serviceAccount": "default",
        "serviceAccountName": "default",
        "terminationGracePeriodSeconds": 30,
        "tolerations": [
            {
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            }
        ],
        **more,
    }


INJECT_LABEL = {"aml-auth-proxy.io/inject": "true"}


def deployment_pod(**annotations: str) -> Obj:
    """A pod of the Deployment `scorer` as its ReplicaSet creates it: generateName, ownerReferences, no name yet;
    fsGroup set; the service account's token volume already there."""
    mount = {"name": "kube-api-access-x7k2q", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}
    app = _container(
        "scorer",
        "registry.example.com/scorer:2.4.1",
        ports=[{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
        env=[{"name": "AML_URL", "value": "http://127.0.0.1:8080/score"}],
        resources={"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        volumeMounts=[{**mount, "readOnly": True}],
    )
    spec = _spec(
        containers=[app],
        securityContext={"fsGroup": 10001, "runAsNonRoot": True},
        serviceAccount="scorer",
        serviceAccountName="scorer",
        volumes=[_token_volume("x7k2q")],
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "scorer-7d9f8c6b5-",
            "namespace": APP_NAMESPACE,
            "labels": {"app": "scorer", "pod-template-hash": "7d9f8c6b5", **INJECT_LABEL},
            "annotations": {
                "aml-auth-proxy.io/config": "scorer-proxy",
                "aml-auth-proxy.io/secret": "scorer-endpoint-keys",
                **annotations,
            },
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "scorer-7d9f8c6b5",
                    "uid": "3f0c2a1e-5b6d-4c7e-8f9a-0b1c2d3e4f50",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }


def job_pod(**annotations: str) -> Obj:
    """A pod of the Job `nightly-eval-28461840` (a CronJob's): restartPolicy Never, no API token, no volumes,
    no Secret (a token route), its own resources for the proxy."""
    app = _container("eval", "registry.example.com/eval:1.0.0", command=["python", "-m", "eval"])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "nightly-eval-28461840-",
            "namespace": APP_NAMESPACE,
            "labels": {
                "batch.kubernetes.io/controller-uid": "9a8b7c6d-0000-4000-8000-000000000001",
                "batch.kubernetes.io/job-name": "nightly-eval-28461840",
                "job-name": "nightly-eval-28461840",
                **INJECT_LABEL,
            },
            "annotations": {
                "aml-auth-proxy.io/config": "eval-proxy",
                "aml-auth-proxy.io/cpu-limit": "1",
                "aml-auth-proxy.io/memory-request": "128Mi",
                "aml-auth-proxy.io/memory-limit": "256Mi",
                **annotations,
            },
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": "nightly-eval-28461840",
                    "uid": "9a8b7c6d-0000-4000-8000-000000000001",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": _spec(containers=[app], restartPolicy="Never", automountServiceAccountToken=False),
    }


def pod_with_init_containers(**annotations: str) -> Obj:
    """A bare pod (a name, no owner) with its own init container and volumes, no fsGroup, no annotations map
    beyond the config."""
    migrate = _container(
        "migrate", "registry.example.com/migrate:3.1", volumeMounts=[{"name": "data", "mountPath": "/data"}]
    )
    app = _container("worker", "registry.example.com/worker:3.1", volumeMounts=[{"name": "data", "mountPath": "/data"}])
    spec = _spec(
        initContainers=[migrate],
        containers=[app],
        volumes=[{"name": "data", "emptyDir": {}}, {"name": "settings", "configMap": {"name": "worker-settings"}}],
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "worker-0",
            "namespace": APP_NAMESPACE,
            "labels": {"app": "worker", **INJECT_LABEL},
            "annotations": {"aml-auth-proxy.io/config": "worker-proxy", **annotations},
        },
        "spec": spec,
    }


def admission_review(
    pod: Obj, *, namespace: str | None = None, operation: str = "CREATE", dry_run: bool = False
) -> Obj:
    """The AdmissionReview (admission.k8s.io/v1) the API server sends for a pod."""
    meta = pod["metadata"]
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": meta.get("name", ""),
            "namespace": namespace or meta.get("namespace", APP_NAMESPACE),
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": []},
            "object": pod,
            "oldObject": None,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def patch_of(answer: Obj) -> list[Obj] | None:
    response = answer["response"]
    if "patch" not in response:
        return None
    assert response["patchType"] == "JSONPatch"
    ops: list[Obj] = json.loads(base64.b64decode(response["patch"]))
    return ops


# -- an injector over TLS --------------------------------------------------------------------------------------


@dataclass
class Pki:
    """A CA the client trusts and the files of a serving certificate it issued for 127.0.0.1."""

    ca: trustme.CA
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def issue(self, directory: Path, name: str = "tls") -> tuple[Path, Path]:
        """A new certificate from the same CA, written to name.crt and name.key in `directory`."""
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        crt, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(crt))
        cert.private_key_pem.write_to_path(str(key))
        return crt, key


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    pki = Pki(ca, directory / "tls.crt", directory / "tls.key")
    pki.issue(directory)
    return pki


@dataclass
class Running:
    server: InjectorServer
    url: str
    session: aiohttp.ClientSession
    pki: Pki

    async def review(self, document: Obj) -> Obj:
        async with self.session.post(self.url + "/mutate", json=document) as resp:
            assert resp.status == 200, await resp.text()
            answer: Obj = await resp.json()
            return answer

    async def post(self, body: bytes, *, chunked: bool = False) -> tuple[int, Obj]:
        """POST raw bytes to /mutate (with Content-Length, or chunked without one)."""

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 65536):
                yield body[start : start + 65536]

        data: Any = chunks() if chunked else io.BytesIO(body)
        async with self.session.post(self.url + "/mutate", data=data) as resp:
            return resp.status, await resp.json()


@asynccontextmanager
async def running_injector(
    template_file: Path,
    directory: Path,
    *,
    native: bool | None = True,
    deny_invalid: bool = True,
    own_namespace: str = INJECTOR_NAMESPACE,
    metrics: InjectorMetrics | None = None,
    on_decision: Any = None,
    admin: bool = False,
    poll_seconds: float = 5.0,
    read_timeout_seconds: float | None = None,
) -> AsyncIterator[Running]:
    """The injector in this process over TLS on 127.0.0.1, and a client session that trusts its CA."""
    pki = make_pki(directory)
    metrics = metrics or InjectorMetrics()
    certificate = Certificate(str(pki.cert_file), str(pki.key_file), metrics=metrics, poll_seconds=poll_seconds)
    assert certificate.load()
    settings = Settings(SidecarTemplate.load(template_file), own_namespace, deny_invalid, native)
    kw: dict[str, Any] = {"on_decision": on_decision} if on_decision is not None else {}
    if read_timeout_seconds is not None:
        kw["read_timeout_seconds"] = read_timeout_seconds
    server = InjectorServer(settings, certificate, metrics=metrics, **kw)
    await server.start("127.0.0.1", 0, admin=("127.0.0.1", 0) if admin else None)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pki.client_context()))
    try:
        yield Running(server, f"https://127.0.0.1:{server.port}", session, pki)
    finally:
        await session.close()
        await server.stop()


def expected_container(template: Obj, *, secret: bool, image: str | None = None, resources: Obj | None = None) -> Obj:
    """The chart template's container as it should come out for a pod: what the annotations set, substituted."""
    container = copy.deepcopy(template)
    if not secret:
        container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "aml-auth-proxy-secrets"]
    if image is not None:
        container["image"] = image
    if resources is not None:
        container["resources"] = resources
    return container
