"""The refresh engine on an injected clock: schedule, jitter, backoff, Retry-After, single flight, expiry, skew."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import ManualClock
from proxy.config.settings import RefreshPolicy
from proxy.credentials.tokens import NothingToWatch, PermanentError, RefreshError, Token, TransientError, skew_corrected
from proxy.logs import GENERATIONS, REDACTED, REDACTOR
from proxy.metrics import Metrics
from proxy.refresher import Refresher
from tests.support.refresh import bearer_refresher, manual_policy

POLICY = manual_policy(jitter_seconds=5.0, safety_seconds=60.0, backoff_max_seconds=60.0, timeout_seconds=10.0)


class FakeSource(NothingToWatch):
    """A token source with a script: each fetch pops the next outcome (a lifetime, or an exception)."""

    auth_type = "aml-endpoint-token"

    def __init__(self, clock: ManualClock, *, lifetime: float = 3.0, refresh_after: float | None = 2.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.refresh_after = refresh_after
        self.calls: list[float] = []
        self.script: list[Any] = []
        self.gate: asyncio.Event | None = None
        self.spins = 0  # event loop turns a fetch takes, as real I/O would
        self.serial = itertools.count(1)
        self.revoked: list[Token] = []

    async def fetch(self, previous: Token | None) -> Token:
        self.calls.append(self.clock.time())
        if self.gate is not None:
            await self.gate.wait()
        for _ in range(self.spins):
            await asyncio.sleep(0)
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, BaseException):
                raise step
        now = self.clock.time()
        return Token(
            value=f"token-{next(self.serial)}",
            expires_at=now + self.lifetime,
            refresh_at=None if self.refresh_after is None else now + self.refresh_after,
        )

    async def revoke(self, token: Token) -> None:
        self.revoked.append(token)

    async def close(self) -> None:
        return None


class Reported:
    """An EventSink that keeps what it is told: (warning, reason, message)."""

    def __init__(self) -> None:
        self.events: list[tuple[bool, str, str]] = []

    def emit(self, *, warning: bool, reason: str, message: str) -> None:
        self.events.append((warning, reason, message))


def make(
    clock: ManualClock,
    source: FakeSource,
    *,
    policy: RefreshPolicy = POLICY,
    rng: Iterator[float] | None = None,
    events: Reported | None = None,
) -> tuple[Refresher, Metrics]:
    metrics = Metrics(CollectorRegistry())
    values = rng or itertools.repeat(0.5)
    refresher = bearer_refresher(
        source,
        clock,
        metrics,
        route="r",
        region="eastus",
        policy=policy,
        rng=lambda: next(values),
        events=events or Reported(),
    )
    return refresher, metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def started(
    *,
    start: float | None = None,
    lifetime: float = 3.0,
    refresh_after: float | None = 2.0,
    script: Sequence[Any] = (),
    **make_kw: Any,
) -> tuple[ManualClock, FakeSource, Refresher, Metrics]:
    """A FakeSource (its first fetches `script`ed, if given) and its Refresher (`make`) on a new ManualClock,
    started: the first fetch is done."""
    clock = ManualClock() if start is None else ManualClock(start=start)
    source = FakeSource(clock, lifetime=lifetime, refresh_after=refresh_after)
    source.script = list(script)
    refresher, metrics = make(clock, source, **make_kw)
    await refresher.start()
    return clock, source, refresher, metrics


def refreshes(metrics: Metrics, source: FakeSource, outcome: str) -> float:
    """aml_auth_proxy_token_refreshes_total of route r with `outcome`."""
    labels = {"route": "r", "region": "eastus", "kind": source.auth_type, "outcome": outcome}
    return sample(metrics, "aml_auth_proxy_token_refreshes_total", **labels)


@contextlib.asynccontextmanager
async def running(refresher: Refresher) -> AsyncIterator[None]:
    """The refresher's schedule runs in a task while the block does; cancelled after it."""
    task = asyncio.create_task(refresher.run())
    try:
        yield
    finally:
        task.cancel()


async def run_for(refresher: Refresher, clock: ManualClock, seconds: float) -> None:
    """Let the refresher's schedule run while the clock moves `seconds` on."""
    async with running(refresher):
        await clock.advance(seconds)


def gaps(source: FakeSource) -> list[float]:
    """The times between the source's fetches, to the millisecond."""
    return [round(b - a, 3) for a, b in itertools.pairwise(source.calls)]


