"""The request families are counted in plain numbers (proxy.metrics.RequestCounts) and built at scrape time: their
exposition must be exactly what prometheus-client's own Counter and Histogram give for the same requests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.metrics import DURATION_BUCKETS, METHODS, NS, Metrics

REQUESTS = [
    ("GET", 200, 0.0),
    ("GET", 200, 0.001),  # exactly on a bound: counted in that bucket (le)
    ("GET", 200, 0.0010001),
    ("POST", 200, 0.25),
    ("POST", 502, 3.0),
    ("BREW", 418, 0.004),  # not a known method: "other"
    ("DELETE", 499, 60.0),
    ("PUT", 504, 61.5),  # past the last bound: only +Inf
]


def family_lines(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    base = (f"{NS}_requests", f"{NS}_request_duration_seconds")
    names = {f"{NS}_requests_total", *(f"{base[1]}{s}" for s in ("", "_bucket", "_count", "_sum")), *base}

    def name(line: str) -> str:
        return line.split()[2] if line.startswith("#") else line.split("{")[0].split()[0]

    return sorted(line for line in text.splitlines() if name(line) in names)


def test_request_families_match_prometheus_clients_counter_and_histogram() -> None:
    ours = Metrics(CollectorRegistry())
    reference = CollectorRegistry()
    counter = Counter(
        f"{NS}_requests",
        "Requests answered, by route, method and status code.",
        ("route", "method", "code"),
        registry=reference,
    )
    histogram = Histogram(
        f"{NS}_request_duration_seconds",
        "Time from request start to the last response byte.",
        ("route",),
        buckets=DURATION_BUCKETS,
        registry=reference,
    )
    routes = {name: ours.for_route(name) for name in ("a", "idle")}
    histogram.labels("idle")  # a route with no requests yet still shows its (empty) histogram
    for method, status, seconds in REQUESTS * 3:
        route = "a"
        routes[route].request_done(method, status, seconds)
        counter.labels(route, method if method in METHODS else "other", str(status)).inc()
        histogram.labels(route).observe(seconds)
    assert family_lines(ours.registry) == family_lines(reference)
    assert f'{NS}_request_duration_seconds_bucket{{le="0.001",route="a"}} 6.0' in family_lines(ours.registry)


def test_a_second_route_metrics_of_the_same_name_shares_its_counts() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.for_route("r").request_done("GET", 200, 0.01)
    metrics.for_route("r").request_done("GET", 200, 0.01)
    value = metrics.registry.get_sample_value(f"{NS}_requests_total", {"route": "r", "method": "GET", "code": "200"})
    assert value == 2.0
