"""Framing weakenings the differential fuzzer (tests/abuse/test_differential.py) must catch, one per side (run
by `make mutants`; see tests/mutation.py). Each is named for the hypothesis test alone, not for the regressions:
the fuzzer has to find the planted bug by itself. The second list undoes each fix of a finding; its regression
test must catch it."""

from tests.mutation import Mutant

_T = "tests/abuse/test_differential.py::"
_REUSE = "        if self.complete and self._reusable and self._error is None and not self._chunks and not conn.closed:"

MUTANTS = [
    Mutant(
        # llhttp's leniency for Content-Length with Transfer-Encoding: the classic request smuggling shape.
        name="the server takes Content-Length together with Transfer-Encoding",
        path="proxy/server.py",
        old="        self._parser = httptools.HttpRequestParser(self)\n        self._limits = server.limits\n",
        new=(
            "        self._parser = httptools.HttpRequestParser(self)\n"
            "        self._parser.set_dangerous_leniencies(lenient_chunked_length=True)\n"
            "        self._limits = server.limits\n"
        ),
        tests=(_T + "test_caller_byte_streams_reach_the_upstream_exactly_as_h11_reads_them",),
    ),
    Mutant(
        # A connection whose answer forbade reuse (extra bytes, Connection: close, HTTP/1.0) goes back to the pool.
        name="the upstream pool reuses a connection whatever its answer said",
        path="proxy/upstream.py",
        old=_REUSE,
        new=_REUSE.replace(" and self._reusable", ""),
        tests=(_T + "test_upstream_answers_reach_the_caller_as_h11_reads_them_or_fail_cleanly",),
    ),
]

_R = _T + "test_regression_"

MUTANTS += [
    Mutant(
        name="a refused HEAD request gets the JSON body after its head",
        path="proxy/server.py",
        old="transport.write(head if item.head_only else head + answer)",
        new="transport.write(head + answer)",
        tests=(_R + "a_refused_head_request_gets_no_body",),
    ),
    Mutant(
        name="an HTTP/1.0 request with Transfer-Encoding keeps the connection",
        path="proxy/server.py",
        old="            if chunked:\n                keep_alive = False",
        new="            if False:\n                keep_alive = False",
        tests=(_R + "http10_with_transfer_encoding_closes_the_connection",),
    ),
    Mutant(
        name="HTTP/1.0 `Connection: keep-alive, close` keeps the connection",
        path="proxy/server.py",
        old='elif any(t.strip().lower() == "close" for v',
        new='elif any(t.strip().lower() == "nothing" for v',
        tests=(_R + "http10_close_wins_over_keep_alive",),
    ),
    Mutant(
        name="a request header value keeps its trailing whitespace",
        path="proxy/server.py",
        old='pairs.append((name, value.rstrip(b" \\t")))',
        new="pairs.append((name, value))",
        tests=(_R + "a_request_id_with_trailing_whitespace_is_used_without_it",),
    ),
    Mutant(
        name="requests parsed after the connection's last answer are still served",
        path="proxy/server.py",
        old="        self._queue.clear()  # nothing parsed after the last answer",
        new="        pass  # nothing parsed after the last answer",
        tests=(_R + "no_request_is_forwarded_after_the_connection_is_doomed",),
    ),
    Mutant(
        name="an upstream Transfer-Encoding other than chunked is read to the close and relayed",
        path="proxy/upstream.py",
        old="                if codings != 1:",
        new="                if codings > 99:",
        tests=(_R + "an_upstream_transfer_encoding_other_than_chunked_is_not_relayed",),
    ),
    Mutant(
        name="an HTTP/1.0 upstream answer framed by Transfer-Encoding goes back to the pool",
        path="proxy/upstream.py",
        old='            if self._parser.get_http_version() != "1.1":\n                self._reusable = False',
        new="            if False:\n                self._reusable = False",
        tests=(_R + "an_http10_answer_with_transfer_encoding_ends_its_connection",),
    ),
    Mutant(
        name="an HTTP/1.0 upstream answer saying `close, keep-alive` goes back to the pool",
        path="proxy/upstream.py",
        old='elif lname == b"connection" and b"close" in value.lower():',
        new='elif lname == b"connection" and b"nothing" in value.lower():',
        tests=(_R + "an_http10_answer_saying_close_ends_its_connection",),
    ),
    Mutant(
        name="an HTTP/1.0 answer to HEAD with Transfer-Encoding goes back to the pool",
        path="proxy/upstream.py",
        old=(
            '            if self._parser.get_http_version() != "1.1":\n'
            "                self._reusable = False\n"
            "            if not"
        ),
        new="            if not",
        tests=(_R + "a_head_answer_naming_a_coding_is_relayed_without_it",),
    ),
]
