"""The chart's injector (`injector.enabled`), checked with the real helm: lint, every object valid for Kubernetes
1.30 (strict; cert-manager's objects by shape), the webhook's selectors and policies as designed, its caBundle the
CA of the Secret the chart made (and that Secret kept across upgrades: `lookup` against the Kubernetes API
stand-in), cert-manager mode, RBAC that allows Events and nothing else, and the injector's template the same
container the chart's own sidecar template renders."""

from __future__ import annotations

import base64
import copy
import datetime
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import proxy.emulator.kube as kube_module
from proxy.emulator.kube import start_kube_api
from proxy.emulator.kube_store import RESOURCES, SUPERUSER, Resource, resource_by_name
from proxy.emulator.tls import make_local_tls
from tests.support.injector import CHART, CHART_VALUES, RELEASE, RELEASE_NAMESPACE, Obj, helm, render_chart
from tests.support.tools import proxy_cli

NAME = f"{RELEASE}-aml-auth-proxy-injector"
KUBE_VERSION = "1.30.0"
CERT_MANAGER_KINDS = {"Certificate", "Issuer"}
SERVICE_DNS = [
    NAME,
    f"{NAME}.{RELEASE_NAMESPACE}",
    f"{NAME}.{RELEASE_NAMESPACE}.svc",
    f"{NAME}.{RELEASE_NAMESPACE}.svc.cluster.local",
]


def merged(override: Obj) -> Obj:
    out = copy.deepcopy(CHART_VALUES)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, [(o["kind"], o["metadata"]["name"]) for o in objs]
    return found[0]


def webhook(objs: list[Obj]) -> Obj:
    (hook,) = one(objs, "MutatingWebhookConfiguration", NAME)["webhooks"]
    found: Obj = hook
    return found


def validate_all(objs: list[Obj]) -> None:
    for obj in objs:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in CERT_MANAGER_KINDS:
            assert obj["apiVersion"] == "cert-manager.io/v1", where
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, KUBE_VERSION, strict=True
            )
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {'/'.join(map(str, exc.path))}")


@pytest.fixture(scope="module")
def objs() -> list[Obj]:
    return render_chart(CHART_VALUES)


# -- lint and validity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cert_manager", [False, True])
def test_helm_lint_strict_and_every_object_valid(tmp_path: Path, cert_manager: bool) -> None:
    values = merged({"injector": {"enabled": True, "certManager": {"enabled": cert_manager}}})
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm("lint", "--strict", str(CHART), "-f", str(path), "--kube-version", KUBE_VERSION)
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = render_chart(values)
    validate_all(rendered)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered if "injector" in o["metadata"]["name"]}
    common = {
        ("ConfigMap", f"{NAME}-template"),
        ("ServiceAccount", NAME),
        ("ClusterRole", NAME),
        ("ClusterRoleBinding", NAME),
        ("Service", NAME),
        ("Deployment", NAME),
        ("PodDisruptionBudget", NAME),
        ("MutatingWebhookConfiguration", NAME),
    }
    extra = {("Certificate", NAME), ("Issuer", f"{NAME}-selfsigned")} if cert_manager else {("Secret", f"{NAME}-tls")}
    assert kinds == common | extra


def test_nothing_of_the_injector_is_rendered_by_default() -> None:
    values = merged({"injector": {"enabled": False}})
    assert not [o for o in render_chart(values) if "injector" in o["metadata"]["name"]]


def test_the_template_renders_for_a_cluster_older_than_native_sidecars() -> None:
    """The injector picks plain on such a cluster, but the chart still renders both shapes."""
    objs = render_chart(CHART_VALUES, kube_version="1.27.0")
    template = yaml.safe_load(one(objs, "ConfigMap", f"{NAME}-template")["data"]["sidecar.yaml"])
    assert template["native"]["container"]["restartPolicy"] == "Always"
    assert "restartPolicy" not in template["plain"]["container"]


def test_the_template_has_what_any_pods_config_may_need(objs: list[Obj]) -> None:
    """A pod's own config may turn Events or a shared token on: the downward API variables are always there (the
    release's events.enabled is off here), and the Secret volume is there to be renamed or dropped per pod."""
    template = yaml.safe_load(one(objs, "ConfigMap", f"{NAME}-template")["data"]["sidecar.yaml"])
    for mode in ("native", "plain"):
        env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in template[mode]["container"]["env"]}
        assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
        (secret,) = [v for v in template[mode]["volumes"] if "secret" in v]
        assert "items" not in secret["secret"]
        assert secret["name"] in {m["name"] for m in template[mode]["container"]["volumeMounts"]}


