"""The injector as a server and a process: its certificate rotated under it (kubelet's Secret swap) and served to
new connections without a restart; /metrics, /readyz; Events about a refused pod on its owner, read back from
the Kubernetes API stand-in; the native/plain choice from the API server's version; and `aml-auth-proxy
injector` itself: JSON log lines, the chart's RBAC and nothing more, SIGTERM, and its refusals of bad flags."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from proxy.clock import SystemClock
from proxy.config.settings import Kubernetes
from proxy.emulator.kube import RunningKubeApi, start_kube_api
from proxy.emulator.kube_store import Rule, Selector, resource_by_name
from proxy.emulator.secretdir import write_secret_dir
from proxy.injector import cluster
from proxy.injector.mutate import SidecarTemplate
from proxy.injector.server import Certificate, InjectorMetrics, InjectorServer, Settings
from proxy.kube.client import KubeApi
from tests.support.injector import (
    APP_NAMESPACE,
    CHART_VALUES,
    INJECTOR_NAMESPACE,
    RELEASE,
    admission_review,
    deployment_pod,
    job_pod,
    patch_of,
    pod_with_init_containers,
    render_chart,
    running_injector,
    write_template,
)
from tests.support.session import subprocess_log

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("aml-auth-proxy"))
BROKEN = {"aml-auth-proxy.io/memory-limit": "64Mi"}


@pytest.fixture(scope="module")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_template(tmp_path_factory.mktemp("template"))


# -- the certificate ------------------------------------------------------------------------------------------


def issue(ca: trustme.CA) -> tuple[bytes, bytes, int]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    pem = cert.cert_chain_pems[0].bytes()
    return pem, cert.private_key_pem.bytes(), x509.load_pem_x509_certificate(pem).serial_number


async def served_serial(port: int, context: ssl.SSLContext, server_hostname: str) -> int:
    """The serial of the certificate a new connection gets (by IP: no SNI; by name: with SNI)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_hostname)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return int(x509.load_der_x509_certificate(der).serial_number)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_rotated_certificate_is_served_to_new_connections_without_a_restart(
    template_file: Path, tmp_path: Path
) -> None:
    ca = trustme.CA()
    client = ssl.create_default_context()
    ca.configure_trust(client)
    tls = tmp_path / "tls"  # a Secret volume: tls.crt -> ..data/tls.crt -> ..<timestamp>/tls.crt
    first_pem, first_key, first = issue(ca)
    write_secret_dir(tls, {"tls.crt": first_pem, "tls.key": first_key})
    metrics = InjectorMetrics()
    certificate = Certificate(str(tls / "tls.crt"), str(tls / "tls.key"), metrics=metrics, poll_seconds=0.05)
    assert certificate.load()
    settings = Settings(SidecarTemplate.load(template_file), INJECTOR_NAMESPACE, True, True)
    server = InjectorServer(settings, certificate, metrics=metrics)
    await server.start("127.0.0.1", 0)
    watch = asyncio.create_task(certificate.watch())
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client))
    url = f"https://127.0.0.1:{server.port}"

    async def serial_becomes(expected: int) -> None:
        async with asyncio.timeout(5):
            while await served_serial(server.port, client, "127.0.0.1") != expected:
                await asyncio.sleep(0.05)
        assert await served_serial(server.port, client, "localhost") == expected  # with SNI too

    def reloads(outcome: str) -> float:
        value = metrics.registry.get_sample_value(
            "aml_auth_proxy_injector_certificate_reloads_total", {"outcome": outcome}
        )
        return value or 0.0

    try:
        assert await served_serial(server.port, client, "127.0.0.1") == first
        async with session.get(url + "/readyz") as resp:  # a keep-alive connection opened before the rotation
            assert resp.status == 200

        second_pem, second_key, second = issue(ca)
        write_secret_dir(tls, {"tls.crt": second_pem, "tls.key": second_key})
        await serial_becomes(second)
        assert reloads("success") == 2
        async with session.get(url + "/readyz") as resp:
            assert resp.status == 200

        # Half-way through a rotation: the new certificate with the old key. It is not used; the last good stays.
        third_pem, third_key, third = issue(ca)
        write_secret_dir(tls, {"tls.crt": third_pem, "tls.key": second_key})
        async with asyncio.timeout(5):
            while reloads("error") == 0:
                await asyncio.sleep(0.05)
        assert await served_serial(server.port, client, "127.0.0.1") == second
        write_secret_dir(tls, {"tls.crt": third_pem, "tls.key": third_key})
        await serial_becomes(third)
        expiry = metrics.registry.get_sample_value("aml_auth_proxy_injector_certificate_expiry_timestamp_seconds")
        assert expiry is not None and expiry > time.time() + 86400
    finally:
        watch.cancel()
        await session.close()
        await server.stop()


