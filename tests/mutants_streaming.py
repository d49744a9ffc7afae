"""Weakenings of streamed answers and of the time-to-first-byte and credential telemetry (run by `make mutants`)."""

from tests.mutation import Mutant

FWD = "proxy/forwarding.py"
_T = "tests/test_streaming.py::"

MUTANTS = [
    Mutant(
        name="a streamed answer buffered whole before the caller gets any of it",
        path=FWD,
        old="                chunk = await upstream.read_chunk()\n",
        new="                chunk = await upstream.read()\n",
        tests=(_T + "test_each_event_reaches_the_caller_before_the_upstream_sends_the_next",),
    ),
    Mutant(
        name="a caller's hang-up during an event stream's pause leaves the upstream request open",
        path=FWD,
        old="        if not conn.watch_hang_up(task.cancel, endless=has_body and not upstream.has_length):\n",
        new="        if not conn.watch_hang_up(lambda: None, endless=has_body and not upstream.has_length):\n",
        tests=(_T + "test_a_caller_that_resets_during_a_pause_closes_the_upstream_request_at_once",),
    ),
    Mutant(
        name="time to first byte of a streamed answer not recorded (taken as the whole duration)",
        path="proxy/server.py",
        old="        self.head_at = time.perf_counter()\n",
        new="",
        tests=(_T + "test_each_event_reaches_the_caller_before_the_upstream_sends_the_next",),
    ),
    Mutant(
        name="time to first byte never counted in the histogram",
        path="proxy/metrics.py",
        old="            self.ttfb_buckets[bisect_left(DURATION_BUCKETS, ttfb)] += 1\n",
        new="            pass\n",
        tests=(_T + "test_a_whole_answer_has_its_time_to_first_byte_equal_to_its_duration",),
    ),
    Mutant(
        name="time to first byte missing from the workers' merged metrics",
        path="proxy/workers.py",
        old='        "time_to_first_byte_seconds",\n',
        new="",
        tests=("tests/test_workers.py::test_three_processes_share_the_port_and_one_token_fetch_per_refresh",),
    ),
    Mutant(
        name="the last successful refresh time not set",
        path="proxy/refresher.py",
        old="        m.last_success.set(now)\n",
        new="",
        tests=("tests/test_refresher.py::test_the_last_successful_refresh_time_is_a_gauge_that_failures_leave_alone",),
    ),
    Mutant(
        name="the last successful key load time not set",
        path="proxy/credentials/keys.py",
        old="        self._metrics.last_success.set(time.time())  # a successful load, new key or not\n",
        new="",
        tests=("tests/test_keys.py::test_kubelet_symlink_swap_is_picked_up_and_bad_updates_keep_the_last_good_key",),
    ),
]

_FIN = "        if self._fin_hangs_up and len(self._queue) == 1:\n"
MUTANTS += [
    Mutant(
        name="a caller's FIN during an event stream's pause taken as a half-close (the upstream request stays open)",
        path="proxy/server.py",
        old=_FIN,
        new="        if False:\n",
        tests=(_T + "test_a_caller_that_half_closes_during_a_pause_closes_the_upstream_request_at_once",),
    ),
    Mutant(
        name="a caller's FIN during an event stream taken as a hang-up though a request is pipelined after it",
        path="proxy/server.py",
        old=_FIN,
        new="        if self._fin_hangs_up:\n",
        tests=(_T + "test_a_half_closed_caller_gets_a_streamed_answer_whole_when_it_pipelined_a_request_after_it",),
    ),
    Mutant(
        name="a caller's FIN before a streamed answer starts ignored (the answer goes to a caller that is gone)",
        path="proxy/server.py",
        old="        if self.hung_up or (endless and self.caller_done and len(self._queue) == 1):\n",
        new="        if self.hung_up:\n",
        tests=(_T + "test_a_caller_that_half_closes_before_a_streamed_answer_starts_gets_none",),
    ),
    Mutant(
        name="a caller's FIN taken as a hang-up during an answer with a length",
        path=FWD,
        old="        if not conn.watch_hang_up(task.cancel, endless=has_body and not upstream.has_length):\n",
        new="        if not conn.watch_hang_up(task.cancel, endless=has_body):\n",
        tests=(_T + "test_a_half_closed_caller_still_gets_a_whole_answer_with_a_length",),
    ),
]
MUTANTS += [
    Mutant(
        name="a share follower's last success time not set when it adopts a new token",
        path="proxy/refresher.py",
        old="        if current is None or current.value != token.value:\n",
        new="        if False:\n",
        tests=(
            "tests/test_refresher.py::test_a_share_followers_last_success_is_when_it_adopted_a_new_token_not_a_repeat",
        ),
    ),
    Mutant(
        name="a share follower's last success time set again for a token it already holds",
        path="proxy/refresher.py",
        old="        if current is None or current.value != token.value:\n",
        new="        if True:\n",
        tests=(
            "tests/test_refresher.py::test_a_share_followers_last_success_is_when_it_adopted_a_new_token_not_a_repeat",
        ),
    ),
]