async def test_refreshes_at_the_servers_refresh_time_minus_jitter_never_waiting_on_the_request_path() -> None:
    clock, source, refresher, metrics = await started(
        lifetime=3600,
        refresh_after=1800,
        rng=itertools.repeat(1.0),  # the largest jitter
    )
    t0 = clock.time()  # the clock moves only when the test moves it: the first fetch's time
    first = refresher.current
    assert first is not None and first.value == "Bearer token-1"
    async with running(refresher):
        await clock.advance(1794.9)
        assert len(source.calls) == 1  # jitter is at most 5 s: not yet
        await clock.advance(0.2)
        assert source.calls == [t0, t0 + 1795]  # refreshAfter 1800 - 5 s jitter
        assert refresher.current is not None and refresher.current.value == "Bearer token-2"
        assert refreshes(metrics, source, "success") == 2
        assert sample(metrics, "aml_auth_proxy_token_remaining_validity_at_refresh_seconds_sum", route="r") == 1805


@pytest.mark.parametrize(
    ("lifetime", "refresh_after", "expected"),
    [
        (3.0, 2.0, 1.8),  # short tokens: jitter capped at 10% of the time left
        (3.0, 10.0, 2.7 - 0.27),  # a refresh time past expiry: expiry - safety (10% of lifetime), minus jitter
        (100.0, None, 80.0 - 5.0),  # no server hint: 80% of the lifetime
        (3.0, -5.0, 1.0),  # already past on arrival (clock skew): soon, but min_interval later, not in a loop
    ],
)
async def test_schedule(lifetime: float, refresh_after: float | None, expected: float) -> None:
    _clock, _source, refresher, _ = await started(
        lifetime=lifetime, refresh_after=refresh_after, rng=itertools.repeat(1.0)
    )
    assert refresher.details()["refresh_in"] == pytest.approx(expected, abs=1e-3)


async def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    clock, source, refresher, metrics = await started(
        lifetime=10_000,
        refresh_after=5,
        rng=itertools.repeat(1.0),  # jitter at its ceiling
    )
    source.script = [TransientError("HTTP 503")] * 9
    await run_for(refresher, clock, 5 + 1 + 2 + 4 + 8 + 16 + 32 + 60 + 60 + 60 + 0.01)
    assert gaps(source) == [4.5, 1, 2, 4, 8, 16, 32, 60, 60, 60]  # first: refreshAfter 5 minus 10% jitter
    assert refresher.current is not None and refresher.current.value == "Bearer token-2"  # recovered
    assert refreshes(metrics, source, "transient_error") == 9


async def test_the_refresher_wakes_when_its_schedule_says_however_many_loop_turns_a_fetch_takes() -> None:
    # A fetch that ended late in one of `advance`'s settling rounds used to start its next wait only after the
    # clock had moved on, so that wait ended late by however far the step overshot (CI saw a test wait forever).
    for spins in range(48):
        clock = ManualClock()
        source = FakeSource(clock, lifetime=10_000, refresh_after=5)
        source.spins = spins
        refresher, _ = make(clock, source, rng=itertools.repeat(1.0))
        await refresher.start()
        source.script = [TransientError("HTTP 503")] * 3
        async with running(refresher):
            for fetches in (2, 3, 4):
                await clock.advance(refresher.details()["refresh_in"] + 0.5)  # overshoot every due time
                assert len(source.calls) == fetches, spins
                await clock.advance(0)
                due = clock.time() + refresher.details()["refresh_in"]
                assert clock.next_deadline == pytest.approx(due, abs=2e-3), spins


async def test_full_jitter_draws_below_the_ceiling() -> None:
    clock, source, refresher, _ = await started(
        lifetime=10_000, refresh_after=5, rng=iter([0.0, 0.25, 0.25, 0.25, 0.25])
    )
    source.script = [TransientError("x")] * 3
    await run_for(refresher, clock, 5.0 + 0.5 + 1.0 + 0.01)
    assert gaps(source)[1:] == [0.25, 0.5]  # 0.25 * 1, 0.25 * 2


async def test_retry_after_is_honoured_and_permanent_errors_retry_at_the_cap() -> None:
    clock, source, refresher, metrics = await started(lifetime=10_000, refresh_after=5, rng=itertools.repeat(0.0))
    source.script = [TransientError("HTTP 429", retry_after=30), PermanentError("HTTP 403 (AuthorizationFailed)")]
    await run_for(refresher, clock, 5 + 30 + 60 + 0.01)
    assert gaps(source) == [5, 30, 60]
    assert refresher.details()["last_refresh"] == "success"
    assert refreshes(metrics, source, "permanent_error") == 1


