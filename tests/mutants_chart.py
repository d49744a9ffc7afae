"""Weakenings of the Helm chart and of the admin port's POST /quitquitquit (see tests/mutation.py): the
NetworkPolicy's peers, pods and API server rule, the labels of pod templates, resources and workers, the NOTES
warning for Jobs, and the loopback-only graceful shutdown on request."""

from __future__ import annotations

from tests.mutation import Mutant

CHART = "tests/test_chart.py"
QUIT = "tests/test_quitquitquit.py"
HELPERS = "charts/aml-auth-proxy/templates/_helpers.tpl"
POLICY = "charts/aml-auth-proxy/templates/networkpolicy.yaml"

MUTANTS = [
    # --- NetworkPolicy ---------------------------------------------------------------------------------------
    Mutant(
        name="network_policy_blocks_the_helm_test_pod",
        path=HELPERS,
        old='{{- $from = append $from (dict "podSelector" (dict "matchLabels" $testPod)) }}',
        new="{{- $from = $from }}",
        tests=(f"{CHART}::test_network_policy_admits_the_helm_test_pod_and_the_scraper_to_the_admin_port",),
    ),
    Mutant(
        name="network_policy_rendered_in_sidecar_mode",
        path=POLICY,
        old="{{- if and .Values.networkPolicy.enabled .Values.standalone.enabled }}",
        new="{{- if .Values.networkPolicy.enabled }}",
        tests=(f"{CHART}::test_network_policy_never_selects_your_own_pods_in_sidecar_mode",),
    ),
    Mutant(
        name="network_policy_selects_every_pod_running_the_proxy",
        path=POLICY,
        old='      {{- include "aml-auth-proxy.selectorLabels" . | nindent 6 }}\n',
        new="",
        tests=(f"{CHART}::test_network_policy_never_selects_your_own_pods_in_sidecar_mode",),
    ),
    Mutant(
        name="network_policy_without_the_api_server",
        path=HELPERS,
        old='{{- if (include "aml-auth-proxy.kubeFeatures" . | fromJson).apiToken }}',
        new="{{- if false }}",
        tests=(f"{CHART}::test_network_policy_egress_reaches_the_api_server_when_a_kubernetes_feature_is_on",),
    ),
    Mutant(
        name="network_policy_api_server_everywhere",
        path=HELPERS,
        old='{{- if (include "aml-auth-proxy.kubeFeatures" . | fromJson).apiToken }}',
        new="{{- if true }}",
        tests=(f"{CHART}::test_network_policy_egress_reaches_the_api_server_when_a_kubernetes_feature_is_on",),
    ),
    Mutant(
        name="network_policy_api_server_cidrs_ignored",
        path=HELPERS,
        old="  {{- with $api.cidrs }}",
        new="  {{- with list }}",
        tests=(f"{CHART}::test_network_policy_egress_reaches_the_api_server_when_a_kubernetes_feature_is_on",),
    ),
    Mutant(
        name="network_policy_helpers_leave_out_the_scraper",
        path=HELPERS,
        old="{{- $from = concat $from (.Values.networkPolicy.ingress.adminFrom | default list) }}",
        new="{{- $from = $from }}",
        tests=(f"{CHART}::test_your_own_network_policy_takes_the_proxys_rules_from_the_helpers",),
    ),
    # --- labels ----------------------------------------------------------------------------------------------
    Mutant(
        name="common_labels_not_on_the_pod_template",
        path="charts/aml-auth-proxy/templates/deployment.yaml",
        old="($s.podLabels | default dict) (.Values.commonLabels | default dict)",
        new="($s.podLabels | default dict)",
        tests=(f"{CHART}::test_common_labels_reach_the_standalone_pod_template",),
    ),
    Mutant(
        name="pod_labels_name_your_app_aml_auth_proxy",
        path=HELPERS,
        old='{{ include "aml-auth-proxy.proxySelectorLabels" . }}\n{{- if .Values.workloadIdentity.enabled }}',
        new=(
            '{{ include "aml-auth-proxy.proxySelectorLabels" . }}\n{{ include "aml-auth-proxy.selectorLabels" . }}\n'
            "{{- if .Values.workloadIdentity.enabled }}"
        ),
        tests=(f"{CHART}::test_your_pods_keep_their_own_labels_and_no_chart_policy_selects_them",),
    ),
    # --- resources and workers -------------------------------------------------------------------------------
    Mutant(
        name="limit_below_request_accepted",
        path=HELPERS,
        old="(lt $limN $reqN)",
        new="(lt $limN 0.0)",
        tests=(f"{CHART}::test_contradictory_values_fail_with_a_clear_message",),
    ),
    Mutant(
        name="quantity_binary_suffix_read_as_decimal",
        path=HELPERS,
        old="{{ $n = mulf $n 1024 }}",
        new="{{ $n = mulf $n 1000 }}",
        tests=(f"{CHART}::test_contradictory_values_fail_with_a_clear_message",),
    ),
    Mutant(
        name="quantity_milli_suffix_ignored",
        path=HELPERS,
        old="{{- $n = divf $n 1000 }}",
        new="{{- $n = $n }}",
        tests=(f"{CHART}::test_workers_follow_the_cpu_limit_unless_set",),
    ),
    Mutant(
        name="workers_auto_without_a_cpu_limit",
        path=HELPERS,
        old='{{- else if kindIs "invalid" $cpu }}\n{{- 1 }}',
        new='{{- else if kindIs "invalid" $cpu }}\n{{- 0 }}',
        tests=(f"{CHART}::test_workers_follow_the_cpu_limit_unless_set",),
    ),
    Mutant(
        name="workers_round_the_cpu_limit_down",
        path=HELPERS,
        old="(int (ceil $cores))",
        new="(int (floor $cores))",
        tests=(f"{CHART}::test_workers_follow_the_cpu_limit_unless_set",),
    ),
    Mutant(
        name="workers_set_by_the_user_ignored",
        path=HELPERS,
        old="{{- if gt $set 0 }}",
        new="{{- if false }}",
        tests=(f"{CHART}::test_workers_follow_the_cpu_limit_unless_set",),
    ),
    # --- Jobs ------------------------------------------------------------------------------------------------
    Mutant(
        name="notes_do_not_warn_about_jobs",
        path="charts/aml-auth-proxy/templates/NOTES.txt",
        old="{{- if not $native }}\n\nWARNING: the proxy renders as a plain container",
        new="{{- if false }}\n\nWARNING: the proxy renders as a plain container",
        tests=(f"{CHART}::test_notes_warn_that_a_job_with_a_plain_container_proxy_must_ask_it_to_quit",),
    ),
    Mutant(
        name="quitquitquit_from_any_address",
        path="proxy/health.py",
        old='if path == "/quitquitquit" and not _from_loopback(request):',
        new='if path == "/quitquitquit" and False:',
        tests=(f"{QUIT}::test_quitquitquit_beyond_loopback_is_a_json_403_even_with_allow_remote_refresh",),
    ),
    Mutant(
        name="quitquitquit_opened_by_allow_remote_refresh",
        path="proxy/health.py",
        old='if path == "/quitquitquit" and not _from_loopback(request):',
        new='if path == "/quitquitquit" and not self.allow_remote_refresh and not _from_loopback(request):',
        tests=(f"{QUIT}::test_quitquitquit_beyond_loopback_is_a_json_403_even_with_allow_remote_refresh",),
    ),
    Mutant(
        name="quitquitquit_stops_before_it_answers",
        path="proxy/health.py",
        old="        asyncio.get_running_loop().call_soon(stop)\n",
        new="        stop()\n",
        tests=(f"{QUIT}::test_quitquitquit_from_loopback_answers_first_then_starts_the_shutdown",),
    ),
    Mutant(
        name="quitquitquit_leaves_readiness_on",
        path="proxy/health.py",
        old="        self.lifecycle.shutting_down = True  # unready from this answer on",
        new="        pass  # unready from this answer on",
        tests=(f"{QUIT}::test_quitquitquit_from_loopback_answers_first_then_starts_the_shutdown",),
    ),
    Mutant(
        name="quitquitquit_not_wired_to_the_service",
        path="proxy/app.py",
        old="self.lifecycle = Lifecycle(request_stop=_sigterm_self if admin else None)",
        new="self.lifecycle = Lifecycle()",
        tests=(f"{QUIT}::test_quitquitquit_from_loopback_answers_202_drains_and_the_proxy_exits_0",),
    ),
    Mutant(
        name="quitquitquit_never_stops_the_process",
        path="proxy/app.py",
        old="    os.kill(os.getpid(), signal.SIGTERM)\n",
        new="    pass\n",
        tests=(f"{QUIT}::test_quitquitquit_from_loopback_answers_202_drains_and_the_proxy_exits_0",),
    ),
]
