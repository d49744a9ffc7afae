"""The sidecar injector's rules, over TLS: AdmissionReviews of realistic pods (a Deployment's, a Job's, a pod with
its own init containers and volumes, one already injected, one opting out with "false", ones with broken
annotations) go to a real injector on 127.0.0.1; the JSONPatch it answers is applied with `jsonpatch` as the API
server would, and the patched pod is validated against the Kubernetes 1.29 and 1.30 schemas (strict). The
container it adds is the chart's own template (rendered by helm) with only the per-pod parts substituted."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from proxy.injector.mutate import (
    INJECTED,
    SidecarTemplate,
    TemplateError,
    parse_quantity,
    pointer,
    supports_native_sidecars,
)
from tests.support.injector import (
    APP_NAMESPACE,
    INJECTOR_NAMESPACE,
    Obj,
    Running,
    admission_review,
    deployment_pod,
    expected_container,
    job_pod,
    patch_of,
    pod_with_init_containers,
    running_injector,
    write_template,
)

VERSIONS = ("1.29.0", "1.30.0")
PROXY = "aml-auth-proxy"


@pytest.fixture(scope="module")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_template(tmp_path_factory.mktemp("template"))


@pytest.fixture(scope="module")
def chart_template(template_file: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(template_file.read_text())
    return doc


@pytest.fixture
async def native(template_file: Path, tmp_path: Path) -> AsyncIterator[Running]:
    async with running_injector(template_file, tmp_path / "pki", native=True) as running:
        yield running


@pytest.fixture
async def plain(template_file: Path, tmp_path: Path) -> AsyncIterator[Running]:
    async with running_injector(template_file, tmp_path / "pki", native=False) as running:
        yield running


def apply(pod: Obj, answer: Obj) -> Obj:
    """The pod as the API server stores it after this answer (a copy; `pod` is left as it was)."""
    response = answer["response"]
    assert response["allowed"] is True, response
    ops = patch_of(answer)
    if ops is None:
        return copy.deepcopy(pod)
    patched: Obj = jsonpatch.JsonPatch(ops).apply(pod)
    return patched


def validate(pod: Obj) -> None:
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(pod, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"Kubernetes {version}: {exc.message} at {'/'.join(map(str, exc.path))}")


def proxies(pod: Obj) -> Iterator[tuple[str, Obj]]:
    for key in ("initContainers", "containers"):
        for container in pod["spec"].get(key, []):
            if container["name"] == PROXY:
                yield key, container


def the_proxy(pod: Obj) -> tuple[str, Obj]:
    found = list(proxies(pod))
    assert len(found) == 1, found
    return found[0]


def volumes(pod: Obj) -> dict[str, Obj]:
    return {v["name"]: v for v in pod["spec"].get("volumes", [])}


# -- injection ------------------------------------------------------------------------------------------------


async def test_a_deployments_pod_gets_the_charts_native_sidecar_with_its_config_and_secret(
    native: Running, chart_template: dict[str, Any]
) -> None:
    pod = deployment_pod()
    answer = await native.review(admission_review(pod))
    patched = apply(pod, answer)
    validate(patched)
    key, proxy = the_proxy(patched)
    assert key == "initContainers" and proxy["restartPolicy"] == "Always"
    assert proxy == expected_container(chart_template["native"]["container"], secret=True)
    # The pod's own containers and volumes are as they were; the proxy's volumes point at the pod's objects.
    assert patched["spec"]["containers"] == pod["spec"]["containers"]
    got = volumes(patched)
    assert got["kube-api-access-x7k2q"] == pod["spec"]["volumes"][0]
    assert got["aml-auth-proxy-config"] == {"name": "aml-auth-proxy-config", "configMap": {"name": "scorer-proxy"}}
    assert got["aml-auth-proxy-secrets"]["secret"] == {"secretName": "scorer-endpoint-keys", "defaultMode": 288}
    assert got["aml-auth-proxy-tmp"] == {"name": "aml-auth-proxy-tmp", "emptyDir": {"sizeLimit": "64Mi"}}
    assert {m["name"] for m in proxy["volumeMounts"]} <= set(got)
    assert patched["metadata"]["annotations"][INJECTED] == "native"
    # The pod had volumes and no init containers: the volumes are appended one by one, the list is added whole.
    paths = [op["path"] for op in patch_of(answer) or []]
    assert paths == [
        "/metadata/annotations/aml-auth-proxy.io~1injected",
        "/spec/initContainers",
        "/spec/volumes/-",
        "/spec/volumes/-",
        "/spec/volumes/-",
    ]
    assert "warnings" not in answer["response"]


async def test_a_jobs_pod_gets_the_plain_container_with_its_resources_and_no_secret(
    plain: Running, chart_template: dict[str, Any]
) -> None:
    pod = job_pod(**{"aml-auth-proxy.io/image": "myregistry.azurecr.io/aml-auth-proxy:0.1.0-patched"})
    answer = await plain.review(admission_review(pod))
    patched = apply(pod, answer)
    validate(patched)
    key, proxy = the_proxy(patched)
    assert key == "containers" and "restartPolicy" not in proxy
    assert [c["name"] for c in patched["spec"]["containers"]] == ["eval", PROXY]  # appended: the app stays first
    resources = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}}
    assert proxy == expected_container(
        chart_template["plain"]["container"],
        secret=False,
        image="myregistry.azurecr.io/aml-auth-proxy:0.1.0-patched",
        resources=resources,
    )
    assert set(volumes(patched)) == {"aml-auth-proxy-config", "aml-auth-proxy-tmp"}  # no Secret named: none
    assert volumes(patched)["aml-auth-proxy-config"]["configMap"]["name"] == "eval-proxy"
    assert [op["path"] for op in patch_of(answer) or []][-1] == "/spec/volumes"  # it had none: added whole
    # A plain container keeps a Job's pod running: the answer warns about it.
    (warning,) = answer["response"]["warnings"]
    assert warning == (
        "aml-auth-proxy is a plain container here (Kubernetes before 1.29): with restartPolicy Never the pod "
        "completes only after the app calls POST http://127.0.0.1:9090/quitquitquit when it is done"
    )


async def test_a_pod_with_its_own_init_containers_and_volumes_keeps_them_and_runs_the_proxy_after_them(
    native: Running, chart_template: dict[str, Any]
) -> None:
    pod = pod_with_init_containers(**{"aml-auth-proxy.io/secret": "worker-keys"})
    answer = await native.review(admission_review(pod))
    patched = apply(pod, answer)
    validate(patched)
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["migrate", PROXY]
    assert patched["spec"]["initContainers"][0] == pod["spec"]["initContainers"][0]
    assert list(volumes(patched)) == [
        "data",
        "settings",
        "aml-auth-proxy-config",
        "aml-auth-proxy-secrets",
        "aml-auth-proxy-tmp",
    ]
    # No fsGroup: the Secret's root-owned files must be readable by the non-root proxy.
    assert volumes(patched)["aml-auth-proxy-secrets"]["secret"] == {"secretName": "worker-keys", "defaultMode": 0o444}
    _, proxy = the_proxy(patched)
    assert proxy == expected_container(chart_template["native"]["container"], secret=True)
    assert "/spec/initContainers/-" in [op["path"] for op in patch_of(answer) or []]


async def test_the_pod_may_already_hold_the_proxys_volumes_unchanged(native: Running) -> None:
    pod = pod_with_init_containers()
    pod["spec"]["volumes"].append({"name": "aml-auth-proxy-tmp", "emptyDir": {"sizeLimit": "64Mi"}})
    patched = apply(pod, await native.review(admission_review(pod)))
    validate(patched)
    assert [v["name"] for v in patched["spec"]["volumes"]].count("aml-auth-proxy-tmp") == 1


async def test_a_pod_without_annotations_map_gets_one(native: Running) -> None:
    pod = pod_with_init_containers()
    del pod["metadata"]["annotations"]
    answer = await native.review(admission_review(pod))
    assert answer["response"]["allowed"] is False  # the config annotation is required ...
    pod["metadata"]["annotations"] = {"aml-auth-proxy.io/config": "worker-proxy"}
    patched = apply(pod, await native.review(admission_review(pod)))
    assert patched["metadata"]["annotations"] == {"aml-auth-proxy.io/config": "worker-proxy", INJECTED: "native"}


# -- left alone -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["native", "plain"])
async def test_an_injected_pod_is_left_alone_when_reviewed_again(native: Running, plain: Running, mode: str) -> None:
    """reinvocationPolicy IfNeeded: the API server may call again after another webhook changed the pod."""
    first, other = (native, plain) if mode == "native" else (plain, native)
    pod = deployment_pod()
    injected = apply(pod, await first.review(admission_review(pod)))
    for injector in (first, other):  # whichever shape it has, in containers or initContainers
        answer = await injector.review(admission_review(injected))
        assert answer["response"]["allowed"] is True
        assert patch_of(answer) is None
    assert len(list(proxies(injected))) == 1


async def test_false_means_no_injection_whatever_else_the_pod_says(native: Running) -> None:
    for pod in (
        deployment_pod(**{"aml-auth-proxy.io/inject": "false"}),
        deployment_pod(**{"aml-auth-proxy.io/inject": "false", "aml-auth-proxy.io/memory-limit": "lots"}),
        job_pod(**{"aml-auth-proxy.io/inject": "false"}),
    ):
        answer = await native.review(admission_review(pod))
        assert answer["response"] == {"uid": answer["response"]["uid"], "allowed": True}


async def test_other_values_of_the_inject_annotation_are_refused_not_injected(native: Running) -> None:
    for value in ("False", "no", "0", ""):
        answer = await native.review(admission_review(deployment_pod(**{"aml-auth-proxy.io/inject": value})))
        response = answer["response"]
        assert response["allowed"] is False and "patch" not in response
        assert f"aml-auth-proxy.io/inject: {value!r} is neither" in response["status"]["message"]
    answer = await native.review(admission_review(deployment_pod(**{"aml-auth-proxy.io/inject": "true"})))
    assert patch_of(answer)


async def test_the_injectors_own_namespace_kube_system_and_unlabelled_pods_are_never_touched(native: Running) -> None:
    for namespace in (INJECTOR_NAMESPACE, "kube-system"):
        pod = deployment_pod()
        pod["metadata"]["namespace"] = namespace
        answer = await native.review(admission_review(pod, namespace=namespace))
        assert answer["response"] == {"uid": answer["response"]["uid"], "allowed": True}
    unlabelled = deployment_pod()
    unlabelled["metadata"]["labels"]["aml-auth-proxy.io/inject"] = "false"
    assert patch_of(await native.review(admission_review(unlabelled))) is None
    del unlabelled["metadata"]["labels"]["aml-auth-proxy.io/inject"]
    assert patch_of(await native.review(admission_review(unlabelled))) is None
    # Another namespace than the injector's gets the proxy: the rule is not "every namespace".
    assert patch_of(await native.review(admission_review(deployment_pod())))


async def test_only_a_pod_create_is_mutated(native: Running) -> None:
    update = admission_review(deployment_pod(), operation="UPDATE")
    assert patch_of(await native.review(update)) is None
    status = admission_review(deployment_pod())
    status["request"]["subResource"] = "status"
    assert patch_of(await native.review(status)) is None


# -- invalid annotations --------------------------------------------------------------------------------------


BROKEN = [
    (
        {"aml-auth-proxy.io/memory-limit": "64Mi"},
        "aml-auth-proxy.io/memory-limit: 64Mi is below the memory request 96Mi",
    ),
    ({"aml-auth-proxy.io/cpu-request": "2"}, "aml-auth-proxy.io/cpu-request: 2 is above the cpu limit 500m"),
    (
        {"aml-auth-proxy.io/memory-request": "lots"},
        "aml-auth-proxy.io/memory-request: 'lots' is not a Kubernetes quantity",
    ),
    ({"aml-auth-proxy.io/cpu-limit": "-1"}, "aml-auth-proxy.io/cpu-limit: '-1' is not a Kubernetes quantity"),
    ({"aml-auth-proxy.io/config": ""}, "aml-auth-proxy.io/config: required"),
    ({"aml-auth-proxy.io/config": "Scorer_Proxy"}, "aml-auth-proxy.io/config: 'Scorer_Proxy' is not a ConfigMap name"),
    ({"aml-auth-proxy.io/secret": "keys/../x"}, "aml-auth-proxy.io/secret: 'keys/../x' is not a Secret name"),
    ({"aml-auth-proxy.io/image": "not an image"}, "aml-auth-proxy.io/image: 'not an image' is not an image reference"),
    ({"aml-auth-proxy.io/cpu-requests": "100m"}, "aml-auth-proxy.io/cpu-requests: unknown annotation"),
]


@pytest.mark.parametrize(
    ("annotations", "message"), BROKEN, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BROKEN)]
)
async def test_a_broken_annotation_refuses_the_pod_naming_the_annotation_and_the_problem(
    native: Running, annotations: dict[str, str], message: str
) -> None:
    answer = await native.review(admission_review(deployment_pod(**annotations)))
    response = answer["response"]
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["code"] == 400
    assert response["status"]["message"].startswith(
        f"aml-auth-proxy was not injected into pod {APP_NAMESPACE}/scorer-7d9f8c6b5-*: "
    )
    assert message in response["status"]["message"], response["status"]["message"]


async def test_a_missing_config_annotation_and_clashes_with_the_pod_are_refused(native: Running) -> None:
    pod = deployment_pod()
    del pod["metadata"]["annotations"]["aml-auth-proxy.io/config"]
    pod["spec"]["volumes"].append({"name": "aml-auth-proxy-config", "configMap": {"name": "something-else"}})
    pod["spec"]["containers"][0]["ports"].append({"name": "metrics", "containerPort": 9090})
    message = (await native.review(admission_review(pod)))["response"]["status"]["message"]
    assert "aml-auth-proxy.io/config: required: the name of a ConfigMap in namespace ml" in message
    assert "the pod already has a volume named 'aml-auth-proxy-config' that is not the proxy's" in message
    assert "container 'scorer' declares port 9090, the proxy's admin port" in message


async def test_with_failure_policy_ignore_a_broken_pod_starts_without_the_proxy_and_is_warned(
    template_file: Path, tmp_path: Path
) -> None:
    async with running_injector(template_file, tmp_path, deny_invalid=False) as ignore:
        pod = deployment_pod(**{"aml-auth-proxy.io/memory-limit": "64Mi"})
        answer = await ignore.review(admission_review(pod))
        response = answer["response"]
        assert response["allowed"] is True and "patch" not in response
        assert response["warnings"] == [
            "aml-auth-proxy.io/memory-limit: 64Mi is below the memory request 96Mi (the chart's "
            "resources.requests.memory); Kubernetes refuses a limit below its request"
        ]


# -- the HTTP side --------------------------------------------------------------------------------------------


async def test_bad_reviews_get_400_and_oversized_ones_413_as_json(native: Running) -> None:
    status, body = await native.post(b"{not json")
    assert status == 400 and body["error"].startswith("not an admission.k8s.io/v1 AdmissionReview")
    v1beta1 = admission_review(deployment_pod())
    v1beta1["apiVersion"] = "admission.k8s.io/v1beta1"
    status, body = await native.post(json.dumps(v1beta1).encode())
    assert status == 400 and "admission.k8s.io/v1beta1" in body["error"]
    no_uid = admission_review(deployment_pod())
    del no_uid["request"]["uid"]
    assert (await native.post(json.dumps(no_uid).encode()))[0] == 400
    no_pod = admission_review(deployment_pod())
    no_pod["request"]["object"] = None
    assert (await native.post(json.dumps(no_pod).encode()))[0] == 400
    for chunked in (False, True):  # refused by its Content-Length, or once it has read 1 MiB
        status, body = await native.post(b"x" * (1024 * 1024 + 1), chunked=chunked)
        assert status == 413 and "over 1048576 bytes" in body["error"]
    # Still serving.
    assert patch_of(await native.review(admission_review(deployment_pod())))


async def test_a_review_whose_body_stops_coming_gets_408_as_json_and_the_injector_serves_on(
    template_file: Path, tmp_path: Path
) -> None:
    # The API server gives up after the webhook's timeoutSeconds; a caller that stops mid-body holds a handler no
    # longer than the read timeout (10 s in production, 0.2 s here).
    async with running_injector(template_file, tmp_path / "pki", read_timeout_seconds=0.2) as running:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", running.server.port, ssl=running.pki.client_context(), server_hostname="localhost"
        )
        writer.write(
            b"POST /mutate HTTP/1.1\r\nHost: injector\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"kind": "Adm'
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 408 ") and b"application/json" in head
        length = int(next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")).split(b":")[1])
        body = json.loads(await asyncio.wait_for(reader.readexactly(length), 10))
        assert body == {"error": "the body was not read within 0.2 s"}
        writer.close()
        assert patch_of(await running.review(admission_review(deployment_pod())))


async def test_the_answer_is_for_the_request_it_was_asked(native: Running) -> None:
    review = admission_review(deployment_pod())
    answer = await native.review(review)
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == review["request"]["uid"]


# -- pure helpers ---------------------------------------------------------------------------------------------


def test_quantities_parse_as_kubernetes_reads_them() -> None:
    assert parse_quantity("500m") == parse_quantity("0.5")
    assert parse_quantity("96Mi") == 96 * 2**20
    assert (
        parse_quantity("1G") == 10**9
        and parse_quantity("1e3") == 1000
        and parse_quantity(".5") == parse_quantity("500m")
    )
    for bad in ("", "-1", "1.2.3", "1 Gi", "1mi", "Mi", "1GiB"):
        assert parse_quantity(bad) is None, bad


def test_native_sidecars_from_1_29_whatever_the_provider_calls_the_version() -> None:
    assert not supports_native_sidecars("v1.28.9")
    assert supports_native_sidecars("v1.29.0")
    assert supports_native_sidecars("v1.30.4-eks-036c24b")
    assert supports_native_sidecars("v1.31.1+k3s1")
    assert not supports_native_sidecars("", "1", "28+")
    assert supports_native_sidecars("", "1", "29+")
    assert supports_native_sidecars("v2.0.0")


def test_pointers_escape_slash_and_tilde() -> None:
    assert (
        pointer("metadata", "annotations", "aml-auth-proxy.io/injected")
        == "/metadata/annotations/aml-auth-proxy.io~1injected"
    )
    assert pointer("a~b/c") == "/a~0b~1c"


def test_an_unusable_template_is_refused_with_one_line_per_problem(
    tmp_path: Path, chart_template: dict[str, Any]
) -> None:
    broken = copy.deepcopy(chart_template)
    del broken["native"]["container"]["restartPolicy"]
    broken["plain"]["volumes"] = [v for v in broken["plain"]["volumes"] if "configMap" not in v]
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(TemplateError) as caught:
        SidecarTemplate.load(path)
    assert caught.value.problems == (
        f"{path}: plain: expected one configMap volume (the proxy's config), found 0",
        f"{path}: plain: the container mounts 'aml-auth-proxy-config', which is not among the volumes",
    )
    broken["plain"] = chart_template["plain"]
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(TemplateError, match=r"native\.container has no restartPolicy: Always"):
        SidecarTemplate.load(path)