async def test_outage_shorter_than_the_lifetime_keeps_serving_the_current_token() -> None:
    clock, source, refresher, _ = await started(lifetime=30, refresh_after=10, rng=itertools.repeat(0.5))
    token = refresher.current
    source.script = [TransientError("HTTP 503")] * 4  # attempts at 9.5, 10, 11 and 13 s fail (backoff 0.5, 1, 2, 4)
    async with running(refresher):
        for _ in range(16):
            await clock.advance(1)
            assert refresher.current is token and refresher.readiness()[0]
        await clock.advance(1.5)
        assert refresher.current is not None and refresher.current is not token
        assert [round(t - source.calls[0], 3) for t in source.calls[1:]] == [9.5, 10, 11, 13, 17]


async def test_outage_past_expiry_makes_the_route_unready_and_it_recovers_by_itself() -> None:
    clock, source, refresher, metrics = await started(lifetime=5, refresh_after=3, rng=itertools.repeat(0.5))
    source.script = [TransientError("HTTP 503")] * 5
    async with running(refresher):
        await clock.advance(5.01)
        assert refresher.current is None
        ready, why = refresher.readiness()
        assert not ready and why == "aml-endpoint-token token expired; last refresh: HTTP 503"
        assert refresher.retry_after() >= 1
        await clock.advance(30)
        assert refresher.current is not None and refresher.readiness() == (True, "ok")
        assert sample(metrics, "aml_auth_proxy_route_ready", route="r") == 1


async def test_first_fetch_failure_leaves_the_route_unready_with_the_reason() -> None:
    _clock, _source, refresher, _ = await started(
        script=[PermanentError("AML v2 token endpoint: HTTP 403 (AuthorizationFailed)")]
    )
    assert refresher.current is None
    assert refresher.readiness() == (
        False,
        "no aml-endpoint-token token yet: AML v2 token endpoint: HTTP 403 (AuthorizationFailed)",
    )
    assert refresher.details()["consecutive_failures"] == 1


async def test_concurrent_triggers_make_one_fetch() -> None:
    clock, source, refresher, _ = await started(lifetime=3600, refresh_after=1800)
    sent = refresher.current
    assert sent is not None
    source.gate = asyncio.Event()
    await clock.advance(5)  # past min_interval since start-up
    waiters = [asyncio.create_task(refresher.unauthorized(sent)) for _ in range(200)]
    waiters.append(asyncio.create_task(refresher.refresh_now("operator")))
    await asyncio.sleep(0)
    source.gate.set()
    results = await asyncio.gather(*waiters)
    assert len(source.calls) == 2  # start-up + exactly one for 201 triggers
    fresh = refresher.current
    assert fresh is not None and all(r is fresh for r in results[:200])
    assert await refresher.unauthorized(sent) is fresh  # a late 401 for the old token: no new fetch
    assert len(source.calls) == 2


async def test_forced_refreshes_are_rate_limited() -> None:
    _clock, source, refresher, _ = await started(lifetime=3600, refresh_after=1800)
    fresh = refresher.current
    assert fresh is not None
    assert await refresher.unauthorized(fresh) is None  # refused right after a fetch: do not hammer
    assert len(source.calls) == 1


async def test_keys_fail_over_before_refetching() -> None:
    clock = ManualClock()

    class Keys(FakeSource):
        auth_type = "aml-keys"

        async def fetch(self, previous: Token | None) -> Token:
            self.calls.append(self.clock.time())
            n = next(self.serial)
            return Token(value=f"p{n}", secondary=f"s{n}", expires_at=None, refresh_at=self.clock.time() + 3600)

    source = Keys(clock)
    reported = Reported()
    refresher, metrics = make(clock, source, events=reported)
    await refresher.start()
    primary = refresher.current
    assert primary is not None and primary.value == "Bearer p1"
    await clock.advance(2)
    secondary = await refresher.unauthorized(primary)
    assert secondary is not None and secondary.value == "Bearer s1" and len(source.calls) == 1
    # Reported as for key files: the failover counter and a KeyFailover Event.
    assert sample(metrics, "aml_auth_proxy_key_failovers_total", route="r") == 1
    assert reported.events == [
        (True, "KeyFailover", "route r: upstream refused the primary key (401), using the secondary key")
    ]
    refetched = await refresher.unauthorized(secondary)
    assert refetched is not None and refetched.value == "Bearer p2" and len(source.calls) == 2
    assert refresher.details()["expires_in"] is None


