"""The refresh engine on an injected clock: schedule, jitter, backoff, Retry-After, single flight, expiry, skew."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import ManualClock
from proxy.config import RefreshPolicy
from proxy.logs import GENERATIONS, REDACTED, REDACTOR
from proxy.metrics import Metrics
from proxy.refresher import PermanentError, Refresher, RefreshError, Token, TransientError, skew_corrected

POLICY = RefreshPolicy(
    margin_seconds=0.0,
    jitter_seconds=5.0,
    safety_seconds=60.0,
    fraction=0.8,
    min_interval_seconds=1.0,
    backoff_initial_seconds=1.0,
    backoff_max_seconds=60.0,
    timeout_seconds=10.0,
)


class FakeSource:
    """A token source with a script: each fetch pops the next outcome (a lifetime, or an exception)."""

    kind = "aml-endpoint-token"

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


def make(
    clock: ManualClock, source: FakeSource, *, policy: RefreshPolicy = POLICY, rng: Iterator[float] | None = None
) -> tuple[Refresher, Metrics]:
    metrics = Metrics(CollectorRegistry())
    values = rng or itertools.repeat(0.5)
    refresher = Refresher(
        route="r",
        source=source,
        header="Authorization",
        template="Bearer {token}",
        placeholder="{token}",
        policy=policy,
        metrics=metrics.for_route("r", region="eastus", kind=source.kind),
        clock=clock,
        rng=lambda: next(values),
    )
    return refresher, metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_refreshes_at_the_servers_refresh_time_minus_jitter_never_waiting_on_the_request_path() -> None:
    clock = ManualClock()
    source = FakeSource(clock, lifetime=3600, refresh_after=1800)
    refresher, metrics = make(clock, source, rng=itertools.repeat(1.0))  # the largest jitter
    t0 = clock.time()
    await refresher.start()
    first = refresher.current
    assert first is not None and first.value == "Bearer token-1"
    task = asyncio.create_task(refresher.run())
    try:
        await clock.advance(1794.9)
        assert len(source.calls) == 1  # jitter is at most 5 s: not yet
        await clock.advance(0.2)
        assert source.calls == [t0, t0 + 1795]  # refreshAfter 1800 - 5 s jitter
        assert refresher.current is not None and refresher.current.value == "Bearer token-2"
        assert (
            sample(
                metrics,
                "aml_auth_proxy_token_refreshes_total",
                route="r",
                region="eastus",
                kind=source.kind,
                outcome="success",
            )
            == 2
        )
        assert sample(metrics, "aml_auth_proxy_token_remaining_validity_at_refresh_seconds_sum", route="r") == 1805
    finally:
        task.cancel()


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
    clock = ManualClock()
    source = FakeSource(clock, lifetime=lifetime, refresh_after=refresh_after)
    refresher, _ = make(clock, source, rng=itertools.repeat(1.0))
    await refresher.start()
    assert refresher.details()["refresh_in"] == pytest.approx(expected, abs=1e-3)


async def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    clock = ManualClock()
    source = FakeSource(clock, lifetime=10_000, refresh_after=5)
    refresher, metrics = make(clock, source, rng=itertools.repeat(1.0))  # jitter at its ceiling
    await refresher.start()
    source.script = [TransientError("HTTP 503")] * 9
    task = asyncio.create_task(refresher.run())
    try:
        await clock.advance(5 + 1 + 2 + 4 + 8 + 16 + 32 + 60 + 60 + 60 + 0.01)
    finally:
        task.cancel()
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(source.calls)]
    assert gaps == [4.5, 1, 2, 4, 8, 16, 32, 60, 60, 60]  # first: refreshAfter 5 minus 10% jitter
    assert refresher.current is not None and refresher.current.value == "Bearer token-2"  # recovered
    assert (
        sample(
            metrics,
            "aml_auth_proxy_token_refreshes_total",
            route="r",
            region="eastus",
            kind=source.kind,
            outcome="transient_error",
        )
        == 9
    )


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
        task = asyncio.create_task(refresher.run())
        try:
            for fetches in (2, 3, 4):
                await clock.advance(refresher.details()["refresh_in"] + 0.5)  # overshoot every due time
                assert len(source.calls) == fetches, spins
                await clock.advance(0)
                due = clock.time() + refresher.details()["refresh_in"]
                assert clock.next_deadline == pytest.approx(due, abs=2e-3), spins
        finally:
            task.cancel()


async def test_full_jitter_draws_below_the_ceiling() -> None:
    clock = ManualClock()
    source = FakeSource(clock, lifetime=10_000, refresh_after=5)
    refresher, _ = make(clock, source, rng=iter([0.0, 0.25, 0.25, 0.25, 0.25]))
    await refresher.start()
    source.script = [TransientError("x")] * 3
    task = asyncio.create_task(refresher.run())
    try:
        await clock.advance(5.0 + 0.5 + 1.0 + 0.01)
    finally:
        task.cancel()
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(source.calls)]
    assert gaps[1:] == [0.25, 0.5]  # 0.25 * 1, 0.25 * 2


async def test_retry_after_is_honoured_and_permanent_errors_retry_at_the_cap() -> None:
    clock = ManualClock()
    source = FakeSource(clock, lifetime=10_000, refresh_after=5)
    refresher, metrics = make(clock, source, rng=itertools.repeat(0.0))
    await refresher.start()
    source.script = [TransientError("HTTP 429", retry_after=30), PermanentError("HTTP 403 (AuthorizationFailed)")]
    task = asyncio.create_task(refresher.run())
    try:
        await clock.advance(5 + 30 + 60 + 0.01)
    finally:
        task.cancel()
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(source.calls)]
    assert gaps == [5, 30, 60]
    assert refresher.details()["last_refresh"] == "success"
    assert (
        sample(
            metrics,
            "aml_auth_proxy_token_refreshes_total",
            route="r",
            region="eastus",
            kind=source.kind,
            outcome="permanent_error",
        )
        == 1
    )


async def test_outage_shorter_than_the_lifetime_keeps_serving_the_current_token() -> None:
    clock = ManualClock()
    source = FakeSource(clock, lifetime=30, refresh_after=10)
    refresher, _ = make(clock, source, rng=itertools.repeat(0.5))
    await refresher.start()
    token = refresher.current
    source.script = [TransientError("HTTP 503")] * 4  # attempts at 9.5, 10, 11 and 13 s fail (backoff 0.5, 1, 2, 4)
    task = asyncio.create_task(refresher.run())
    try:
        for _ in range(16):
            await clock.advance(1)
            assert refresher.current is token and refresher.readiness()[0]
        await clock.advance(1.5)
        assert refresher.current is not None and refresher.current is not token
        assert [round(t - source.calls[0], 3) for t in source.calls[1:]] == [9.5, 10, 11, 13, 17]
    finally:
        task.cancel()


async def test_outage_past_expiry_makes_the_route_unready_and_it_recovers_by_itself() -> None:
    clock = ManualClock()
    source = FakeSource(clock, lifetime=5, refresh_after=3)
    refresher, metrics = make(clock, source, rng=itertools.repeat(0.5))
    await refresher.start()
    source.script = [TransientError("HTTP 503")] * 5
    task = asyncio.create_task(refresher.run())
    try:
        await clock.advance(5.01)
        assert refresher.current is None
        ready, why = refresher.readiness()
        assert not ready and why == "aml-endpoint-token token expired; last refresh: HTTP 503"
        assert refresher.retry_after() >= 1
        await clock.advance(30)
        assert refresher.current is not None and refresher.readiness() == (True, "ok")
        assert sample(metrics, "aml_auth_proxy_route_ready", route="r") == 1
    finally:
        task.cancel()


async def test_first_fetch_failure_leaves_the_route_unready_with_the_reason() -> None:
    clock = ManualClock()
    source = FakeSource(clock)
    source.script = [PermanentError("AML v2 token endpoint: HTTP 403 (AuthorizationFailed)")]
    refresher, _ = make(clock, source)
    await refresher.start()
    assert refresher.current is None
    assert refresher.readiness() == (
        False,
        "no aml-endpoint-token token yet: AML v2 token endpoint: HTTP 403 (AuthorizationFailed)",
    )
    assert refresher.details()["consecutive_failures"] == 1


async def test_concurrent_triggers_make_one_fetch() -> None:
    clock = ManualClock()
    source = FakeSource(clock, lifetime=3600, refresh_after=1800)
    refresher, _ = make(clock, source)
    await refresher.start()
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
    clock = ManualClock()
    source = FakeSource(clock, lifetime=3600, refresh_after=1800)
    refresher, _ = make(clock, source)
    await refresher.start()
    fresh = refresher.current
    assert fresh is not None
    assert await refresher.unauthorized(fresh) is None  # refused right after a fetch: do not hammer
    assert len(source.calls) == 1


async def test_keys_fail_over_before_refetching() -> None:
    clock = ManualClock()

    class Keys(FakeSource):
        kind = "aml-keys"

        async def fetch(self, previous: Token | None) -> Token:
            self.calls.append(self.clock.time())
            n = next(self.serial)
            return Token(value=f"p{n}", secondary=f"s{n}", expires_at=None, refresh_at=self.clock.time() + 3600)

    source = Keys(clock)
    refresher, _ = make(clock, source)
    await refresher.start()
    primary = refresher.current
    assert primary is not None and primary.value == "Bearer p1"
    await clock.advance(2)
    secondary = await refresher.unauthorized(primary)
    assert secondary is not None and secondary.value == "Bearer s1" and len(source.calls) == 1
    refetched = await refresher.unauthorized(secondary)
    assert refetched is not None and refetched.value == "Bearer p2" and len(source.calls) == 2
    assert refresher.details()["expires_in"] is None


async def test_close_revokes_the_current_token() -> None:
    clock = ManualClock()
    source = FakeSource(clock)
    refresher, _ = make(clock, source)
    await refresher.start()
    await refresher.close()
    assert [t.value for t in source.revoked] == ["token-1"]


async def test_a_crashing_source_is_a_transient_failure_not_a_dead_refresher() -> None:
    clock = ManualClock()
    source = FakeSource(clock)
    source.script = [KeyError("bug")]
    refresher, _ = make(clock, source)
    await refresher.start()
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
    clock = ManualClock(start=1000.0)
    source = FakeSource(clock)
    refresher, _metrics = make(clock, source, policy=dataclasses.replace(POLICY, timeout_seconds=0.02))
    await refresher.start()
    source.gate = asyncio.Event()  # the next fetch never returns by itself
    await refresher.refresh_now("operator")
    assert refresher.details()["last_refresh"] == "transient_error"
    assert refresher.details()["last_error"] == "timed out"
    source.gate.set()
    await refresher.refresh_now("operator")
    assert refresher.details()["last_refresh"] == "success" and refresher.current is not None


@pytest.mark.parametrize("bad", ["tok\r\nX-Injected: yes", "tok\nX", "tok\x00", "tok en", ""])
async def test_a_credential_that_would_inject_a_header_is_refused_and_never_installed(bad: str) -> None:
    clock = ManualClock(start=1000.0)
    source = FakeSource(clock)
    refresher, _metrics = make(clock, source)
    await refresher.start()
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
    clock = ManualClock()
    source = FakeSource(clock, lifetime=3.0, refresh_after=2.0)
    refresher, _ = make(clock, source, rng=itertools.repeat(0.0))
    await refresher.start()
    held = len(REDACTOR)
    task = asyncio.create_task(refresher.run())
    try:
        for _ in range(200):
            await clock.advance(refresher.details()["refresh_in"] + 0.01)
    finally:
        task.cancel()
    assert len(source.calls) == 201
    assert len(REDACTOR) <= held + GENERATIONS  # not one per renewal: 200 were made
    current = refresher.current
    assert current is not None and current.value == "Bearer token-201"
    line = "token-201 token-195 token-150 " + fixed
    assert REDACTOR.scrub(line) == f"{REDACTED} {REDACTED} token-150 {REDACTED}"