# -- readiness and metrics ------------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_reviews_by_outcome_and_time_them_on_both_ports(
    template_file: Path, tmp_path: Path
) -> None:
    async with running_injector(template_file, tmp_path, admin=True) as injector:
        await injector.review(admission_review(deployment_pod()))  # injected
        await injector.review(admission_review(job_pod()))  # injected
        await injector.review(admission_review(deployment_pod(**{"aml-auth-proxy.io/inject": "false"})))  # skipped
        await injector.review(admission_review(deployment_pod(**BROKEN)))  # denied
        assert (await injector.post(b"[]"))[0] == 400  # error
        pages = []
        async with injector.session.get(injector.url + "/metrics") as resp:
            pages.append(await resp.text())
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{injector.server.admin_port}/metrics") as resp:
                assert resp.status == 200
                pages.append(await resp.text())
            async with http.get(f"http://127.0.0.1:{injector.server.admin_port}/mutate") as resp:
                assert resp.status == 404  # reviews only over TLS
    for page in pages:
        got = samples(page)
        reviews = {
            o: got[("aml_auth_proxy_injector_reviews_total", (("outcome", o),))]
            for o in ("injected", "skipped", "denied", "error")
        }
        assert reviews == {"injected": 2, "skipped": 1, "denied": 1, "error": 1}
        assert got[("aml_auth_proxy_injector_review_duration_seconds_count", ())] == 4
        assert 0 < got[("aml_auth_proxy_injector_review_duration_seconds_sum", ())] < 1
        assert got[("aml_auth_proxy_injector_review_duration_seconds_bucket", (("le", "+Inf"),))] == 4
        assert not [name for name, _ in got if name.endswith("_created")]