async def test_close_revokes_the_current_token() -> None:
    _clock, source, refresher, _ = await started()
    await refresher.close()
    assert [t.value for t in source.revoked] == ["token-1"]


async def test_a_crashing_source_is_a_transient_failure_not_a_dead_refresher() -> None:
    _clock, _source, refresher, _ = await started(script=[KeyError("bug")])
    assert refresher.details()["last_refresh"] == "transient_error"


def test_skew_correction_moves_server_times_onto_the_local_clock() -> None:
    # The server's clock is 600 s ahead: its "expires in 3 s" is local now + 3.
    assert skew_corrected(1_000_603, server_now=1_000_600, local_now=1_000_000) == 1_000_003
    assert skew_corrected(999_403, server_now=999_400, local_now=1_000_000) == 1_000_003
    assert skew_corrected(None, server_now=1, local_now=2) is None
    # Within the tolerance of whole-second clocks there is no evidence of skew: the server's time stands.
    assert skew_corrected(1_000_003, server_now=1_000_001, local_now=1_000_000) == 1_000_003


def test_refresh_errors_carry_safe_reasons() -> None:
    exc: RefreshError = TransientError("HTTP 503", retry_after=5)
    assert exc.outcome == "transient_error" and exc.retry_after == 5
    assert PermanentError("x").outcome == "permanent_error"


async def test_a_source_that_hangs_is_cut_off_as_a_transient_failure_and_the_refresher_lives_on() -> None:
    """The refresher's own timeout (3x the per-call timeout) is the backstop for a source with no timeout."""
    _clock, source, refresher, _metrics = await started(
        start=1000.0, policy=dataclasses.replace(POLICY, timeout_seconds=0.02)
    )
    source.gate = asyncio.Event()  # the next fetch never returns by itself
    await refresher.refresh_now("operator")
    assert refresher.details()["last_refresh"] == "transient_error"
    assert refresher.details()["last_error"] == "timed out"
    source.gate.set()
    await refresher.refresh_now("operator")
    assert refresher.details()["last_refresh"] == "success" and refresher.current is not None


@pytest.mark.parametrize("bad", ["tok\r\nX-Injected: yes", "tok\nX", "tok\x00", "tok en", ""])
async def test_a_credential_that_would_inject_a_header_is_refused_and_never_installed(bad: str) -> None:
    clock, source, refresher, _metrics = await started(start=1000.0)
    good = refresher.current
    assert good is not None

    async def injected(previous: Token | None) -> Token:
        return Token(value=bad, expires_at=clock.time() + 3.0, refresh_at=None)

    source.fetch = injected  # type: ignore[method-assign]
    await refresher.refresh_now("operator")
    assert refresher.current is good  # the last good token stays
    assert refresher.details()["last_error"] == "the fetched credential contains control characters or spaces"


async def test_renewed_tokens_leave_the_redactor_bounded_while_fixed_secrets_stay() -> None:
    # A token renewed every few seconds for weeks must not make every log line scrub against each token ever seen.
    fixed = "a-fixed-key-" + "k" * 20
    REDACTOR.add(fixed)
    clock, source, refresher, _ = await started(lifetime=3.0, refresh_after=2.0, rng=itertools.repeat(0.0))
    held = len(REDACTOR)
    async with running(refresher):
        for _ in range(200):
            await clock.advance(refresher.details()["refresh_in"] + 0.01)
    assert len(source.calls) == 201
    assert len(REDACTOR) <= held + GENERATIONS  # not one per renewal: 200 were made
    current = refresher.current
    assert current is not None and current.value == "Bearer token-201"
    line = "token-201 token-195 token-150 " + fixed
    assert REDACTOR.scrub(line) == f"{REDACTED} {REDACTED} token-150 {REDACTED}"


# -- a token's edges: the expiry margin, retries while unusable, the log lines that mark the outage ----------------


