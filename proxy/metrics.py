"""Every metric, defined once against an injected registry. Label values are bounded and resolved per route
up front so the request path only touches prepared children."""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy import __version__
from proxy.events import EVENT_REASONS

# `_created` series double the exposition and no dashboard or alert here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

NS: Final = "aml_auth_proxy"
METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
UPSTREAM_ERROR_KINDS: Final = ("timeout", "connect", "tls", "reset", "protocol")
RELOAD_OUTCOMES: Final = ("success", "unchanged", "error")
REFRESH_OUTCOMES: Final = ("success", "transient_error", "permanent_error")
WATCH_RESTART_REASONS: Final = ("closed", "expired", "unreachable", "forbidden", "error")
EVENT_OUTCOMES: Final = ("created", "aggregated", "rate_limited", "dropped", "failed")
# Token calls go to the workspace's region: 5 ms (same region) to 10 s (a struggling one) must resolve.
# Not Final: mypyc 2.4 leaves a Final tuple of floats unset at import (NameError where it is first read).
REFRESH_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
REMAINING_BUCKETS = (0.5, 1, 2, 5, 15, 60, 300, 900, 1800, 3600, 7200, 21600, 43200, 86400)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DURATION_LE: Final = [floatToGoString(b) for b in DURATION_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]