# -- the webhook -------------------------------------------------------------------------------------------------


def test_the_webhook_asks_only_for_labelled_pods_outside_kube_system_and_its_own_namespace(objs: list[Obj]) -> None:
    hook = webhook(objs)
    assert hook["objectSelector"] == {"matchLabels": {"aml-auth-proxy.io/inject": "true"}}
    assert hook["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", RELEASE_NAMESPACE]}
        ]
    }
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "NoneOnDryRun"  # Events, never on a dry run
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["failurePolicy"] == "Fail" and hook["timeoutSeconds"] == 5
    assert hook["clientConfig"]["service"] == {
        "name": NAME,
        "namespace": RELEASE_NAMESPACE,
        "path": "/mutate",
        "port": 443,
    }
    # The injector's own pods are neither labelled for injection nor in a namespace the webhook looks at.
    pod = one(objs, "Deployment", NAME)["spec"]["template"]
    assert "aml-auth-proxy.io/inject" not in pod["metadata"]["labels"]
    assert (
        one(objs, "Deployment", NAME)["metadata"]["namespace"]
        in hook["namespaceSelector"]["matchExpressions"][0]["values"]
    )


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions, all ANDed) against a namespace's labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        held = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not held:
            return False
    return True


def namespace(name: str, **labels: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name, **labels}


def test_a_namespace_selector_narrows_the_webhook_to_a_releases_namespaces_and_keeps_the_exclusions() -> None:
    # Two releases with an injector each in one cluster: each serves its own teams' namespaces.
    mine = {
        "matchLabels": {"team": "scoring"},
        "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]}],
    }
    objs = render_chart(merged({"injector": {"enabled": True, "namespaceSelector": mine}}))
    validate_all(objs)
    hook = webhook(objs)["namespaceSelector"]
    assert selects(hook, namespace("scoring-prod", team="scoring", env="prod"))
    assert selects(hook, namespace("scoring", team="scoring"))
    assert not selects(hook, namespace("scoring-dev", team="scoring", env="dev"))
    assert not selects(hook, namespace("billing", team="billing"))
    # The built-in exclusions hold whatever the selector says.
    assert not selects(hook, namespace("kube-system", team="scoring"))
    assert not selects(hook, namespace(RELEASE_NAMESPACE, team="scoring"))
    # Without a selector: every namespace but those two.
    default = webhook(render_chart(CHART_VALUES))["namespaceSelector"]
    assert selects(default, namespace("billing", team="billing")) and selects(default, namespace("scoring-dev"))
    assert not selects(default, namespace("kube-system")) and not selects(default, namespace(RELEASE_NAMESPACE))


def test_a_misspelt_namespace_selector_is_refused_by_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(merged({"injector": {"enabled": True, "namespaceSelector": {"matchLabel": {}}}})))
    result = helm("template", RELEASE, str(CHART), "-f", str(path))
    assert result.returncode != 0 and "values don't meet the specifications of the schema" in result.stderr
    assert "matchLabel" in result.stderr


def test_failure_policy_and_timeout_come_from_values_and_reach_the_injector() -> None:
    objs = render_chart(merged({"injector": {"enabled": True, "failurePolicy": "Ignore", "timeoutSeconds": 2}}))
    hook = webhook(objs)
    assert hook["failurePolicy"] == "Ignore" and hook["timeoutSeconds"] == 2
    args = one(objs, "Deployment", NAME)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--failure-policy=Ignore" in args
    result = helm(
        "template",
        RELEASE,
        str(CHART),
        "--set",
        "injector.enabled=true",
        "--set",
        "injector.failurePolicy=Sometimes",
        "--set",
        "standalone.enabled=false",
        "--set",
        "config.routes[0].name=x",
    )
    assert result.returncode != 0 and "/injector/failurePolicy" in result.stderr