async def test_not_ready_until_the_native_choice_is_made(template_file: Path, tmp_path: Path) -> None:
    async with running_injector(template_file, tmp_path, native=None) as injector:
        async with injector.session.get(injector.url + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["not_ready"] == {"native": "the API server's version is not known yet"}
        assert (await injector.post(json.dumps(admission_review(deployment_pod())).encode()))[0] == 503
        injector.server.settings.native = False
        async with injector.session.get(injector.url + "/readyz") as resp:
            assert await resp.json() == {"ready": True, "sidecar": "plain"}
        async with injector.session.get(injector.url + "/healthz") as resp:
            assert resp.status == 200


# -- the Kubernetes API: version and Events -------------------------------------------------------------------


def api_for(kube: RunningKubeApi, path: Path, *, user: str | None = None) -> KubeApi:
    kubeconfig = kube.write_kubeconfig(path, **({"user": user} if user else {}))
    return KubeApi(Kubernetes(kubeconfig=str(kubeconfig), pod_name="demo-injector-0", pod_namespace=INJECTOR_NAMESPACE))


@pytest.mark.parametrize(("version", "native"), [("1.28.9", False), ("1.29.0", True), ("1.30.2", True)])
async def test_native_sidecars_are_chosen_from_the_api_servers_version(
    tmp_path: Path, version: str, native: bool
) -> None:
    async with await start_kube_api(version=version) as kube:
        api = api_for(kube, tmp_path / "kubeconfig")
        try:
            assert await cluster.ask_native(api) is native
        finally:
            api.close()


async def test_the_version_is_asked_again_until_the_api_server_answers(tmp_path: Path) -> None:
    async with await start_kube_api(version="1.30.0") as kube:
        api = api_for(kube, tmp_path / "kubeconfig")
        restart = asyncio.create_task(kube.restart(down_seconds=1.0))
        await asyncio.sleep(0.2)  # down now
        started = time.monotonic()
        try:
            assert await asyncio.wait_for(cluster.ask_native(api, initial=0.05, maximum=0.2), 10) is True
            assert time.monotonic() - started > 0.5  # it waited for the server, not for nothing
        finally:
            await restart
            api.close()


def events_in(kube: RunningKubeApi, namespace: str) -> list[dict[str, Any]]:
    selector = Selector.parse(label_selector=None, field_selector=None)
    return kube.store.list_objects(resource_by_name("events"), namespace, selector)[0]


async def test_a_broken_annotation_becomes_an_event_on_the_pods_owner(template_file: Path, tmp_path: Path) -> None:
    async with await start_kube_api() as kube:
        api = api_for(kube, tmp_path / "kubeconfig")
        metrics = InjectorMetrics()
        recorder = cluster.recorder(
            api, clock=SystemClock(), count=lambda reason, outcome: metrics.events.labels(outcome).inc()
        )
        sender = asyncio.create_task(recorder.run())

        def report(decision: Any) -> None:
            cluster.report(recorder, decision, deny_invalid=True)

        try:
            async with running_injector(
                template_file, tmp_path / "pki", metrics=metrics, on_decision=report
            ) as injector:
                for _ in range(2):  # the ReplicaSet retries: one Event, counted twice
                    await injector.review(admission_review(deployment_pod(**BROKEN)))
                await injector.review(admission_review(deployment_pod(**BROKEN), dry_run=True))  # no side effect
                await injector.review(admission_review(job_pod(**{"aml-auth-proxy.io/cpu-limit": "lots"})))
                await injector.review(admission_review(pod_with_init_containers(**{"aml-auth-proxy.io/config": ""})))
                await injector.review(admission_review(deployment_pod()))  # injected: no Event
                await asyncio.wait_for(recorder.drain(), 10)
        finally:
            sender.cancel()
            api.close()
        got = {(e["involvedObject"]["kind"], e["involvedObject"]["name"]): e for e in events_in(kube, APP_NAMESPACE)}
        assert set(got) == {("ReplicaSet", "scorer-7d9f8c6b5"), ("Job", "nightly-eval-28461840"), ("Pod", "worker-0")}
        rs = got[("ReplicaSet", "scorer-7d9f8c6b5")]
        assert rs["count"] == 2 and rs["type"] == "Warning" and rs["reason"] == "AmlAuthProxyNotInjected"
        assert rs["involvedObject"]["uid"] == "3f0c2a1e-5b6d-4c7e-8f9a-0b1c2d3e4f50"
        assert rs["involvedObject"]["apiVersion"] == "apps/v1" and rs["involvedObject"]["namespace"] == APP_NAMESPACE
        assert rs["message"] == (
            "aml-auth-proxy was not injected into pod scorer-7d9f8c6b5-*: aml-auth-proxy.io/memory-limit: 64Mi is "
            "below the memory request 96Mi (the chart's resources.requests.memory); Kubernetes refuses a limit below "
            "its request; the pod is refused (failurePolicy Fail)"
        )
        assert rs["source"]["component"] == "aml-auth-proxy" and rs["reportingInstance"] == "demo-injector-0"
        assert "aml-auth-proxy.io/cpu-limit: 'lots'" in got[("Job", "nightly-eval-28461840")]["message"]
        assert "aml-auth-proxy.io/config: required" in got[("Pod", "worker-0")]["message"]
        created = metrics.registry.get_sample_value(
            "aml_auth_proxy_injector_kubernetes_events_total", {"outcome": "created"}
        )
        assert created == 3


# -- the process ----------------------------------------------------------------------------------------------


def chart_rules(user: str) -> list[Rule]:
    """The injector's ClusterRole as the chart renders it, as rules of the API stand-in."""
    objs = render_chart(CHART_VALUES, show_only="templates/injector-rbac.yaml")
    (role,) = [o for o in objs if o["kind"] == "ClusterRole"]
    return [
        Rule(user=user, verbs=tuple(r["verbs"]), api_groups=tuple(r["apiGroups"]), resources=tuple(r["resources"]))
        for r in role["rules"]
    ]


def log_lines(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_text().splitlines():
        yield json.loads(line)  # every line is JSON


async def wait_for_line(path: Path, name: str, process: asyncio.subprocess.Process) -> dict[str, Any]:
    async with asyncio.timeout(30):
        while True:
            for line in log_lines(path) if path.exists() else ():
                if line.get("event") == name:
                    return line
            assert process.returncode is None, path.read_text()
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("version", "flag", "mode"),
    [("1.28.0", "auto", "plain"), ("1.30.0", "auto", "native"), ("1.30.0", "false", "plain")],
)
async def test_the_injector_process_chooses_its_sidecar_serves_logs_json_and_stops_on_sigterm(
    template_file: Path, tmp_path: Path, version: str, flag: str, mode: str
) -> None:
    user = f"system:serviceaccount:{INJECTOR_NAMESPACE}:{RELEASE}-aml-auth-proxy-injector"
    async with await start_kube_api(version=version, rules=chart_rules(user)) as kube:
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig", user=user)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
        cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
        log_path = subprocess_log("injector")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "POD_"))}
        env.update(KUBECONFIG=str(kubeconfig), POD_NAMESPACE=INJECTOR_NAMESPACE, POD_NAME="demo-injector-0")
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                CONSOLE_SCRIPT,
                "injector",
                f"--tls-cert={tmp_path / 'tls.crt'}",
                f"--tls-key={tmp_path / 'tls.key'}",
                f"--sidecar-template={template_file}",
                "--listen=127.0.0.1:0",
                "--admin=127.0.0.1:0",
                f"--native={flag}",
                stdout=log,
                stderr=log,
                env={**env, "PYTHONUNBUFFERED": "1"},
            )
        try:
            started = await wait_for_line(log_path, "started", process)
            url = f"https://{started['listen']}"
            chosen = await wait_for_line(log_path, "kubernetes_version" if flag == "auto" else "sidecar_mode", process)
            assert chosen["sidecar"] == mode
            client = ssl.create_default_context()
            ca.configure_trust(client)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client)) as https:
                async with asyncio.timeout(10):
                    while True:
                        async with https.get(url + "/readyz") as resp:
                            if resp.status == 200:
                                assert await resp.json() == {"ready": True, "sidecar": mode}
                                break
                        await asyncio.sleep(0.05)
                async with https.post(url + "/mutate", json=admission_review(deployment_pod())) as resp:
                    ops = patch_of(await resp.json()) or []
                key = "initContainers" if mode == "native" else "containers"
                assert [op["path"] for op in ops][1] == (f"/spec/{key}" if mode == "native" else f"/spec/{key}/-")
                async with https.post(url + "/mutate", json=admission_review(deployment_pod(**BROKEN))) as resp:
                    assert (await resp.json())["response"]["allowed"] is False
            async with asyncio.timeout(10):  # the Event, written with the chart's RBAC alone
                while not events_in(kube, APP_NAMESPACE):
                    await asyncio.sleep(0.05)
            (rs_event,) = events_in(kube, APP_NAMESPACE)
            assert rs_event["involvedObject"]["name"] == "scorer-7d9f8c6b5"
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 15) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        events = [line.get("event") for line in log_lines(log_path)]
        assert events[:2] == ["certificate_loaded", "started"] and events[-2:] == ["shutting_down", "stopped"]
        reviews = [line for line in log_lines(log_path) if line.get("event") == "review"]
        assert [r["outcome"] for r in reviews] == ["injected", "denied"]
        assert reviews[0]["sidecar"] == mode and reviews[0]["owner"] == "ReplicaSet/scorer-7d9f8c6b5"
        forbidden = [c for c in kube.store.calls if c.get("code") == 403]
        assert not forbidden, forbidden
        verbs = {(c.get("verb"), c.get("resource")) for c in kube.store.calls}
        assert verbs <= {("discovery", None), ("create", "events")}, verbs


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    import subprocess

    base = {k: v for k, v in os.environ.items() if not k.startswith("POD_")}
    result = subprocess.run(
        [CONSOLE_SCRIPT, "injector", *args], capture_output=True, text=True, timeout=60, env={**base, **(env or {})}
    )
    return result.returncode, result.stderr


