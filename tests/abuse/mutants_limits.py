"""Weakenings that the limit tests must catch (run by `make mutants`)."""

from tests.mutation import Mutant

_T = "tests/abuse/test_limits.py::"

MUTANTS = [
    Mutant(
        name="parser messages (with the caller's bytes) used as the error reason",
        path="proxy/forwarding.py",
        old="        status, reason = parse_error(exc, status)\n",
        new='        status, reason = parse_error(exc, status)[0], str(getattr(exc, "message", ""))[:300]\n',
        tests=(_T + "test_an_oversized_header_field_gets_431_and_its_bytes_are_never_echoed_or_logged",),
    ),
    Mutant(
        name="no check of the whole header block",
        path="proxy/forwarding.py",
        old="for k, v in request.raw_headers) > limits.max_header_bytes:",
        new="for k, v in request.raw_headers) > 1 << 40:",
        tests=(_T + "test_a_header_block_over_the_limit_gets_431",),
    ),
    Mutant(
        name="too many headers answered 400",
        path="proxy/forwarding.py",
        old='    if text.startswith("Too many headers"):',
        new="    if False:",
        tests=(_T + "test_too_many_header_fields_get_431",),
    ),
    Mutant(
        name="an oversized request line answered 431",
        path="proxy/forwarding.py",
        old='            return 414, "request line too long"',
        new='            return 431, "request line too long"',
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
        old="            if self._max_body and total > self._max_body:",
        new="            if False:",
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
        path="proxy/forwarding.py",
        old="            self.over_limit = True",
        new="            pass",
        tests=(_T + "test_a_connection_over_the_limit_gets_503_with_retry_after_and_is_closed",),
    ),
    Mutant(
        name="aiohttp's 75 s keep-alive instead of the client timeout",
        path="proxy/forwarding.py",
        old="            keepalive_timeout=limits.client_timeout_seconds,",
        new="            keepalive_timeout=75,",
        tests=(_T + "test_a_slow_request_head_is_cut_off_after_the_client_timeout",),
    ),
]