async def test_a_token_is_never_handed_out_in_its_last_expiry_margin() -> None:
    policy = dataclasses.replace(POLICY, expiry_margin_seconds=5.0)
    clock, source, refresher, metrics = await started(lifetime=3600, refresh_after=1800, policy=policy)
    token = refresher.current
    expiry = clock.time() + 3600
    source.script = [TransientError("HTTP 503")] * 1000  # the token endpoint is down from the refresh time on
    async with running(refresher):
        await clock.advance(expiry - 5 - 0.01 - clock.time())
        assert refresher.current is token and refresher.readiness() == (True, "ok")
        await clock.advance(0.01)  # exactly expiry - margin: the token is still valid, but no longer sent
        assert refresher.current is None
        ready, why = refresher.readiness()
        assert not ready and why == "aml-endpoint-token token is within its 5 s expiry margin; last refresh: HTTP 503"
        assert 1 <= refresher.retry_after() <= 2
        assert sample(metrics, "aml_auth_proxy_route_ready", route="r") == 0
        await clock.advance(5)
        assert refresher.readiness()[1] == "aml-endpoint-token token expired; last refresh: HTTP 503"


async def test_the_expiry_margin_of_a_short_lived_token_is_a_tenth_of_its_life_and_renewal_comes_before_it() -> None:
    clock, _source, refresher, _ = await started(
        lifetime=3.0,
        refresh_after=10.0,  # a refresh time past expiry: expiry rules
        policy=dataclasses.replace(POLICY, expiry_margin_seconds=5.0),
    )
    t0 = clock.time()
    # Usable until 2.7 s (a 5 s margin would leave nothing of a 3 s token); renewal at the latest 0.3 s before that.
    assert refresher.details()["refresh_in"] == pytest.approx(2.4 - 0.5 * 0.24, abs=1e-3)
    await clock.advance(2.699)
    assert refresher.current is not None
    await clock.advance(0.002)
    assert (
        refresher.current is None
        and refresher.readiness()[1] == "aml-endpoint-token token is within its 0.3 s expiry margin"
    )
    assert clock.time() - t0 == pytest.approx(2.701)


async def test_without_a_usable_token_retries_come_within_a_second_and_service_resumes_within_two() -> None:
    # The soak that found it: 3 s tokens and the token endpoint down for 10 s. The backoff had grown to 8 s, then
    # 16 s, so a 10 s outage cost 14 s and more of 503s. Backoff may grow while the token in hand is good; once it
    # is gone, the next attempt is never more than a second away.
    clock, source, refresher, _ = await started(
        lifetime=3.0,
        refresh_after=2.0,
        rng=itertools.repeat(1.0),  # the longest backoff every time
    )
    t0 = clock.time()
    healed = t0 + 11.0
    fetch = source.fetch

    async def down_for_ten_seconds(previous: Token | None) -> Token:
        if t0 + 1.0 <= clock.time() < healed:
            source.calls.append(clock.time())
            raise TransientError("HTTP 503")
        return await fetch(previous)

    source.fetch = down_for_ten_seconds  # type: ignore[method-assign]
    unusable: list[float] = []
    async with running(refresher):
        while clock.time() < t0 + 20:
            await clock.advance(0.05)
            if refresher.current is None:
                unusable.append(clock.time() - t0)
                assert refresher.details()["refresh_in"] <= 1.0
    assert unusable and min(unusable) == pytest.approx(3.0, abs=0.06)  # from the token's expiry...
    assert max(unusable) < 11.0 + 1.0  # ...to at most a second after the endpoint answers again
    failed = [round(t - t0, 3) for t in source.calls[1:] if t < healed]
    assert failed[:2] == [1.8, 2.8]  # the usual backoff while the token is good: the next one was due at 4.8 s
    after = [3.0] + [t for t in failed if t >= 3.0]  # from the token's expiry on: never more than a second apart
    assert len(after) == 8 and all(b - a <= 1.0 for a, b in itertools.pairwise(after)), failed


async def test_a_retry_planned_past_the_tokens_end_is_brought_forward_when_the_token_goes() -> None:
    clock, source, refresher, _ = await started(lifetime=30, refresh_after=10, rng=itertools.repeat(1.0))
    source.script = [TransientError("HTTP 503")] * 6
    await run_for(refresher, clock, 40)
    # Backoff 1, 2, 4, 8, 16 s while the token is good: the sixth attempt was due at 40 s, 10 s after the token's end.
    # When the token goes at 30 s the next attempt comes within a second; the one after that, a second later.
    assert [round(t - source.calls[0], 3) for t in source.calls[1:]] == [9, 10, 12, 16, 24, 31, 32]