def test_the_webhook_trusts_the_ca_of_the_secret_the_chart_made(objs: list[Obj]) -> None:
    secret = one(objs, "Secret", f"{NAME}-tls")
    assert secret["type"] == "kubernetes.io/tls"
    ca_pem = base64.b64decode(secret["data"]["ca.crt"])
    assert base64.b64decode(webhook(objs)["clientConfig"]["caBundle"]) == ca_pem
    # The serving certificate: signed by that CA, for the names the API server calls.
    ca = x509.load_pem_x509_certificate(ca_pem)
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    public_key = ca.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    assert cert.signature_hash_algorithm is not None
    public_key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert f"{NAME}.{RELEASE_NAMESPACE}.svc" in names and set(names) == set(SERVICE_DNS)
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3000)
    # The Deployment mounts that Secret.
    volumes = {v["name"]: v for v in one(objs, "Deployment", NAME)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == secret["metadata"]["name"]


def test_cert_manager_mode_renders_a_certificate_and_lets_cainjector_fill_the_ca_bundle() -> None:
    objs = render_chart(merged({"injector": {"enabled": True, "certManager": {"enabled": True}}}))
    config = one(objs, "MutatingWebhookConfiguration", NAME)
    assert config["metadata"]["annotations"] == {"cert-manager.io/inject-ca-from": f"{RELEASE_NAMESPACE}/{NAME}"}
    assert "caBundle" not in webhook(objs)["clientConfig"]
    assert not [o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == f"{NAME}-tls"]
    certificate = one(objs, "Certificate", NAME)["spec"]
    assert certificate["secretName"] == f"{NAME}-tls" and certificate["dnsNames"] == SERVICE_DNS
    assert certificate["issuerRef"] == {"name": f"{NAME}-selfsigned", "kind": "Issuer", "group": "cert-manager.io"}
    assert one(objs, "Issuer", f"{NAME}-selfsigned")["spec"] == {"selfSigned": {}}
    volumes = {v["name"]: v for v in one(objs, "Deployment", NAME)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == certificate["secretName"]
    # An issuer of your own: no Issuer of the chart's.
    own = {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}
    objs = render_chart(merged({"injector": {"enabled": True, "certManager": own}}))
    assert not [o for o in objs if o["kind"] == "Issuer"]
    assert one(objs, "Certificate", NAME)["spec"]["issuerRef"] == {
        "name": "corp-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }


# -- the certificate across upgrades: `lookup` against an API server --------------------------------------------


def seeded_secret(ca: bytes, crt: bytes, key: bytes, *, not_after: int, dns: list[str]) -> Obj:
    """The Secret as the previous install left it (with helm's ownership marks)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": f"{NAME}-tls",
            "namespace": RELEASE_NAMESPACE,
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {
                "meta.helm.sh/release-name": RELEASE,
                "meta.helm.sh/release-namespace": RELEASE_NAMESPACE,
                "aml-auth-proxy.io/not-after": str(not_after),
                "aml-auth-proxy.io/dns-names": ",".join(dns),
            },
        },
        "type": "kubernetes.io/tls",
        "data": {k: base64.b64encode(v).decode() for k, v in (("ca.crt", ca), ("tls.crt", crt), ("tls.key", key))},
    }


# The kinds the chart renders, as a real API server's discovery lists them: helm maps each object through it.
# The stand-in serves Secrets (what `lookup` reads); the others are only listed.
HELM_KINDS = [
    ("", "v1", "configmaps", "ConfigMap"),
    ("", "v1", "services", "Service"),
    ("", "v1", "serviceaccounts", "ServiceAccount"),
    ("apps", "v1", "deployments", "Deployment"),
    ("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget"),
    ("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole"),
    ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding"),
    ("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", "MutatingWebhookConfiguration"),
]


@pytest.mark.parametrize("case", ["kept", "renewed", "renamed"])
async def test_an_upgrade_keeps_the_certificate_until_it_nears_expiry_and_then_trusts_both_cas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    extra = tuple(Resource(group=g, version=v, plural=p, kind=k) for g, v, p, k in HELM_KINDS)
    monkeypatch.setattr(kube_module, "RESOURCES", RESOURCES + extra)
    old = make_local_tls(tmp_path / "old", hosts=SERVICE_DNS)
    ca, crt, key = (p.read_bytes() for p in (old.ca_file, old.cert_file, old.key_file))
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    not_after = now + 86400 * (10 if case == "renewed" else 365)  # 10 days left: within renewBeforeDays (30)
    dns = SERVICE_DNS if case != "renamed" else ["old-name.aml-auth-proxy.svc"]
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(CHART_VALUES))
    async with await start_kube_api(tls=True, namespace=RELEASE_NAMESPACE) as kube:
        secret = seeded_secret(ca, crt, key, not_after=not_after, dns=dns)
        kube.store.create(resource_by_name("secrets"), RELEASE_NAMESPACE, secret, user=SUPERUSER, verb="seed")
        result = await _helm_async(
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            RELEASE_NAMESPACE,
            "-f",
            str(values),
            "--dry-run=server",
            "--disable-openapi-validation",
            "--show-only",
            "templates/injector-webhook.yaml",
            env={"KUBECONFIG": str(kube.kubeconfig_path)},
        )
        assert result.returncode == 0, result.stderr
        looked_up = [c for c in kube.store.calls if c.get("resource") == "secrets" and c.get("verb") == "get"]
        assert looked_up and looked_up[0]["name"] == f"{NAME}-tls"
    objs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    rendered = one(objs, "Secret", f"{NAME}-tls")
    bundle = base64.b64decode(webhook(objs)["clientConfig"]["caBundle"])
    if case == "kept":
        assert rendered["data"] == secret["data"]
        assert rendered["metadata"]["annotations"]["aml-auth-proxy.io/not-after"] == str(not_after)
        assert bundle == ca
        return
    new_ca = base64.b64decode(rendered["data"]["ca.crt"])
    assert new_ca != ca and rendered["data"]["tls.crt"] != secret["data"]["tls.crt"]
    # Until kubelet hands every injector pod the new Secret, some still serve the old certificate: both CAs.
    assert bundle == new_ca + ca
    assert int(rendered["metadata"]["annotations"]["aml-auth-proxy.io/not-after"]) > now + 86400 * 3000


async def _helm_async(*args: str, env: dict[str, str]) -> Any:
    """helm in a thread: the API stand-in it talks to runs on this loop."""
    import asyncio

    return await asyncio.to_thread(helm, *args, env=env)


# -- the Deployment, Service and RBAC ----------------------------------------------------------------------------


def test_the_injector_runs_the_proxy_image_hardened_with_probes_on_its_https_port(objs: list[Obj]) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    deployment = one(objs, "Deployment", NAME)
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    template = yaml.safe_load(one(objs, "ConfigMap", f"{NAME}-template")["data"]["sidecar.yaml"])
    assert container["image"] == template["native"]["container"]["image"]  # the same image as the proxy
    assert container["args"] == [
        "injector",
        "--tls-cert=/etc/aml-auth-proxy-injector/tls/tls.crt",
        "--tls-key=/etc/aml-auth-proxy-injector/tls/tls.key",
        "--sidecar-template=/etc/aml-auth-proxy-injector/template/sidecar.yaml",
        "--listen=0.0.0.0:8443",
        "--admin=0.0.0.0:9090",
        "--native=auto",
        "--failure-policy=Fail",
        "--log-level=info",
    ]
    assert container["securityContext"] == values["containerSecurityContext"]
    assert spec["securityContext"] == values["podSecurityContext"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"https": 8443, "metrics": 9090}
    assert [e["name"] for e in container["env"]] == ["POD_NAME", "POD_NAMESPACE"]
    assert spec["serviceAccountName"] == NAME and spec["automountServiceAccountToken"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["template"]["configMap"]["name"] == f"{NAME}-template"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/etc/aml-auth-proxy-injector/template"] == "template"
    assert deployment["spec"]["replicas"] == 2
    assert len(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/sidecar-template"]) == 64
    service = one(objs, "Service", NAME)["spec"]
    assert {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"} in service["ports"]
    assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert one(objs, "PodDisruptionBudget", NAME)["spec"]["selector"] == deployment["spec"]["selector"]


def test_the_injectors_pods_are_never_selected_as_proxy_or_app_pods() -> None:
    objs = render_chart(
        merged(
            {
                "standalone": {"enabled": True, "replicas": 1},
                "app": {"image": "x:1", "ports": [{"name": "http", "containerPort": 8000}]},
            }
        )
    )
    injector_labels = one(objs, "Deployment", NAME)["spec"]["template"]["metadata"]["labels"]
    others = [
        o
        for o in objs
        if o["kind"] in ("Service", "PodDisruptionBudget", "Deployment") and o["metadata"]["name"] != NAME
    ]
    for obj in others:
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert not all(injector_labels.get(k) == v for k, v in selector.items()), obj["metadata"]["name"]


SCRAPER = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
API_SERVER_CIDR = [{"ipBlock": {"cidr": "10.224.0.0/16"}}]


@pytest.mark.parametrize("webhook_from", [[], API_SERVER_CIDR], ids=["any peer", "a CIDR"])
def test_the_injectors_network_policy_opens_its_two_ports_and_reaches_only_dns_and_the_api_server(
    webhook_from: list[Obj],
) -> None:
    objs = render_chart(
        merged(
            {
                "standalone": {"enabled": True, "replicas": 1},
                "app": {"image": "x:1", "ports": [{"name": "http", "containerPort": 8000}]},
                "networkPolicy": {"enabled": True, "ingress": {"adminFrom": SCRAPER, "webhookFrom": webhook_from}},
            }
        )
    )
    validate_all(objs)
    injector_labels = one(objs, "Deployment", NAME)["spec"]["template"]["metadata"]["labels"]
    policy = one(objs, "NetworkPolicy", NAME)["spec"]
    # It selects the injector's pods, and the proxy's policy does not.
    assert policy["podSelector"]["matchLabels"] == one(objs, "Deployment", NAME)["spec"]["selector"]["matchLabels"]
    (proxy_policy,) = [o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] != NAME]
    proxy_selector = proxy_policy["spec"]["podSelector"]["matchLabels"]
    assert not all(injector_labels.get(k) == v for k, v in proxy_selector.items())
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    webhook_rule: Obj = {"ports": [{"port": 8443, "protocol": "TCP"}]}
    if webhook_from:
        webhook_rule["from"] = webhook_from
    assert policy["ingress"] == [webhook_rule, {"ports": [{"port": 9090, "protocol": "TCP"}], "from": SCRAPER}]
    # The webhook's own port is the one the Service sends the API server's calls to.
    service_port = one(objs, "Service", NAME)["spec"]["ports"][0]
    container = one(objs, "Deployment", NAME)["spec"]["template"]["spec"]["containers"][0]
    (https,) = [p for p in container["ports"] if p["name"] == service_port["targetPort"]]
    assert https["containerPort"] == 8443
    # Egress: DNS and the API server (Events, its version); not HTTPS to anywhere else, which it never calls.
    assert policy["egress"] == [
        {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
        {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]},
    ]


def test_the_injector_has_no_network_policy_unless_network_policies_are_on(objs: list[Obj]) -> None:
    assert not [o for o in objs if o["kind"] == "NetworkPolicy"]


def test_rbac_is_events_only(objs: list[Obj]) -> None:
    role = one(objs, "ClusterRole", NAME)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]}]
    binding = one(objs, "ClusterRoleBinding", NAME)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME, "namespace": RELEASE_NAMESPACE}]
    assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding") and "injector" in o["metadata"]["name"]]


# -- one source for the container --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kube_version", "mode"), [("1.30.0", "native"), ("1.27.0", "plain")])
def test_the_injectors_container_is_the_one_the_charts_sidecar_template_renders(kube_version: str, mode: str) -> None:
    """The standalone Deployment's proxy (the named template "aml-auth-proxy.sidecar") and the injector's template
    are one container: rendered with the same values, they are equal (the template always has the downward API
    variables, here turned on by events.enabled)."""
    values = merged(
        {
            "standalone": {"enabled": True},
            "app": {"image": "registry.example.com/app:1", "ports": [{"name": "http", "containerPort": 8000}]},
            "events": {"enabled": True},
        }
    )
    objs = render_chart(values, kube_version=kube_version)
    pod = one(objs, "Deployment", f"{RELEASE}-aml-auth-proxy")["spec"]["template"]["spec"]
    key = "initContainers" if mode == "native" else "containers"
    (proxy,) = [c for c in pod[key] if c["name"] == "aml-auth-proxy"]
    template = yaml.safe_load(one(objs, "ConfigMap", f"{NAME}-template")["data"]["sidecar.yaml"])
    assert template[mode]["container"] == proxy
    pod_volumes = {v["name"]: v for v in pod["volumes"]}
    for volume in template[mode]["volumes"]:
        theirs = copy.deepcopy(pod_volumes[volume["name"]])
        if "secret" in theirs:  # the injector renames the Secret per pod
            theirs["secret"]["secretName"] = volume["secret"]["secretName"]
        assert volume == theirs


# -- docs/injection.md stays true ----------------------------------------------------------------------------------


def doc_block(first_line: str) -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "injection.md").read_text()
    found = re.search(rf"```yaml\n{re.escape(first_line)}\n(.*?)```", text, re.DOTALL)
    assert found, f"docs/injection.md lost its {first_line!r} example"
    return found.group(1)


def test_the_walk_through_installs_the_injector_and_its_config_passes_check_config(tmp_path: Path) -> None:
    objs = render_chart(yaml.safe_load(doc_block("# injector.yaml")))
    validate_all(objs)
    assert {o["kind"] for o in objs} >= {"MutatingWebhookConfiguration", "Deployment", "Secret", "ClusterRole"}
    assert not [o for o in objs if o["kind"] == "Deployment" and "injector" not in o["metadata"]["name"]]
    configmap = yaml.safe_load("apiVersion: v1\n" + doc_block("apiVersion: v1"))
    kubernetes_validate.validate(configmap, KUBE_VERSION, strict=True)
    config = tmp_path / "config.yaml"
    config.write_text(configmap["data"]["config.yaml"])
    result = proxy_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(configmap["data"]["config.yaml"])["admin"] == {"host": "0.0.0.0", "port": 9090}