class Metrics:
    """The proxy's metric families."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # requests_total, request_duration_seconds and time_to_first_byte_seconds: counted per route in plain
        # numbers (RequestCounts).
        self._request_counts: dict[str, RequestCounts] = {}
        r.register(_RequestFamilies(self._request_counts))
        self.in_flight = Gauge(f"{NS}_requests_in_flight", "Requests being handled now.", ("route",), registry=r)
        self.upstream_errors = Counter(
            f"{NS}_upstream_errors",
            "Upstream failures by kind (timeout, connect, tls, reset, protocol).",
            ("route", "kind"),
            registry=r,
        )
        self.upstream_auth_failures = Counter(
            f"{NS}_upstream_auth_failures",
            "Upstream 401 and 403 answers, before any retry.",
            ("route", "code"),
            registry=r,
        )
        self.credential_reloads = Counter(
            f"{NS}_credential_reloads",
            "Credential loads by outcome (success, unchanged, error).",
            ("route", "outcome"),
            registry=r,
        )
        self.key_failovers = Counter(
            f"{NS}_key_failovers", "Switches to the other key after a 401.", ("route",), registry=r
        )
        self.retries = Counter(
            f"{NS}_auth_retries",
            "Requests resent once after a 401, with the other key or a freshly refreshed token.",
            ("route",),
            registry=r,
        )
        self.client_disconnects = Counter(
            f"{NS}_client_disconnects",
            "Requests whose caller went away before the answer was sent.",
            ("route",),
            registry=r,
        )
        self.share_role = Gauge(f"{NS}_share_role", "Shared token role (1 = current).", ("route", "role"), registry=r)
        self.share_transitions = Counter(f"{NS}_share_transitions", "Changes of share role.", ("route",), registry=r)
        self.route_ready = Gauge(
            f"{NS}_route_ready", "1 when the route has a usable credential.", ("route",), registry=r
        )
        self.credential_last_success = Gauge(
            f"{NS}_credential_last_success_timestamp_seconds",
            "When the route's credential was last fetched or adopted (token kinds) or loaded (keys) successfully;"
            " 0 = never.",
            ("route",),
            registry=r,
        )
        self.rejected = Counter(
            f"{NS}_rejected_requests", "Requests the proxy refused itself, by reason.", ("reason",), registry=r
        )
        self.token_refresh_duration = Histogram(
            f"{NS}_token_refresh_duration_seconds",
            "Time to fetch a credential from its control plane, Entra ID or ML Server; the region is the route's.",
            ("route", "region", "kind", "outcome"),
            buckets=REFRESH_BUCKETS,
            registry=r,
        )
        self.token_refreshes = Counter(
            f"{NS}_token_refreshes",
            "Credential fetches by outcome (success, transient_error, permanent_error).",
            ("route", "region", "kind", "outcome"),
            registry=r,
        )
        self.token_expiry = Gauge(
            f"{NS}_token_expiry_timestamp_seconds",
            "When the current token expires (epoch seconds; 0 = none).",
            ("route",),
            registry=r,
        )
        self.token_next_refresh = Gauge(
            f"{NS}_token_next_refresh_timestamp_seconds",
            "When the next fetch is scheduled (epoch seconds).",
            ("route",),
            registry=r,
        )
        self.token_failures = Gauge(
            f"{NS}_token_refresh_consecutive_failures",
            "Failed fetches since the last success.",
            ("route",),
            registry=r,
        )
        self.token_remaining = Histogram(
            f"{NS}_token_remaining_validity_at_refresh_seconds",
            "Validity the replaced token still had when a refresh succeeded: how early the proxy refreshes.",
            ("route",),
            buckets=REMAINING_BUCKETS,
            registry=r,
        )
        self.entra_requests = Counter(
            f"{NS}_entra_token_requests",
            "Entra ID token requests by identity kind and outcome "
            "(acquired = a new token, cached = azure-identity's cache answered, error).",
            ("identity", "outcome"),
            registry=r,
        )
        self.entra_duration = Histogram(
            f"{NS}_entra_token_duration_seconds",
            "Latency of Entra ID token acquisitions (cache hits excluded).",
            ("identity",),
            buckets=REFRESH_BUCKETS,
            registry=r,
        )
        self.kube_watch_restarts = Counter(
            f"{NS}_kubernetes_watch_restarts",
            "Secret watch restarts by reason (closed, expired, unreachable, forbidden, error).",
            ("route", "reason"),
            registry=r,
        )
        self.kube_events = Counter(
            f"{NS}_kubernetes_events",
            "Kubernetes Events by reason and outcome (created, aggregated, rate_limited, dropped, failed).",
            ("reason", "outcome"),
            registry=r,
        )
        for reason in EVENT_REASONS:
            for outcome in EVENT_OUTCOMES:
                self.kube_events.labels(reason, outcome)
        self.build_info = Gauge(
            f"{NS}_build_info", "Always 1; labels carry the version.", ("version", "python"), registry=r
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)

    def request_counts(self, route: str) -> RequestCounts:
        """The route's request counters (one set per route name, shared by every RouteMetrics of that name)."""
        counts = self._request_counts.get(route)
        if counts is None:
            counts = self._request_counts[route] = RequestCounts()
        return counts

    def for_route(self, route: str, *, region: str = "unknown", kind: str = "key") -> RouteMetrics:
        rm = RouteMetrics(route=route, region=region, kind=kind, metrics=self)
        for kind in UPSTREAM_ERROR_KINDS:
            rm.upstream_errors[kind] = self.upstream_errors.labels(route, kind)
        for outcome in RELOAD_OUTCOMES:
            rm.reloads[outcome] = self.credential_reloads.labels(route, outcome)
        for reason in WATCH_RESTART_REASONS:
            self.kube_watch_restarts.labels(route, reason)
        for code in ("401", "403"):
            rm.auth_failures[code] = self.upstream_auth_failures.labels(route, code)
        self.route_ready.labels(route).set(0)
        return rm


class RequestCounts:
    """One route's answered requests: a count per (method, status code), the duration histogram's buckets and the
    time-to-first-byte histogram's.

    The request path adds to plain ints and floats here; `_RequestFamilies` turns them into the `requests_total`,
    `request_duration_seconds` and `time_to_first_byte_seconds` families when the registry is collected.
    prometheus-client's Counter and Histogram took a lock and made several Python calls per request for the same
    numbers. Everything that touches these runs on the event loop's thread (the request path, /metrics, a worker's
    snapshot).
    """

    __slots__ = ("buckets", "counts", "total_seconds", "ttfb_buckets", "ttfb_seconds")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.total_seconds = 0.0
        self.ttfb_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.ttfb_seconds = 0.0

    def add(self, method: str, status: int, seconds: float, ttfb: float = -1.0) -> None:
        """`ttfb` < 0: no answer head reached the caller (it went away first), so no time to first byte."""
        key = (method if method in METHODS else "other", status)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        # bisect_left: a duration equal to a bound counts in that bucket (le), as prometheus-client's Histogram.
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total_seconds += seconds
        if ttfb >= 0:
            self.ttfb_buckets[bisect_left(DURATION_BUCKETS, ttfb)] += 1
            self.ttfb_seconds += ttfb


