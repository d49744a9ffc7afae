"""Weakened upstream clients for tests/test_upstream_client.py (see tests/mutation.py): each mutant removes one
behaviour of proxy/upstream.py, and the tests named for it must then fail."""

from __future__ import annotations

from tests.mutation import Mutant

T = "tests/test_upstream_client.py::"
UPSTREAM = "proxy/upstream.py"
_CANCEL = "            sender.cancel()  # the upstream answered before taking the whole upload\n"

MUTANTS = [
    Mutant(
        name="a HEAD answer waits for the body its Content-Length announces",
        path=UPSTREAM,
        old="        if self._no_body or status in _NO_BODY_STATUS:\n",
        new="        if status in _NO_BODY_STATUS:\n",
        tests=(T + "test_a_head_answer_ends_at_its_head_and_the_connection_is_reused",),
    ),
    Mutant(
        name="an informational answer taken as the final one",
        path=UPSTREAM,
        old="        if status < 200:\n",
        new="        if status < 100:\n",
        tests=(T + "test_informational_answers_are_skipped_for_the_final_one",),
    ),
    Mutant(
        name="no pause when the caller reads slowly",
        path=UPSTREAM,
        old="        if self._buffered > _HIGH_WATER and not self._paused",
        new="        if False and not self._paused",
        tests=(T + "test_a_caller_reading_slowly_pauses_the_upstream_instead_of_buffering",),
    ),
    Mutant(
        name="no bound on upstream connections",
        path=UPSTREAM,
        old="            if not self._limit or len(self._all) < self._limit:\n",
        new="            if True:\n",
        tests=(T + "test_requests_beyond_max_connections_wait_for_a_free_one",),
    ),
    Mutant(
        name="idle connections kept forever",
        path=UPSTREAM,
        old="            self._sweeper = self.loop.call_later(self._keepalive, self._sweep)\n",
        new="            pass\n",
        tests=(T + "test_idle_connections_are_closed_after_keepalive_seconds",),
    ),
    Mutant(
        name="a connection with an unfinished upload goes back to the pool",
        path=UPSTREAM,
        old=_CANCEL + "            self._reusable = False\n",
        new=_CANCEL,
        tests=(T + "test_an_answer_before_the_upload_ends_stops_the_upload_and_drops_the_connection",),
    ),
    Mutant(
        name="timeouts.total ignored",
        path=UPSTREAM,
        old="        return None if self._total_timeout is None else self.loop.time() + self._total_timeout\n",
        new="        return None\n",
        tests=(T + "test_total_timeout_bounds_an_answer_that_keeps_trickling",),
    ),
    Mutant(
        name="a line break in a header value sent as is",
        path=UPSTREAM,
        old='        if head.count(b"\\n") != len(headers) + 3:',
        new="        if False:",
        tests=(T + "test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent",),
    ),
    Mutant(
        name="a stream without Content-Length sent without chunked framing",
        path=UPSTREAM,
        old='        chunked = streamed and "Transfer-Encoding" in headers\n',
        new="        chunked = False\n",
        tests=(T + "test_a_streamed_upload_arrives_whole_with_its_framing[chunked]",),
    ),
    Mutant(
        name="an upstream body that does not parse waited on until the read timeout",
        path=UPSTREAM,
        old="            self._fail(_invalid(self.head_done))\n",
        new="            pass\n",
        tests=(T + "test_an_invalid_body_fails_at_once_as_a_protocol_error_while_the_upstream_stays_connected",),
    ),
    Mutant(
        name="no bound on an answer's head",
        path=UPSTREAM,
        old="        self._room = MAX_HEAD_BYTES  # raw bytes",
        new="        self._room = 1 << 60  # raw bytes",
        tests=(T + "test_an_endless_response_head_is_cut_off_once_it_passes_the_bound",),
    ),
    Mutant(
        name="requests queue for a free connection without a bound",
        path=UPSTREAM,
        old="                async with asyncio.timeout_at(deadline):\n                    await waiter\n",
        new="                async with asyncio.timeout_at(None):\n                    await waiter\n",
        tests=(T + "test_waiting_for_a_free_connection_is_bounded_by_the_connect_timeout",),
    ),
    Mutant(
        name="a wake-up lost when its waiter is cancelled",
        path=UPSTREAM,
        old="                    self._wake_one()  # woken, then cancelled or timed out: pass the free slot on\n",
        new="                    pass\n",
        tests=(T + "test_a_waiter_cancelled_after_it_was_woken_passes_the_free_connection_on",),
    ),
    Mutant(
        name="an upload that broke after the answer began is left for asyncio to log",
        path=UPSTREAM,
        old="        elif sender is not None and not sender.cancelled() and sender.exception() is not None:\n",
        new="        elif False:\n",
        tests=(T + "test_an_upload_failing_after_the_answer_began_is_reported_nowhere_and_drops_the_connection",),
    ),
    Mutant(
        name="any Transfer-Encoding taken as chunked",
        path=UPSTREAM,
        old='codings += 1 if value.strip(b" \\t").lower() == b"chunked" else 2',
        new="codings += 1",
        tests=(T + "test_a_transfer_coding_the_proxy_cannot_decode_is_a_protocol_error",),
    ),
]
