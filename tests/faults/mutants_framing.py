"""Weakenings of the upstream answer's framing (proxy/upstream.py, proxy/headers.py, proxy/forwarding.py,
proxy/server.py), each with the tests that must then fail (see tests/mutation.py)."""

from __future__ import annotations

from tests.mutation import Mutant

T = "tests/faults/test_upstream_framing.py::"
INTERIM = T + "test_an_interim_answer_that_cannot_be_framed_is_a_502_and_never_reaches_the_caller"

MUTANTS = [
    Mutant(
        name="an interim answer's body passed on",
        path="proxy/upstream.py",
        old='            elif any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self._pairs):',
        new="            elif False:",
        tests=(INTERIM,),
    ),
    Mutant(
        name="any 1xx taken as interim",
        path="proxy/upstream.py",
        old="            if status not in _INTERIM:\n",
        new="            if False:\n",
        tests=(INTERIM,),
    ),
    Mutant(
        name="Connection may name Content-Length",
        path="proxy/headers.py",
        old='    named.discard("content-length")',
        new="    pass",
        tests=(T + "test_connection_naming_content_length_does_not_strip_the_framing",),
    ),
    Mutant(
        name="no bound on trailers",
        path="proxy/upstream.py",
        old="            if self.head_done and not self._chunked:\n                parser.feed_data(data)",
        new="            if self.head_done:\n                parser.feed_data(data)",
        tests=(T + "test_endless_trailers_are_cut_off_at_the_framing_bound",),
    ),
    Mutant(
        name="a pooled connection left paused",
        path="proxy/upstream.py",
        old="        if self._paused:  # the whole body came while reading was paused",
        new="        if False:  # the whole body came while reading was paused",
        tests=(T + "test_a_pooled_connection_whose_answer_came_while_reading_was_paused_is_read_again",),
    ),
    Mutant(
        name="a 401 body read whole before the retry",
        path="proxy/forwarding.py",
        old="        if upstream.complete:\n            upstream.body_now()",
        new="        if True:\n            await upstream.read()",
        tests=(T + "test_a_401_with_a_large_body_is_not_read_before_the_retry",),
    ),
    Mutant(
        name="TRACE forwarded",
        path="proxy/forwarding.py",
        old='        if method == "CONNECT" or method == "TRACE":',
        new='        if method == "CONNECT":',
        tests=(T + "test_trace_and_a_transfer_coding_other_than_chunked_are_refused",),
    ),
    Mutant(
        name="a caller's gzip, chunked accepted",
        path="proxy/server.py",
        old='                elif lname == b"transfer-encoding" and b"," in value:',
        new="                elif False:",
        tests=(T + "test_trace_and_a_transfer_coding_other_than_chunked_are_refused",),
    ),
]