class _RequestFamilies(Collector):
    """The request families of every route, built from RequestCounts at collection time."""

    def __init__(self, routes: dict[str, RequestCounts]) -> None:
        self._routes = routes

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(
                f"{NS}_requests",
                "Requests answered, by route, method and status code.",
                labels=("route", "method", "code"),
            ),
            HistogramMetricFamily(
                f"{NS}_request_duration_seconds",
                "Time from request start to the last response byte.",
                labels=("route",),
            ),
            HistogramMetricFamily(
                f"{NS}_time_to_first_byte_seconds",
                "Time from request start to the answer's head written to the caller.",
                labels=("route",),
            ),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        requests, duration, ttfb = self._families()
        for route, c in self._routes.items():
            for (method, status), n in sorted(c.counts.items()):
                requests.add_metric((route, method, str(status)), float(n))
            duration.add_metric((route,), _cumulative(c.buckets), c.total_seconds)
            ttfb.add_metric((route,), _cumulative(c.ttfb_buckets), c.ttfb_seconds)
        yield requests
        yield duration
        yield ttfb


def _cumulative(buckets: list[int]) -> list[tuple[str, float]]:
    """A histogram's buckets as the exposition has them: cumulative counts per upper bound."""
    cumulative: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(_DURATION_LE, buckets, strict=True):
        running += n
        cumulative.append((bound, float(running)))
    return cumulative


@dataclass(eq=False, kw_only=True)
class RouteMetrics:
    """Children of every family for one route, resolved once."""

    route: str
    region: str
    kind: str
    metrics: Metrics
    upstream_errors: dict[str, Counter] = field(default_factory=dict)
    reloads: dict[str, Counter] = field(default_factory=dict)
    auth_failures: dict[str, Counter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = self.metrics
        self.requests = m.request_counts(self.route)
        # In flight: a plain counter the handler bumps, read at scrape time (no lock taken per request).
        self.active = 0
        m.in_flight.labels(self.route).set_function(lambda: self.active)
        self.failovers = m.key_failovers.labels(self.route)
        self.retries = m.retries.labels(self.route)
        self.disconnects = m.client_disconnects.labels(self.route)
        self.ready = m.route_ready.labels(self.route)
        self.last_success = m.credential_last_success.labels(self.route)
        if self.kind == "key":
            return  # key files are not fetched: no token series for this route
        self._refresh_duration = {
            o: m.token_refresh_duration.labels(self.route, self.region, self.kind, o) for o in REFRESH_OUTCOMES
        }
        self._refreshes = {o: m.token_refreshes.labels(self.route, self.region, self.kind, o) for o in REFRESH_OUTCOMES}
        self.token_expiry = m.token_expiry.labels(self.route)
        self.token_next_refresh = m.token_next_refresh.labels(self.route)
        self.token_failures = m.token_failures.labels(self.route)
        self.token_remaining_at_refresh = m.token_remaining.labels(self.route)

    def token_refresh(self, outcome: str, seconds: float) -> None:
        self._refreshes[outcome].inc()
        self._refresh_duration[outcome].observe(seconds)

    def token_state(self, *, expires_at: float | None, next_refresh_at: float, failures: int) -> None:
        self.token_expiry.set(expires_at or 0)
        self.token_next_refresh.set(next_refresh_at)
        self.token_failures.set(failures)

    def request_done(self, method: str, status: int, seconds: float, ttfb: float = -1.0) -> None:
        self.requests.add(method, status, seconds, ttfb)


def histogram_quantile(text: str, metric: str, labels: dict[str, str], q: float) -> float | None:
    """PromQL's histogram_quantile over the buckets in exposition `text` whose labels include `labels`,
    summed across the other labels; None when there are no observations."""
    sums: dict[float, float] = {}
    prefix = metric + "_bucket{"
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        head, value = line.rsplit(" ", 1)
        pairs = dict(item.split("=", 1) for item in head[len(prefix) : -1].split(","))
        found = {k: v.strip('"') for k, v in pairs.items()}
        if all(found.get(k) == v for k, v in labels.items()):
            le = float("inf") if found["le"] == "+Inf" else float(found["le"])
            sums[le] = sums.get(le, 0.0) + float(value)
    buckets = sorted(sums.items())
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = le, count
    return lower
