"""Weakenings at a token's edges that the tests must catch: the expiry margin, retries while a route has no usable
token, the log lines of an outage, the libraries' logging, and a credential task that dies."""

from __future__ import annotations

from tests.mutation import Mutant

T = "tests/faults/test_token_faults.py::"
R = "tests/test_refresher.py::"
C = "tests/faults/test_credential_task_faults.py::"
L = "tests/test_log_lines.py::"
MARGIN = T + "test_a_token_is_never_sent_in_its_last_seconds_to_a_front_end_whose_clock_runs_ahead"
RESUMES = T + "test_service_resumes_within_two_seconds_of_the_token_endpoint_answering_again"
OPERATOR = T + "test_an_operator_reads_when_503s_began_how_long_they_lasted_and_no_azure_chatter"
LOGGED = R + "test_token_expired_marks_when_503s_begin_and_token_restored_says_how_long_they_lasted"
DYING = C + "test_a_dying_credential_task_makes_the_route_unready_emits_an_event_and_is_restarted"

MUTANTS = [
    Mutant(
        name="expiry_margin_ignored",
        path="proxy/refresher.py",
        old="            usable_until = token.expires_at - self._margin\n",
        new="            usable_until = token.expires_at\n",
        tests=(MARGIN + "[v2]", R + "test_a_token_is_never_handed_out_in_its_last_expiry_margin"),
    ),
    Mutant(
        name="expiry_margin_not_capped_for_short_tokens",
        path="proxy/refresher.py",
        old="self._margin = min(self._policy.expiry_margin_seconds, EXPIRY_MARGIN_MAX_FRACTION * lifetime)",
        new="self._margin = self._policy.expiry_margin_seconds",
        tests=(R + "test_the_expiry_margin_of_a_short_lived_token_is_a_tenth_of_its_life_and_renewal_comes_before_it",),
    ),
    Mutant(
        name="backoff_not_capped_without_a_usable_token",
        path="proxy/refresher.py",
        old="                delay = min(delay, self._unusable_retry())\n",
        new="                delay = delay\n",
        tests=(
            RESUMES + "[v1]",
            R + "test_without_a_usable_token_retries_come_within_a_second_and_service_resumes_within_two",
        ),
    ),
    Mutant(
        # The same weakening, seen from outside: the 10 s outage soak with the proxy and the emulator as processes.
        name="backoff_not_capped_without_a_usable_token (outage soak)",
        path="proxy/refresher.py",
        old="                delay = min(delay, self._unusable_retry())\n",
        new="                delay = delay\n",
        tests=("tests/test_soak_outage.py",),
    ),
    Mutant(
        name="retry_not_brought_forward_when_the_token_goes",
        path="proxy/refresher.py",
        old="            self._next_at = min(self._next_at, max(self._not_before, now + self._unusable_retry()))\n",
        new="            pass\n",
        tests=(R + "test_a_retry_planned_past_the_tokens_end_is_brought_forward_when_the_token_goes",),
    ),
    Mutant(
        name="token_expired_logged_only_when_the_next_fetch_is_due",
        path="proxy/refresher.py",
        old="delay = min(delay, self._usable_until - now)  # wake when its use ends",
        new="delay = delay  # wake when its use ends",
        tests=(LOGGED,),
    ),
    Mutant(
        name="failure_reason_coming_back_logged_again",
        path="proxy/refresher.py",
        old="        changed = seen not in self._reasons and len(self._reasons) < _MAX_REASONS\n",
        new="        changed = seen != (self._last_outcome, self._last_reason)\n",
        tests=(LOGGED,),
    ),
    Mutant(
        name="library_loggers_left_at_info",
        path="proxy/logs.py",
        old="        logging.getLogger(name).setLevel(logging.WARNING)\n",
        new="        logging.getLogger(name).setLevel(logging.NOTSET)\n",
        tests=(L + "test_libraries_write_warnings_only_and_every_record_is_one_json_line", OPERATOR),
    ),
    Mutant(
        name="library_repeats_not_held_back",
        path="proxy/logs.py",
        old="                return False\n",
        new="                return True\n",
        tests=(L + "test_a_librarys_repeated_warning_is_written_once_a_minute_with_the_count", OPERATOR),
    ),
    Mutant(
        name="credential_task_failure_not_in_readyz",
        path="proxy/health.py",
        old='            ok, why = False, failed if ok else f"{failed}; {why}"\n',
        new="            pass\n",
        tests=(DYING,),
    ),
    Mutant(
        name="credential_task_not_restarted",
        path="proxy/app.py",
        old="            await self.clock.sleep(delay)\n",
        new="            await asyncio.Event().wait()\n",
        tests=(DYING, C + "test_restarts_back_off_doubling_to_thirty_seconds_and_start_over_after_a_long_run"),
    ),
    Mutant(
        name="credential_task_backoff_not_capped",
        path="proxy/app.py",
        old="            delay = min(delay * 2, RESTART_MAX_SECONDS)\n",
        new="            delay = delay * 2\n",
        tests=(C + "test_restarts_back_off_doubling_to_thirty_seconds_and_start_over_after_a_long_run",),
    ),
]
