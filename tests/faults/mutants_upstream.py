"""Weakened proxies for tests/faults/test_upstream_faults.py and tests/faults/test_process_faults.py (see
tests/mutation.py): each mutant removes one behaviour, and the tests named for that behaviour must then fail."""

from __future__ import annotations

from tests.mutation import Mutant

UP = "tests/faults/test_upstream_faults.py::"
PROC = "tests/faults/test_process_faults.py::"
RESEND_TEST = (
    "tests/test_upstream_client.py::"
    "test_a_pooled_connection_the_upstream_closed_as_the_request_arrived_is_resent_on_only_for_idempotent_methods"
)
UPLOAD = PROC + "test_sigterm_during_a_1_gib_upload_never_passes_on_a_truncated_body"
FWD = "proxy/forwarding.py"
_SHUTDOWN = "        self.closing = True\n        if not self._queue and self.transport is not None:\n"
UPSTREAM = "proxy/upstream.py"
RETRY = "retried = await pool.request(request.method, url, headers, body)\n"
RESEND = "                if attempt == 0 and reused and resendable and err.before_answer:\n"

MUTANTS = [
    Mutant(
        name="refused connection answered as a timeout",
        path=UPSTREAM,
        old='raise UpstreamError("connect", "upstream connection failed") from exc',
        new='raise UpstreamError("timeout", "upstream connection failed", 504) from exc',
        tests=(UP + "test_connection_refused_gives_json_502_and_the_route_recovers",),
    ),
    Mutant(
        name="no per-read timeout upstream",
        path=UPSTREAM,
        old="        read_timeout=t.read,\n",
        new="        read_timeout=3600.0,\n",
        tests=(UP + "test_stall_before_the_headers_gives_json_504",),
    ),
    Mutant(
        name="invalid upstream answers counted as resets",
        path=UPSTREAM,
        old='    return UpstreamError("protocol", "upstream sent an invalid response")',
        new='    return UpstreamError("reset", "upstream sent an invalid response")',
        tests=(UP + "test_malformed_response_head_gives_json_502",),
    ),
    Mutant(
        name="a broken answer is ended cleanly instead of cutting the caller's connection",
        path=FWD,
        old="            request.abort()\n            return 502, sent, waited\n",
        new="            await request.end()\n            return 502, sent, waited\n",
        tests=(
            UP + "test_reset_mid_response_cuts_the_callers_connection",
            UP + "test_stall_after_the_headers_cuts_the_callers_connection_as_a_timeout",
            UP + "test_trickle_slower_than_the_read_timeout_is_cut_as_a_timeout",
            UP + "test_bad_chunked_encoding_cuts_the_callers_connection",
        ),
    ),
    Mutant(
        name="the read timeout bounds the whole exchange",
        path=UPSTREAM,
        old="        total_timeout=t.total,\n",
        new="        total_timeout=t.read,\n",
        tests=(UP + "test_trickle_within_the_read_timeout_is_delivered_intact",),
    ),
    Mutant(
        name="5xx answers retried with the other credential",
        path=FWD,
        old="if upstream.status == 401 and not caller_credential:",
        new="if upstream.status in (401, 500, 503) and not caller_credential:",
        tests=(UP + "test_5xx_burst_is_passed_through_with_its_body_and_never_retried",),
    ),
    Mutant(
        name="any method resent once after the upstream disconnected, on a new connection or a reused one",
        path=UPSTREAM,
        old=RESEND,
        new="                if attempt == 0 and not streamed:\n",
        tests=(
            UP + "test_post_is_not_resent_after_the_upstream_read_its_body_and_reset",
            UP + "test_post_on_a_reused_connection_the_upstream_just_closed_is_not_resent",
        ),
    ),
    Mutant(
        name="a POST resent after a reused connection turned out closed",
        path=UPSTREAM,
        old="        resendable = resend_if_stale and not streamed and method in IDEMPOTENT\n",
        new="        resendable = resend_if_stale and not streamed\n",
        tests=(
            UP + "test_post_on_a_reused_connection_the_upstream_just_closed_is_not_resent",
            RESEND_TEST + "[POST]",
        ),
    ),
    Mutant(
        name="the resend after a 401 is resent again after a disconnect",
        path=FWD,
        old="        " + RETRY,
        new=("        try:\n            " + RETRY + "        except UpstreamError:\n            " + RETRY),
        tests=(UP + "test_post_is_resent_once_after_a_401_and_never_again",),
    ),
    Mutant(
        name="idempotent requests not resent after a reused connection turned out closed",
        path=UPSTREAM,
        old="        resend_if_stale: bool = True,\n",
        new="        resend_if_stale: bool = False,\n",
        tests=(UP + "test_get_on_a_reused_connection_the_upstream_just_closed_succeeds", RESEND_TEST + "[GET]"),
    ),
    Mutant(
        name="pooled connections the upstream closed are reused as if alive",
        path=UPSTREAM,
        old="        self.closed = True\n        return False\n",
        new="        return True\n",
        tests=(UP + "test_upstream_closing_after_each_response_without_connection_close_fails_nothing",),
    ),
    Mutant(
        name="a request body that breaks off is passed on as complete",
        path=FWD,
        old=(
            "        chunk = await self._content.read_any()\n"
            "        if not chunk:\n            raise StopAsyncIteration\n"
        ),
        new=(
            "        try:\n            chunk = await self._content.read_any()\n"
            "        except BaseException:\n            raise StopAsyncIteration from None\n"
            "        if not chunk:\n            raise StopAsyncIteration\n"
        ),
        # Chunked only: with a Content-Length the upstream itself notices a short body. (At the end of the grace
        # period the upstream connection is closed before the body's reader fails, so that test cannot see it.)
        tests=("tests/test_server.py::test_a_caller_leaving_mid_upload_never_passes_on_a_complete_body",),
    ),
    Mutant(
        name="no grace period on SIGTERM",
        path="proxy/app.py",
        old="drains.append(self._proxy_server.shutdown(self.settings.shutdown_grace_seconds))",
        new="drains.append(self._proxy_server.shutdown(0.2))",
        tests=(
            PROC + "test_sigterm_with_500_requests_in_flight_lets_all_finish_and_exits_0",
            UPLOAD + "[grace-long-enough-chunked]",
            UPLOAD + "[grace-long-enough-content-length]",
        ),
    ),
    Mutant(
        name="bytes of an upload in flight dropped once shutdown began",
        path="proxy/server.py",
        old=_SHUTDOWN,
        new=_SHUTDOWN.replace("\n", "\n        self._stop_parsing = True\n", 1),
        tests=(
            "tests/faults/test_process_faults.py::test_sigterm_during_a_1_gib_upload_never_passes_on_a_truncated_body",
        ),
    ),
    Mutant(
        name="a stale pooled connection not resent on in the request path without a task",
        path=FWD,
        old="            if error.before_answer and request.method in IDEMPOTENT:\n",
        new="            if False:\n",
        tests=(UP + "test_get_on_a_reused_connection_the_upstream_just_closed_succeeds",),
    ),
    Mutant(
        name="a 401 on a pooled connection passed to the caller without the retry",
        path=FWD,
        old="(upstream.status != 401 or _sends_callers_credential(rt, x.cred, request))",
        new="True",
        tests=(UP + "test_post_is_resent_once_after_a_401_and_never_again[pooled connection]",),
    ),
    Mutant(
        name="a connection timer armed by an earlier exchange is not set again",
        path=UPSTREAM,
        old="        self._conn.watch(self._due())\n",
        new="        pass\n",
        tests=(UP + "test_stall_before_the_headers_gives_json_504[pooled connection]",),
    ),
    Mutant(
        name="a POST on a stale pooled connection resent in the request path without a task",
        path=FWD,
        old="            if error.before_answer and request.method in IDEMPOTENT:\n",
        new="            if error.before_answer:\n",
        tests=(UP + "test_post_on_a_reused_connection_the_upstream_just_closed_is_not_resent",),
    ),
    Mutant(
        name="a 401 answered from a pooled connection's callback is not counted",
        path=FWD,
        old="        _count_auth_failure(rt, upstream)\n",
        new="",
        tests=(UP + "test_every_401_and_403_the_upstream_sends_is_counted_once[pooled connection]",),
    ),
    Mutant(
        name="a 401 on a new connection is not counted",
        path=FWD,
        old="                upstream = _count_auth_failure(\n",
        new="                upstream = (lambda rt, answer: answer)(\n",
        tests=(UP + "test_every_401_and_403_the_upstream_sends_is_counted_once[new connection]",),
    ),
    Mutant(
        name="the retry's 401 is not counted",
        path=FWD,
        old="        return _count_auth_failure(rt, retried)\n",
        new="        return retried\n",
        tests=(UP + "test_every_401_and_403_the_upstream_sends_is_counted_once",),
    ),
    Mutant(
        name="a 403 is not counted",
        path=FWD,
        old="    if status == 401 or status == 403:\n",
        new="    if status == 401:\n",
        tests=(UP + "test_every_401_and_403_the_upstream_sends_is_counted_once",),
    ),
]