class _Records(logging.Handler):
    """Records of the refresher's logger, each with the injected clock's time when it was logged."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(logging.DEBUG)
        self.clock = clock
        self.got: list[tuple[float, logging.LogRecord]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.got.append((self.clock.time(), record))

    def named(self, name: str) -> list[tuple[float, logging.LogRecord]]:
        return [(t, r) for t, r in self.got if getattr(r, "event", None) == name]


async def test_token_expired_marks_when_503s_begin_and_token_restored_says_how_long_they_lasted() -> None:
    clock = ManualClock()
    source = FakeSource(clock, lifetime=30, refresh_after=10)
    refresher, _ = make(clock, source, rng=itertools.repeat(0.5))
    records = _Records(clock)
    logger = logging.getLogger("aml_auth_proxy.refresher")
    logger.addHandler(records)
    try:
        await refresher.start()
        t0 = clock.time()
        http_503, timed_out = TransientError("HTTP 503"), TransientError("timed out")
        source.script = [http_503, http_503, timed_out, http_503, http_503, http_503, http_503, http_503]
        async with running(refresher):
            await clock.advance(45)
    finally:
        logger.removeHandler(records)
    # The moment the token expired (30 s), once, whether or not a fetch was failing just then.
    expired = records.named("token_expired")
    assert [(round(t - t0, 3), r.levelno) for t, r in expired] == [(30.0, logging.WARNING)]
    assert expired[0][1].fields["last_error"] == "HTTP 503"  # type: ignore[attr-defined]
    # Back with the first fetch that succeeds, with the length of the 503 window.
    restored = records.named("token_restored")
    assert len(restored) == 1 and restored[0][1].levelno == logging.INFO
    back = restored[0][0] - t0
    assert back > 30 and restored[0][1].fields["outage_seconds"] == pytest.approx(back - 30, abs=1e-3)  # type: ignore[attr-defined]
    # One WARNING line per failure reason in the outage, not one per retry; going back to a reason already
    # reported is not a new line either.
    failed = [(r.fields["reason"], r.levelno) for _, r in records.named("token_refresh_failed")]  # type: ignore[attr-defined]
    assert (
        failed
        == [("HTTP 503", logging.WARNING), ("HTTP 503", logging.DEBUG), ("timed out", logging.WARNING)]
        + [("HTTP 503", logging.DEBUG)] * 5
    )
    # Successes on schedule are DEBUG lines with the latency; the one that ended the failures is INFO.
    refreshed = [r for _, r in records.named("token_refreshed")]
    assert [r.levelno for r in refreshed] == [logging.INFO, logging.INFO, logging.DEBUG]  # start-up, recovery, schedule
    assert all("duration_ms" in r.fields for r in refreshed)  # type: ignore[attr-defined]
    loud = [getattr(r, "event", None) for _, r in records.got if r.levelno >= logging.WARNING]
    assert loud == ["token_refresh_failed", "token_refresh_failed", "token_expired"]
    assert len(source.calls) == 11  # start-up, 8 failures, the recovery, one renewal on schedule


async def test_a_share_followers_last_success_is_when_it_adopted_a_new_token_not_a_repeat() -> None:
    # A follower never fetches on schedule: its credential is as fresh as the last new token it adopted from the
    # leader, and an alert on the credential's age must not fire on every follower.
    name = "aml_auth_proxy_credential_last_success_timestamp_seconds"
    clock, _source, refresher, metrics = await started(lifetime=50, refresh_after=30)
    refresher.pause()
    await clock.advance(20)
    shared = Token(value="from-the-leader", expires_at=clock.time() + 50, refresh_at=clock.time() + 30)
    assert refresher.adopt(shared) is None
    adopted_at = clock.time()
    assert sample(metrics, name, route="r") == adopted_at
    await clock.advance(5)
    again = Token(value="from-the-leader", expires_at=shared.expires_at, refresh_at=shared.refresh_at)
    assert refresher.adopt(again) is None  # the same token seen again (a relist): no fresher than before
    assert sample(metrics, name, route="r") == adopted_at


async def test_the_last_successful_refresh_time_is_a_gauge_that_failures_leave_alone() -> None:
    name = "aml_auth_proxy_credential_last_success_timestamp_seconds"
    clock, _source, refresher, metrics = await started(lifetime=5, refresh_after=3, rng=itertools.repeat(0.5))
    first = sample(metrics, name, route="r")
    assert first == clock.time() > 0  # the first fetch, at start
    _source.script = [TransientError("HTTP 503")]
    async with running(refresher):
        await clock.advance(3.01)  # the scheduled refresh fails
        assert sample(metrics, name, route="r") == first
        await clock.advance(1.5)  # the retry succeeds
        assert refresher.readiness() == (True, "ok")
        assert first + 3 < sample(metrics, name, route="r") <= clock.time()