def test_bad_flags_exit_2_with_one_line_per_problem(tmp_path: Path, template_file: Path) -> None:
    code, err = run_cli(
        "--tls-cert=/nonexistent/tls.crt",
        "--tls-key=/nonexistent/tls.key",
        f"--sidecar-template={tmp_path / 'missing.yaml'}",
        "--listen=8443",
        "--admin=127.0.0.1:99999",
    )
    assert code == 2
    assert err.splitlines() == [
        f"injector error: --sidecar-template: {tmp_path / 'missing.yaml'}: cannot be read (No such file or directory)",
        "injector error: --tls-cert: /nonexistent/tls.crt is not a readable file",
        "injector error: --tls-key: /nonexistent/tls.key is not a readable file",
        "injector error: --listen: '8443' is not HOST:PORT with a port from 0 to 65535",
        "injector error: --admin: '127.0.0.1:99999' is not HOST:PORT with a port from 0 to 65535",
        "injector error: --namespace: not given and POD_NAMESPACE is not set (the injector's own namespace)",
    ]
    ca = trustme.CA()
    one, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    one.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    other.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    code, err = run_cli(
        f"--tls-cert={tmp_path / 'tls.crt'}",
        f"--tls-key={tmp_path / 'tls.key'}",
        f"--sidecar-template={template_file}",
        "--namespace=Bad_NS",
    )
    assert code == 2
    assert err.splitlines() == [
        f"injector error: --tls-cert/--tls-key: {tmp_path / 'tls.crt'} and {tmp_path / 'tls.key'} do not load "
        "(KEY_VALUES_MISMATCH)",
        "injector error: --namespace: 'Bad_NS' is not a namespace name "
        "(lower case letters, digits and '-', at most 63)",
    ]
    code, err = run_cli("--tls-cert=a", "--tls-key=b", "--sidecar-template=c", "--native=maybe")
    assert code == 2 and "argument --native: invalid choice: 'maybe'" in err


def test_help_shows_defaults_and_examples() -> None:
    import subprocess

    wide = {**os.environ, "COLUMNS": "300"}  # argparse wraps at the terminal's width
    out = subprocess.run(
        [CONSOLE_SCRIPT, "injector", "--help"], capture_output=True, text=True, timeout=60, env=wide
    ).stdout
    for text in (
        "(default: 0.0.0.0:8443)",
        "(default: auto)",
        "(default: Fail)",
        "(default: POD_NAMESPACE)",
        "examples:",
    ):
        assert text in out, text
    top = subprocess.run([CONSOLE_SCRIPT, "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "injector" in top
