"""Weakenings that the token-endpoint and Entra ID fault tests (test_token_faults.py) must catch.

The `already_expired_token_installed` mutant applies once the refresher rejects an already-expired token (the fix
proposed with these tests); before that, its tests fail on the unweakened proxy too.
"""

from __future__ import annotations

from tests.mutation import Mutant

T = "tests/faults/test_token_faults.py::"
ENDPOINT = T + "test_token_endpoint_fault_is_classified_logged_once_served_through_then_503_and_recovers"
ENTRA = T + "test_entra_fault_on_arm_token_renewal_is_classified_logged_once_and_served_through"
TLS = T + "test_tls_errors_are_classified_transient_not_crashes"

MUTANTS = [
    Mutant(
        name="token_refresh_failed_logged_on_every_retry",
        path="proxy/refresher.py",
        old="            level = logging.DEBUG  # one line per reason in a run of failures, not one per retry",
        new="            level = level",
        tests=(ENDPOINT + "[http_500-v2]", ENTRA + "[invalid_json]"),
    ),
    Mutant(
        name="retry_after_ignored",
        path="proxy/refresher.py",
        old="            delay = max(delay, retry_after)",
        new="            delay = delay",
        tests=(T + "test_429_retry_after_delays_the_next_token_call[v2]",),
    ),
    Mutant(
        name="token_dropped_on_first_failed_refresh",
        path="proxy/refresher.py",
        old="        if self._clock.time() >= self._usable_until:\n",
        new="        if self._clock.time() >= self._usable_until or self._failures > 0:\n",
        tests=(ENDPOINT + "[http_503-v1]", ENTRA + "[missing_fields]"),
    ),
    Mutant(
        name="token_served_past_expiry",
        path="proxy/refresher.py",
        old="        if self._clock.time() >= self._usable_until:\n",
        new="        if self._clock.time() >= self._usable_until + 3600:\n",
        tests=(
            ENDPOINT + "[invalid_json-v1]",
            T + "test_a_jwt_exp_earlier_than_the_reported_expiry_wins_and_is_never_used_past[v2]",
        ),
    ),
    Mutant(
        name="4xx_classified_transient",
        path="proxy/credentials/http.py",
        old='raise PermanentError(f"{self._what}: HTTP {status}{_error_code(raw)}", status=status)',
        new='raise TransientError(f"{self._what}: HTTP {status}{_error_code(raw)}", status=status)',
        tests=(ENDPOINT + "[http_403-v2]",),
    ),
    Mutant(
        name="reported_expiry_trusted_over_jwt_exp",
        path="proxy/credentials/aml.py",
        old="expires_at = min(expires_at, jwt_expires)",
        new="expires_at = max(expires_at, jwt_expires)",
        tests=(T + "test_a_jwt_exp_earlier_than_the_reported_expiry_wins_and_is_never_used_past[v1]",),
    ),
    Mutant(
        name="already_expired_token_installed",
        path="proxy/refresher.py",
        old="        if token.expires_at is not None and token.expires_at <= now:\n",
        new="        if False:\n",
        tests=(
            T + "test_an_already_expired_token_is_a_transient_error_and_the_current_token_keeps_serving[v1]",
            T + "test_an_already_expired_token_at_startup_leaves_the_route_unready_without_a_hot_loop[v2]",
        ),
    ),
    Mutant(
        name="tls_error_not_classified",
        path="proxy/credentials/http.py",
        old='            return "TLS certificate not trusted"\n',
        new='            return "TLS handshake failed"\n',
        tests=(TLS + "[untrusted_ca-control_plane]", TLS + "[wrong_hostname-control_plane]"),
    ),
    Mutant(
        name="refresh_timeout_crashes_the_refresher",
        path="proxy/refresher.py",
        old='            self._failed(TransientError("timed out"), loop.time() - t0)\n            return',
        new="            raise",
        tests=(
            "tests/test_refresher.py::test_a_source_that_hangs_is_cut_off_as_a_transient_failure_and_the_refresher_lives_on",
        ),
    ),
    Mutant(
        name="token_endpoint_timeout_not_classified",
        path="proxy/credentials/http.py",
        old='raise TransientError(f"{self._what}: timed out") from exc',
        new="raise",
        tests=(ENDPOINT + "[timeout-v2]",),
    ),
    Mutant(
        name="entra_reason_carries_the_description",
        path="proxy/credentials/identity.py",
        old='    reason = f"Entra ID: HTTP {status} ({code})"',
        new='    reason = f"Entra ID: HTTP {status} ({code}) {exc}"',
        tests=(ENTRA + "[http_500]", ENTRA + "[http_400]"),
    ),
    Mutant(
        name="entra_retries_inside_azure_core",
        path="proxy/credentials/identity.py",
        old='            "retry_total": 0,\n',
        new="",
        tests=(ENTRA + "[http_500]",),
    ),
    Mutant(
        name="entra_malformed_answer_not_classified",
        path="proxy/credentials/identity.py",
        old="except (DecodeError, KeyError, ValueError, TypeError) as exc:",
        new="except DecodeError as exc:",
        tests=(ENTRA + "[missing_fields]",),
    ),
    Mutant(
        name="entra_call_without_its_own_timeout",
        path="proxy/credentials/identity.py",
        old="async with asyncio.timeout(self._timeout):",
        new="async with asyncio.timeout(None):",
        tests=(ENTRA + "[slow]",),
    ),
    Mutant(
        name="every renewed token kept for redaction for the life of the process",
        path="proxy/logs.py",
        old="                self._renewed.setdefault(owner, deque(maxlen=GENERATIONS)).append(kept)\n",
        new="                self._fixed.update(kept)\n",
        tests=("tests/test_refresher.py::test_renewed_tokens_leave_the_redactor_bounded_while_fixed_secrets_stay",),
    ),
    Mutant(
        name="entra_trusts_certifi_not_the_system_store",
        path="proxy/credentials/identity.py",
        old="                connection_verify=self._ca_file or system_ca_store(),\n",
        new="                connection_verify=self._ca_file or True,\n",
        tests=(
            "tests/test_tokens_e2e.py::test_without_auth_ca_file_entra_and_the_control_plane_trust_the_system_store",
        ),
    ),
    Mutant(
        name="credential_answer_unbounded",
        path="proxy/credentials/http.py",
        old="        if size > MAX_ANSWER_BYTES:\n",
        new="        if False:\n",
        tests=(
            "tests/test_credential_http.py::test_an_endless_answer_is_cut_and_transient_and_a_non_http_url_is_permanent",
        ),
    ),
    Mutant(
        name="admin_port_takes_any_method",
        path="proxy/health.py",
        old="        if request.method not in methods:\n",
        new="        if False:\n",
        tests=(
            "tests/abuse/test_boundaries.py::"
            "test_the_admin_port_answers_its_five_paths_and_json_errors_for_anything_else",
        ),
    ),
    Mutant(
        name="aiohttp_back_in_the_proxy_process",
        path="proxy/app.py",
        old="from prometheus_client import CollectorRegistry\n",
        new="import aiohttp.web  # noqa: F401\nfrom prometheus_client import CollectorRegistry\n",
        tests=("tests/test_tokens_e2e.py::test_a_running_proxy_loads_neither_aiohttp_nor_for_key_routes_cryptography",),
    ),
    Mutant(
        name="pyjwt_loaded_by_every_route",
        path="proxy/credentials/http.py",
        old="from proxy import __version__\n",
        new="import jwt  # noqa: F401\nfrom proxy import __version__\n",
        tests=("tests/test_tokens_e2e.py::test_a_running_proxy_loads_neither_aiohttp_nor_for_key_routes_cryptography",),
    ),
]
