"""A Refresher and its RefreshPolicy for tests that drive it on a ManualClock."""

from __future__ import annotations

from collections.abc import Callable

from proxy.clock import ManualClock
from proxy.config.settings import RefreshPolicy
from proxy.credentials.tokens import TokenSource
from proxy.events import EventSink
from proxy.metrics import Metrics
from proxy.refresher import Refresher


def manual_policy(
    *, jitter_seconds: float, safety_seconds: float, backoff_max_seconds: float, timeout_seconds: float
) -> RefreshPolicy:
    """No refresh margin and no expiry margin (a token is used up to its expiry unless a test says otherwise),
    renewal at 80% of a lifetime without a server hint, forced refreshes at least 1 s apart, backoff from 1 s;
    what differs from test to test is given."""
    return RefreshPolicy(
        margin_seconds=0.0,
        jitter_seconds=jitter_seconds,
        safety_seconds=safety_seconds,
        fraction=0.8,
        min_interval_seconds=1.0,
        backoff_initial_seconds=1.0,
        backoff_max_seconds=backoff_max_seconds,
        timeout_seconds=timeout_seconds,
        expiry_margin_seconds=0.0,
    )


def bearer_refresher(
    source: TokenSource,
    clock: ManualClock,
    metrics: Metrics,
    *,
    route: str,
    policy: RefreshPolicy,
    rng: Callable[[], float],
    events: EventSink,
    region: str = "unknown",
) -> Refresher:
    """A Refresher for `route` that sends its tokens as `Authorization: Bearer <token>`, on `clock`, counting into
    `metrics` with the source's auth type as the kind."""
    return Refresher(
        route=route,
        source=source,
        header="Authorization",
        template="Bearer {token}",
        placeholder="{token}",
        policy=policy,
        metrics=metrics.for_route(route, region=region, kind=source.auth_type),
        clock=clock,
        rng=rng,
        events=events,
    )
