"""Weakenings of the sidecar injector and its chart objects; each must make its tests fail (tests/mutation.py)."""

from __future__ import annotations

from tests.mutation import Mutant

RULES = "tests/test_injector.py"
SERVER = "tests/test_injector_server.py"
CHART = "tests/test_chart_injector.py"
MUTATE = "proxy/injector/mutate.py"
WEBHOOK = "charts/aml-auth-proxy/templates/injector-webhook.yaml"

MUTANTS = [
    Mutant(
        name="injector: an injected pod is injected again (not idempotent)",
        path=MUTATE,
        old="    if template.container_name in present:",
        new="    if False:",
        tests=(f"{RULES}::test_an_injected_pod_is_left_alone_when_reviewed_again",),
    ),
    Mutant(
        name='injector: "false" is not an opt-out',
        path=MUTATE,
        old='    if annotations.get(INJECT) == "false":',
        new="    if False:",
        tests=(f"{RULES}::test_false_means_no_injection_whatever_else_the_pod_says",),
    ),
    Mutant(
        name="injector: its own namespace is injected",
        path=MUTATE,
        old="    if namespace == own_namespace or namespace in NEVER_NAMESPACES:",
        new="    if namespace in NEVER_NAMESPACES:",
        tests=(f"{RULES}::test_the_injectors_own_namespace_kube_system_and_unlabelled_pods_are_never_touched",),
    ),
    Mutant(
        name="injector: kube-system is injected",
        path=MUTATE,
        old="    if namespace == own_namespace or namespace in NEVER_NAMESPACES:",
        new="    if namespace == own_namespace:",
        tests=(f"{RULES}::test_the_injectors_own_namespace_kube_system_and_unlabelled_pods_are_never_touched",),
    ),
    Mutant(
        name="injector: native sidecars from 1.28 (alpha there, off by default)",
        path=MUTATE,
        old="    return version >= NATIVE_SINCE",
        new="    return version >= (1, 28)",
        tests=(f"{SERVER}::test_native_sidecars_are_chosen_from_the_api_servers_version",),
    ),
    Mutant(
        name="injector: --native false is ignored (always asks the version)",
        path="proxy/injector/main.py",
        old='    native = None if options.native == "auto" else options.native == "true"',
        new="    native = None",
        tests=(f"{SERVER}::test_the_injector_process_chooses_its_sidecar_serves_logs_json_and_stops_on_sigterm",),
    ),
    Mutant(
        name="injector: the native shape added as a plain container",
        path=MUTATE,
        old='    _append(ops, spec, "initContainers" if native else "containers", [container])',
        new='    _append(ops, spec, "containers", [container])',
        tests=(f"{RULES}::test_a_deployments_pod_gets_the_charts_native_sidecar_with_its_config_and_secret",),
    ),
    Mutant(
        name="injector: the native container for a plain cluster",
        path=MUTATE,
        old="    shape = template.shape(native)",
        new="    shape = template.shape(True)",
        tests=(f"{RULES}::test_a_jobs_pod_gets_the_plain_container_with_its_resources_and_no_secret",),
    ),
    Mutant(
        name="injector: an existing list is replaced, not appended to",
        path=MUTATE,
        old="    if not isinstance(spec.get(key), list):",
        new="    if True:",
        tests=(
            f"{RULES}::test_a_pod_with_its_own_init_containers_and_volumes_keeps_them_and_runs_the_proxy_after_them",
        ),
    ),
    Mutant(
        name="injector: JSON Pointer keys not escaped (RFC 6901)",
        path=MUTATE,
        old='    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)',
        new='    return "".join("/" + p for p in parts)',
        tests=(f"{RULES}::test_a_deployments_pod_gets_the_charts_native_sidecar_with_its_config_and_secret",),
    ),
    Mutant(
        name="injector: a memory limit below its request is let through",
        path=MUTATE,
        old="        if low is None or high is None or low <= high:",
        new="        if True:",
        tests=(f"{RULES}::test_a_broken_annotation_refuses_the_pod_naming_the_annotation_and_the_problem",),
    ),
    Mutant(
        name="injector: a pod's own volume of the proxy's name is taken as the proxy's",
        path=MUTATE,
        old="        elif found != volume:",
        new="        elif False:",
        tests=(f"{RULES}::test_a_missing_config_annotation_and_clashes_with_the_pod_are_refused",),
    ),
    Mutant(
        name="injector: Secret files unreadable without an fsGroup",
        path=MUTATE,
        old="                    if no_fs_group:",
        new="                    if False:",
        tests=(
            f"{RULES}::test_a_pod_with_its_own_init_containers_and_volumes_keeps_them_and_runs_the_proxy_after_them",
        ),
    ),
    Mutant(
        name="injector: the certificate is never reloaded",
        path="proxy/injector/server.py",
        old="        if stamps == self._stamps:",
        new="        if self._stamps is not None:",
        tests=(f"{SERVER}::test_a_rotated_certificate_is_served_to_new_connections_without_a_restart",),
    ),
    Mutant(
        name="injector: a reloaded certificate is not handed to new connections",
        path="proxy/injector/server.py",
        old="            connection.context = current",
        new="            pass",
        tests=(f"{SERVER}::test_a_rotated_certificate_is_served_to_new_connections_without_a_restart",),
    ),
    Mutant(
        name="injector: Events written for a dry run",
        path="proxy/injector/cluster.py",
        old='    if decision.outcome != "denied" or subject is None or decision.dry_run:',
        new='    if decision.outcome != "denied" or subject is None:',
        tests=(f"{SERVER}::test_a_broken_annotation_becomes_an_event_on_the_pods_owner",),
    ),
    Mutant(
        name="chart: the webhook also calls for the injector's own namespace",
        path=WEBHOOK,
        old='list "kube-system" .Release.Namespace | uniq | toJson',
        new='list "kube-system" | toJson',
        tests=(f"{CHART}::test_the_webhook_asks_only_for_labelled_pods_outside_kube_system_and_its_own_namespace",),
    ),
    Mutant(
        name="chart: an upgrade keeps a certificate about to expire",
        path=WEBHOOK,
        old="(gt $notAfter $renewAt)",
        new="(gt $notAfter 0)",
        tests=(f"{CHART}::test_an_upgrade_keeps_the_certificate_until_it_nears_expiry_and_then_trusts_both_cas",),
    ),
    Mutant(
        name="chart: a renewed certificate drops the old CA from the caBundle at once",
        path=WEBHOOK,
        old='{{- with index $old "ca.crt" }}',
        new='{{- with "" }}',
        tests=(f"{CHART}::test_an_upgrade_keeps_the_certificate_until_it_nears_expiry_and_then_trusts_both_cas",),
    ),
    Mutant(
        name="chart: the injector template without the downward API variables",
        path="charts/aml-auth-proxy/templates/_helpers.tpl",
        old='{{- $_ := set $values.events "enabled" true }}',
        new="",
        tests=(f"{CHART}::test_the_template_has_what_any_pods_config_may_need",),
    ),
]

