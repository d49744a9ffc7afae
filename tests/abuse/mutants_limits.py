"""Weakenings that the limit tests must catch (run by `make mutants`)."""

from tests.mutation import Mutant

_T = "tests/abuse/test_limits.py::"

MUTANTS = [
    Mutant(
        name="parser messages (with the caller's bytes) used as the error reason",
        path="proxy/server.py",
        old='            raise Refused(431, "header field too large")',
        new='            raise Refused(431, "header field too large: " + value.decode("latin-1")[:300])',
        tests=(_T + "test_an_oversized_header_field_gets_431_and_its_bytes_are_never_echoed_or_logged",),
    ),
    Mutant(
        name="no check of the whole header block",
        path="proxy/server.py",
        old="        if self._head_bytes > limits.max_header_bytes:",
        new="        if False:",
        tests=(_T + "test_a_header_block_over_the_limit_gets_431",),
    ),
    Mutant(
        name="too many headers answered 400",
        path="proxy/server.py",
        old='            raise Refused(431, "too many header fields")',
        new='            raise Refused(400, "too many header fields")',
        tests=(_T + "test_too_many_header_fields_get_431",),
    ),
    Mutant(
        name="an oversized request line answered 431",
        path="proxy/server.py",
        old='            raise Refused(414, "request line too long")',
        new='            raise Refused(431, "request line too long")',
        tests=(_T + "test_an_oversized_request_line_gets_414",),
    ),
    Mutant(
        name="Content-Length over the limit not refused up front",
        path="proxy/forwarding.py",
        old="        if limits.max_body_bytes and (request.content_length or 0) > limits.max_body_bytes:",
        new="        if False:",
        tests=(_T + "test_a_body_whose_content_length_is_over_the_limit_gets_413_before_any_upstream_call",),
    ),
    Mutant(
        name="a streamed body never cut off",
        path="proxy/forwarding.py",
        old="        if self._max_body and self._total > self._max_body:",
        new="        if False:",
        tests=(_T + "test_a_chunked_body_growing_over_the_limit_gets_413_and_the_upstream_never_gets_it_complete",),
    ),
    Mutant(
        name="a buffered chunked body never cut off",
        path="proxy/forwarding.py",
        old="            if max_body and len(buf) > max_body:",
        new="            if False:",
        tests=(_T + "test_a_chunked_body_growing_over_the_limit_gets_413_and_the_upstream_never_gets_it_complete",),
    ),
    Mutant(
        name="no connection limit",
        path="proxy/server.py",
        old="            self.over_limit = True",
        new="            pass",
        tests=(_T + "test_a_connection_over_the_limit_gets_503_with_retry_after_and_is_closed",),
    ),
    Mutant(
        name="a 75 s keep-alive (aiohttp's default) instead of the client timeout",
        path="proxy/server.py",
        old="        if waited >= timeout:",
        new="        if waited >= 75:",
        tests=(_T + "test_a_slow_request_head_is_cut_off_after_the_client_timeout",),
    ),
]
