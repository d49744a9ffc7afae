"""Weakenings of the proxy port's HTTP/1.1 server that its tests must catch (run by `make mutants`)."""

from tests.mutation import Mutant

SRV = "proxy/server.py"
_T = "tests/test_server.py::"
_S = "tests/abuse/test_smuggling.py::test_malformed_or_smuggling_requests_get_a_json_400_and_never_reach_the_upstream"
_L = "tests/abuse/test_limits.py::"

MUTANTS = [
    Mutant(
        name="Expect: 100-continue never answered",
        path=SRV,
        old="            self._conn.send_continue()\n",
        new="            pass\n",
        tests=(_T + "test_expect_100_continue_is_answered_when_the_body_is_read",),
    ),
    Mutant(
        name="a pipelined request waits for ever behind the one before it",
        path=SRV,
        old="        if queue:\n            self._dispatch()\n",
        new="        if False:\n            self._dispatch()\n",
        tests=(_T + "test_pipelined_requests_are_answered_in_order",),
    ),
    Mutant(
        name="an HTTP/1.0 caller gets a chunked answer",
        path=SRV,
        old='            if self.version == "1.1":\n',
        new="            if True:\n",
        tests=(_T + "test_an_answer_without_length_is_chunked_for_http_1_1_and_ends_with_the_connection_for_1_0",),
    ),
    Mutant(
        name="HTTP/1.0 keep-alive not confirmed",
        path=SRV,
        old='        return extra + "Connection: keep-alive\\r\\n"\n',
        new="        return extra\n",
        tests=(_T + "test_http_1_0_closes_by_default_and_keeps_alive_on_request",),
    ),
    Mutant(
        name="the body of an Upgrade request dropped",
        path=SRV,
        old="                self._raw_left = (self._body_length or 0) - body.received  # read in _feed_raw_body\n",
        new="                pass\n",
        tests=(_T + "test_a_request_asking_for_an_upgrade_is_served_as_an_ordinary_one_with_its_body",),
    ),
    Mutant(
        name="a body that breaks mid-upload left waiting (no answer until a timeout)",
        path=SRV,
        old="            body.fail(refused)\n",
        new="            pass\n",
        tests=(_T + "test_a_bad_chunk_in_a_streamed_upload_is_answered_400_at_once",),
    ),
    Mutant(
        name="an HTTP/1.1 request without Host accepted",
        path=SRV,
        old='        if version == "1.1" and b"host" not in seen:',
        new="        if False:",
        tests=(_S + "[missing Host in HTTP/1.1]",),
    ),
    Mutant(
        name="a repeated single-valued header accepted",
        path=SRV,
        old="                if lname in seen:\n",
        new="                if False:\n",
        tests=(_S + "[duplicate Host]",),
    ),
    Mutant(
        name="a head fed whole, however long (llhttp buffers an unfinished header)",
        path=SRV,
        old="                cut = bounded and len(data) > self._room\n",
        new="                cut = False\n",
        tests=(_L + "test_an_endless_header_is_cut_off_at_the_limit_not_buffered",),
    ),
    Mutant(
        name="an idle keep-alive connection never closed",
        path=SRV,
        old="            if self.transport is not None:\n                self.transport.close()\n            return\n",
        new="            return\n",
        tests=(
            _L + "test_an_idle_keep_alive_connection_is_closed_after_the_client_timeout",
            _L + "test_a_slow_request_head_is_cut_off_after_the_client_timeout",
        ),
    ),
    Mutant(
        name="a chunked body's trailers fed whole, however long",
        path=SRV,
        old="                bounded = self._in_head or self._chunked\n",
        new="                bounded = self._in_head\n",
        tests=(_T + "test_endless_trailers_after_a_chunked_body_are_cut_off_not_buffered",),
    ),
    Mutant(
        name="a fault in the handler leaves the caller without an answer",
        path=SRV,
        old="        if not self.answered:\n            rid = new_request_id()\n",
        new="        if False:\n            rid = new_request_id()\n",
        tests=(_T + "test_a_fault_in_the_handler_is_a_json_500_and_one_error_line_and_the_connection_closes",),
    ),
    Mutant(
        name="the proxy's own answer to a HEAD request sent with its body",
        path=SRV,
        old='        if self.method == "HEAD":\n',
        new="        if False:\n",
        tests=(_T + "test_a_head_request_answered_by_the_proxy_itself_gets_no_body_and_the_connection_goes_on",),
    ),
    Mutant(
        name="what follows an Upgrade request's head in the same read is lost",
        path=SRV,
        old="                    data = self._after_upgrade(bytes(piece[exc.args[0] :]) + bytes(data))\n",
        new="                    data = self._after_upgrade(bytes(data))\n",
        tests=("tests/abuse/test_fragmentation.py",),
    ),
    Mutant(
        name="a caller's half-close drops the pipelined requests after the one being answered",
        path=SRV,
        old="        self.caller_done = True\n        self._stop_parsing = True\n",
        new="        self.caller_done = True\n        self._stop_parsing = True\n        self.closing = True\n",
        tests=(_T + "test_a_caller_that_half_closes_after_pipelining_gets_every_answer_then_the_close",),
    ),
]