MUTANTS += [
    Mutant(
        name="injector: a review whose body stops coming holds its handler without a bound",
        path="proxy/injector/server.py",
        old="            body = await asyncio.wait_for(request.read(), self.read_timeout_seconds)\n",
        new="            body = await request.read()\n",
        tests=(f"{RULES}::test_a_review_whose_body_stops_coming_gets_408_as_json_and_the_injector_serves_on",),
    ),
]

_POLICY = "charts/aml-auth-proxy/templates/injector-networkpolicy.yaml"
_POLICY_TEST = f"{CHART}::test_the_injectors_network_policy_opens_its_two_ports_and_reaches_only_dns_and_the_api_server"
MUTANTS += [
    Mutant(
        name="injector NetworkPolicy: the webhook port is not the one the API server calls",
        path=_POLICY,
        old="        - port: {{ int $i.port }}\n",
        new="        - port: {{ int $i.metricsPort }}\n",
        tests=(_POLICY_TEST,),
    ),
    Mutant(
        name="injector NetworkPolicy: networkPolicy.ingress.webhookFrom ignored",
        path=_POLICY,
        old="      {{- with $np.ingress.webhookFrom }}\n",
        new="      {{- with list }}\n",
        tests=(_POLICY_TEST,),
    ),
    Mutant(
        name="injector NetworkPolicy: no egress to the API server (Events and the version fail)",
        path=_POLICY,
        old='    {{- include "aml-auth-proxy.networkPolicyApiServer" . | nindent 4 }}\n',
        new="",
        tests=(_POLICY_TEST,),
    ),
]

_WEBHOOK_NS_TEST = (
    f"{CHART}::test_a_namespace_selector_narrows_the_webhook_to_a_releases_namespaces_and_keeps_the_exclusions"
)
MUTANTS += [
    Mutant(
        name="injector webhook: injector.namespaceSelector.matchLabels ignored",
        path=WEBHOOK,
        old="      {{- with $i.namespaceSelector.matchLabels }}\n",
        new="      {{- with list }}\n",
        tests=(_WEBHOOK_NS_TEST,),
    ),
    Mutant(
        name="injector webhook: injector.namespaceSelector.matchExpressions ignored",
        path=WEBHOOK,
        old="        {{- with $i.namespaceSelector.matchExpressions }}\n",
        new="        {{- with list }}\n",
        tests=(_WEBHOOK_NS_TEST,),
    ),
]
