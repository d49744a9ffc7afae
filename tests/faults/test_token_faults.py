"""Token endpoint and Entra ID faults, end to end on an injected clock.

The proxy (in-process, `ProxyService` with a `ManualClock`) fetches AML tokens (v1 service token, v2 online
endpoint token) from the emulator's control plane with a client-secret identity from the emulator's Entra ID,
everything over TLS on 127.0.0.1. The emulator runs on the same manual clock, so token lifetimes of minutes pass
in milliseconds. Each fault is injected through the emulator's fault queue, and each test checks what the issue
asks: the outcome and reason (/readyz, metrics), one log line per state change, serving while the current token
is usable, a JSON 503 with Retry-After once none is, and recovery.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from proxy.app import ProxyService
from proxy.clock import ManualClock
from proxy.config.reader import parse
from proxy.emulator.runner import RunningEmulator, start_emulator
from proxy.emulator.tls import make_local_tls
from tests.support.emulated import control_plane_auth, emulated_service, ready_of
from tests.support.logsetup import captured, logging_as_run
from tests.support.session import SESSION_SECRETS, remember

CLIENT = "44444444-4444-4444-4444-444444444444"
REGION = "westeurope"
LIFETIME = 600  # the AML token's lifetime on the emulator
REFRESH_AFTER = 300  # its refreshAfter, from issue
ENTRA_LIFETIME = 200  # the ARM token's lifetime: it has expired by the time the AML token is renewed
POLICY = {
    "margin_seconds": 0,
    "jitter_seconds": 0,
    "safety_seconds": 10,
    "min_interval_seconds": 1,
    "backoff_initial_seconds": 4,
    "backoff_max_seconds": 60,
    "timeout_seconds": 0.5,
}
EXPIRY_MARGIN = 5.0  # auth.refresh.expiry_margin_seconds by default: tokens here are not sent in their last 5 s
PLANES = {
    "v1": {"service": "svc1", "kind": "aml-service-token", "what": "AML v1 token endpoint"},
    "v2": {"service": "ep2", "kind": "aml-endpoint-token", "what": "AML v2 token endpoint"},
}

Records = list[logging.LogRecord]


@pytest.fixture
def proxy_logs() -> Iterator[Records]:
    """Every record of the "aml_auth_proxy" loggers during the test."""
    with captured("aml_auth_proxy") as handler:
        yield handler.records


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The process's logging as `aml-auth-proxy run` sets it up (level info), written to a buffer; put back after."""
    with logging_as_run("info") as buffer:
        yield buffer


@dataclass
class Rig:
    emu: RunningEmulator
    svc: ProxyService
    clock: ManualClock
    plane: str
    logs: Records
    started: float = 0.0
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def service(self) -> str:
        return PLANES[self.plane]["service"]

    @property
    def kind(self) -> str:
        return PLANES[self.plane]["kind"]

    @property
    def what(self) -> str:
        return PLANES[self.plane]["what"]

    @property
    def provider(self) -> Any:
        return self.svc.routes[0].provider

    def metric(self, name: str, **labels: str) -> float:
        return self.svc.metrics.registry.get_sample_value(name, labels) or 0.0

    def refreshes(self, outcome: str) -> float:
        return self.metric(
            "aml_auth_proxy_token_refreshes_total", route="r", region=REGION, kind=self.kind, outcome=outcome
        )

    def attempts(self) -> float:
        return sum(self.refreshes(o) for o in ("success", "transient_error", "permanent_error"))

    def details(self) -> dict[str, Any]:
        details: dict[str, Any] = self.provider.details()
        return details

    async def wait_attempts(self, count: float, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.attempts() < count:
            assert time.monotonic() < deadline, f"{self.attempts()} refresh attempts, expected {count}"
            await asyncio.sleep(0.005)

    async def next_attempt(self) -> None:
        """Move the clock to the next scheduled fetch and wait for that fetch to finish."""
        before = self.attempts()
        await self.clock.advance(max(0.0, self.details()["refresh_in"]) + 0.01)
        await self.wait_attempts(before + 1)

    async def advance_to(self, offset: float) -> None:
        """Move the clock to `started + offset`, one scheduled fetch at a time: each fetch that falls due meanwhile
        runs at its time and is waited for. (One long step used to let a fetch, which does real I/O and so takes
        more loop turns than a step settles, still be in flight when the step ended; it then ended after the test
        had moved on, and counted as the next attempt.)"""
        target = self.started + offset
        while True:
            now, details = self.clock.time(), self.details()
            if now + max(0.0, details["refresh_in"]) <= target:
                await self.next_attempt()
                continue
            # When the token's use ends the next fetch comes sooner: step to that moment, then look again.
            use_ends = now + details["expires_in"] - EXPIRY_MARGIN if details["expires_in"] is not None else target
            if now < use_ends < target:
                await self.clock.advance(use_ends - now + 0.001)
                continue
            break
        await self.clock.advance(max(0.0, target - self.clock.time()))

    def events(self, name: str) -> Records:
        return [r for r in self.logs if getattr(r, "event", None) == name]

    def loud(self, name: str) -> Records:
        return [r for r in self.events(name) if r.levelno >= logging.INFO]


async def score(rig: Rig) -> tuple[int, Mapping[str, str], Any]:
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"http://127.0.0.1:{rig.svc.proxy_port}/score", json={"data": [1, 2, 3]}) as resp,
    ):
        return resp.status, resp.headers.copy(), await resp.json(content_type=None)


async def readyz(rig: Rig) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{rig.svc.admin_port}/readyz") as resp,
    ):
        return resp.status, await resp.json()


async def unready(rig: Rig) -> Any:
    """/readyz answers 503: the route is unready. Returns the answer's JSON."""
    status, ready = await readyz(rig)
    assert status == 503, ready
    return ready


def upstream_401s(rig: Rig) -> float:
    return rig.metric("aml_auth_proxy_upstream_auth_failures_total", route="r", code="401")


async def heals(rig: Rig) -> None:
    """Once the emulator's faults are cleared, the next attempt succeeds and the route serves again."""
    rig.emu.state.clear_faults()
    await rig.next_attempt()
    assert (await score(rig))[0] == 200


def assert_proxy_503(status: int, headers: Mapping[str, str], body: Any) -> None:
    assert status == 503, (status, body)
    assert int(headers["Retry-After"]) >= 1
    assert headers["Content-Type"].startswith("application/json")
    assert body["route"] == "r" and body["error"].startswith("route has no usable credential")
    assert body["request_id"] == headers["x-request-id"]


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proxy_logs: Records) -> AsyncIterator[RigFactory]:
    rigs: list[Rig] = []

    async def factory(
        plane: str,
        *,
        before_start: Callable[[RunningEmulator], None] | None = None,
        ssl: tuple[Any, Any, str] | None = None,
        policy: dict[str, Any] | None = None,
    ) -> Rig:
        clock = ManualClock(start=float(int(time.time())))
        secret = "client-secret-" + secrets.token_urlsafe(16)
        remember(secret)
        config = {
            "tls": True,
            "entra": {"clients": {CLIENT: secret}, "token_lifetime_seconds": ENTRA_LIFETIME},
            "services": [
                emulated_service(
                    info["service"],
                    name,
                    REGION,
                    auth_mode="aml_token",
                    token_lifetime_seconds=LIFETIME,
                    token_refresh_after_seconds=REFRESH_AFTER,
                )
                for name, info in PLANES.items()
            ],
        }
        if ssl is None:
            emu = await start_emulator(config, clock=clock.time)
        else:
            control_ctx, entra_ctx, ca_file = ssl
            emu = await start_emulator(
                config, ssl_context=control_ctx, entra_ssl_context=entra_ctx, ca_file=ca_file, clock=clock.time
            )
        for s in emu.state.services.values():
            remember(s.primary_key, s.secondary_key)
        if before_start is not None:
            before_start(emu)
        secret_file = tmp_path / f"client-secret-{len(rigs)}"
        secret_file.write_text(secret + "\n")
        assert emu.ca_file is not None
        auth: dict[str, Any] = {
            "type": PLANES[plane]["kind"],
            **control_plane_auth(ready_of(emu), CLIENT, secret_file),
            "refresh": {**POLICY, **(policy or {})},
        }
        if plane == "v1":
            auth.update(service="svc1", mms_url=emu.control_url)
        else:
            auth.update(endpoint="ep2", arm_url=emu.control_url)
        doc = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "routes": [
                {
                    "name": "r",
                    "region": REGION,
                    "upstream": emu.service_urls[PLANES[plane]["service"]],
                    "tls": {"ca_file": emu.ca_file},
                    "auth": auth,
                }
            ],
        }
        svc = ProxyService(parse(doc, {}), registry=CollectorRegistry(), clock=clock)
        rig = Rig(emu=emu, svc=svc, clock=clock, plane=plane, logs=proxy_logs, started=clock.time())
        rigs.append(rig)
        await svc.start()
        return rig

    yield factory
    for rig in rigs:
        await rig.svc.stop()
        await rig.emu.close()


# -- faults at the AML token endpoint ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    fault: dict[str, Any]
    outcome: str
    reason: str  # what the reason says after "<what>: "

    @property
    def level(self) -> int:
        return logging.ERROR if self.outcome == "permanent_error" else logging.WARNING


TOKEN_ENDPOINT_FAULTS = {
    "http_500": Case({"action": "status", "status": 500}, "transient_error", "HTTP 500"),
    "http_503": Case({"action": "status", "status": 503}, "transient_error", "HTTP 503"),
    "http_429": Case({"action": "status", "status": 429, "retry_after": 45}, "transient_error", "HTTP 429"),
    "timeout": Case({"action": "delay", "seconds": 1.0}, "transient_error", "timed out"),
    "reset": Case({"action": "reset"}, "transient_error", "server closed the connection"),
    "invalid_json": Case({"action": "invalid_json"}, "transient_error", "the answer is not JSON"),
    "missing_fields": Case({"action": "missing_fields"}, "transient_error", "the answer lacks accessToken"),
    "http_403": Case({"action": "status", "status": 403}, "permanent_error", "HTTP 403 (EmulatedFault)"),
}


@pytest.mark.parametrize("plane", ["v1", "v2"])
@pytest.mark.parametrize("name", list(TOKEN_ENDPOINT_FAULTS))
async def test_token_endpoint_fault_is_classified_logged_once_served_through_then_503_and_recovers(
    make_rig: RigFactory, plane: str, name: str
) -> None:
    case = TOKEN_ENDPOINT_FAULTS[name]
    rig = await make_rig(plane)
    assert (await score(rig))[0] == 200
    rig.emu.state.add_fault(target="token", service=rig.service, **case.fault)

    # Renewal time: the fault starts; every retry meets it again.
    await rig.advance_to(REFRESH_AFTER)
    failures = 1
    for _ in range(3):
        await rig.next_attempt()
        failures += 1
    details = rig.details()
    assert details["last_refresh"] == case.outcome and details["consecutive_failures"] == failures
    assert rig.refreshes(case.outcome) == failures and rig.refreshes("success") == 1
    gauge = rig.metric("aml_auth_proxy_token_refresh_consecutive_failures", route="r")
    assert gauge == failures
    assert (
        rig.metric(
            "aml_auth_proxy_token_refresh_duration_seconds_count",
            route="r",
            region=REGION,
            kind=rig.kind,
            outcome=case.outcome,
        )
        == failures
    )
    if case.outcome == "permanent_error":
        assert details["refresh_in"] == pytest.approx(POLICY["backoff_max_seconds"], abs=0.1)
    # The current token is still good: requests keep flowing with it.
    status, _, body = await score(rig)
    assert status == 200, body
    assert (await readyz(rig))[0] == 200

    # Past the token's expiry the route answers 503 itself (the token is never sent) and goes unready.
    await rig.advance_to(LIFETIME + 1)
    assert_proxy_503(*await score(rig))
    ready = await unready(rig)
    why = f"{rig.kind} token expired; last refresh: {rig.what}: {case.reason}"
    assert ready["not_ready"]["r"] == why and ready["routes"]["r"]["reason"] == why
    assert ready["routes"]["r"]["last_refresh"] == case.outcome
    assert rig.metric("aml_auth_proxy_route_ready", route="r") == 0
    assert upstream_401s(rig) == 0

    # One line for the whole outage at WARNING (transient) or ERROR (permanent); every retry at DEBUG.
    failed = rig.events("token_refresh_failed")
    assert len(failed) == rig.refreshes(case.outcome) >= failures + 1
    assert [r.levelno for r in failed] == [case.level] + [logging.DEBUG] * (len(failed) - 1)
    assert all(r.fields["reason"] == f"{rig.what}: {case.reason}" for r in failed)  # type: ignore[attr-defined]

    # The endpoint heals: the next attempt succeeds, logs one recovery line, and the route serves again.
    rig.emu.state.clear_faults()
    await rig.next_attempt()
    if rig.details()["last_refresh"] != "success":  # a pooled connection the fault broke: one more attempt
        await rig.next_attempt()
    assert (await score(rig))[0] == 200
    status, ready = await readyz(rig)
    assert status == 200 and ready["routes"]["r"]["last_refresh"] == "success"
    assert ready["routes"]["r"]["consecutive_failures"] == 0
    recovered = [r for r in rig.loud("token_refreshed") if r.fields["recovered"]]  # type: ignore[attr-defined]
    assert len(recovered) == 1
    assert len(rig.loud("token_refresh_failed")) == 1


@pytest.mark.parametrize("plane", ["v1", "v2"])
async def test_429_retry_after_delays_the_next_token_call(make_rig: RigFactory, plane: str) -> None:
    rig = await make_rig(plane)
    rig.emu.state.add_fault(target="token", service=rig.service, action="status", status=429, retry_after=45)
    await rig.advance_to(REFRESH_AFTER)
    for _ in range(3):
        calls = rig.emu.state.token_calls[rig.service]
        assert rig.details()["refresh_in"] >= 45 - 0.05
        await rig.clock.advance(44.9)
        await asyncio.sleep(0.05)
        assert rig.emu.state.token_calls[rig.service] == calls  # not before Retry-After
        await rig.next_attempt()
        assert rig.emu.state.token_calls[rig.service] == calls + 1
    assert rig.refreshes("transient_error") == 4
    assert len(rig.loud("token_refresh_failed")) == 1


# -- tokens whose times are wrong --------------------------------------------------------------------------------


@pytest.mark.parametrize("plane", ["v1", "v2"])
async def test_an_already_expired_token_is_a_transient_error_and_the_current_token_keeps_serving(
    make_rig: RigFactory, plane: str
) -> None:
    rig = await make_rig(plane)
    assert (await score(rig))[0] == 200
    rig.emu.state.add_fault(target="token", service=rig.service, action="expired_token", seconds=30)
    await rig.advance_to(REFRESH_AFTER)
    await rig.next_attempt()
    await rig.next_attempt()
    details = rig.details()
    assert details["last_refresh"] == "transient_error" and details["consecutive_failures"] == 3
    assert details["expires_in"] > 0  # still the good token
    assert rig.refreshes("transient_error") == 3 and rig.refreshes("success") == 1
    assert (await score(rig))[0] == 200
    failed = rig.events("token_refresh_failed")
    assert [r.levelno for r in failed] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "already expired" in failed[0].fields["reason"]  # type: ignore[attr-defined]
    # Once the good token runs out: 503 and unready, with the reason.
    await rig.advance_to(LIFETIME + 1)
    assert_proxy_503(*await score(rig))
    ready = await unready(rig)
    assert "already expired" in ready["not_ready"]["r"]
    assert upstream_401s(rig) == 0
    await heals(rig)


@pytest.mark.parametrize("plane", ["v1", "v2"])
async def test_an_already_expired_token_at_startup_leaves_the_route_unready_without_a_hot_loop(
    make_rig: RigFactory, plane: str
) -> None:
    def expire(emu: RunningEmulator) -> None:
        emu.state.add_fault(target="token", action="expired_token", seconds=5)

    rig = await make_rig(plane, before_start=expire)
    assert_proxy_503(*await score(rig))
    ready = await unready(rig)
    assert ready["routes"]["r"]["last_refresh"] == "transient_error"
    assert "already expired" in ready["not_ready"]["r"]
    # Backoff, not min_interval, and with no usable token never more than a second between calls. The floor is a
    # tenth of min_interval after the failure; next_attempt moves the clock 0.01 s past the fetch, which may fail
    # before that last step (the fetch waits on real sockets), so up to 0.01 s of it may have passed here.
    for _ in range(3):
        assert 0.1 - 0.011 <= rig.details()["refresh_in"] <= 1.0
        await rig.next_attempt()
    await rig.clock.advance(rig.details()["refresh_in"] - 0.05)
    assert rig.emu.state.token_calls[rig.service] == 4
    assert upstream_401s(rig) == 0
    assert len(rig.loud("token_refresh_failed")) == 1


@pytest.mark.parametrize("plane", ["v1", "v2"])
async def test_a_jwt_exp_earlier_than_the_reported_expiry_wins_and_is_never_used_past(
    make_rig: RigFactory, plane: str
) -> None:
    jwt_exp = 100  # seconds after issue; the answer says LIFETIME (600)

    def short(emu: RunningEmulator) -> None:
        emu.state.add_fault(target="token", action="exp_before_expiry", seconds=jwt_exp, count=1)

    rig = await make_rig(plane, before_start=short)
    details = rig.details()
    assert 0 < details["expires_in"] <= jwt_exp
    assert details["refresh_in"] < jwt_exp  # renewal is planned before the earlier expiry, not at refreshAfter
    expiry = rig.metric("aml_auth_proxy_token_expiry_timestamp_seconds", route="r")
    assert rig.started < expiry <= rig.started + jwt_exp
    # The renewal fails; the token is used up to its exp minus the expiry margin and not a moment longer.
    rig.emu.state.add_fault(target="token", action="status", status=500)
    await rig.advance_to(jwt_exp - EXPIRY_MARGIN - 2)
    assert rig.refreshes("transient_error") >= 1
    assert (await score(rig))[0] == 200
    await rig.advance_to(jwt_exp - EXPIRY_MARGIN + 0.5)
    assert_proxy_503(*await score(rig))
    await rig.advance_to(jwt_exp + 0.5)
    assert_proxy_503(*await score(rig))
    assert upstream_401s(rig) == 0
    await heals(rig)
    assert rig.details()["expires_in"] > jwt_exp  # a normal token now


# -- faults at Entra ID, met when the ARM token must be renewed -------------------------------------------------

# Entra ID is the same for both planes: v2 only. The reason is stable from one answer to the next (status and
# OAuth error code, never the description with its trace id), so repeats are one state, not a log storm.
ENTRA_FAULTS = {
    "http_500": ({"action": "status", "status": 500}, "transient_error", "Entra ID: HTTP 500 ("),
    "http_400": ({"action": "status", "status": 400}, "permanent_error", "Entra ID: HTTP 400 ("),
    "http_429": ({"action": "status", "status": 429, "retry_after": 1}, "transient_error", "Entra ID: HTTP 429 ("),
    # 425 Too Early is transient for Entra ID as for the control planes (one classifier, credentials/http.py).
    "http_425": ({"action": "status", "status": 425}, "transient_error", "Entra ID: HTTP 425 ("),
    "invalid_json": ({"action": "invalid_json"}, "transient_error", "Entra ID sent a malformed answer"),
    "missing_fields": ({"action": "missing_fields"}, "transient_error", "Entra ID sent a malformed answer"),
    "slow": ({"action": "delay", "seconds": 30}, "transient_error", "Entra ID did not answer within "),
}


@pytest.mark.parametrize("name", list(ENTRA_FAULTS))
async def test_entra_fault_on_arm_token_renewal_is_classified_logged_once_and_served_through(
    make_rig: RigFactory, name: str
) -> None:
    fault, outcome, reason = ENTRA_FAULTS[name]
    rig = await make_rig("v2", policy={"timeout_seconds": 0.5} if name == "slow" else None)
    assert (await score(rig))[0] == 200
    # The ARM token (200 s) has expired at the control plane by renewal time (300 s): the proxy must go to Entra ID.
    rig.emu.state.add_fault(target="entra", **fault)
    await rig.advance_to(REFRESH_AFTER)
    for _ in range(2):
        await rig.next_attempt()
    details = rig.details()
    assert details["last_refresh"] == outcome and details["consecutive_failures"] == 3
    assert details["last_error"].startswith(reason), details["last_error"]
    assert rig.refreshes(outcome) == 3
    assert rig.metric("aml_auth_proxy_entra_token_requests_total", identity="client_secret", outcome="error") == 3
    assert (await score(rig))[0] == 200
    failed = rig.events("token_refresh_failed")
    level = logging.ERROR if outcome == "permanent_error" else logging.WARNING
    assert [r.levelno for r in failed] == [level, logging.DEBUG, logging.DEBUG]
    await rig.advance_to(LIFETIME + 1)
    assert_proxy_503(*await score(rig))
    ready = await unready(rig)
    assert ready["not_ready"]["r"].startswith(f"{rig.kind} token expired; last refresh: ")
    await heals(rig)
    assert len(rig.loud("token_refresh_failed")) == 1


# -- TLS ---------------------------------------------------------------------------------------------------------

TLS_FAULTS = ["untrusted_ca", "wrong_hostname"]


@pytest.mark.parametrize("where", ["control_plane", "entra"])
@pytest.mark.parametrize("tls_fault", TLS_FAULTS)
async def test_tls_errors_are_classified_transient_not_crashes(
    make_rig: RigFactory, tmp_path: Path, where: str, tls_fault: str
) -> None:
    good = make_local_tls(tmp_path / "good")
    trusted = [good.ca_file.read_text()]
    if tls_fault == "untrusted_ca":
        bad = make_local_tls(tmp_path / "other-ca")  # the right names, from a CA the proxy does not trust
    else:
        bad = make_local_tls(tmp_path / "wrong-host", hosts=("aml.example.invalid",))
        trusted.append(bad.ca_file.read_text())  # a trusted CA, but a certificate for another name
    bundle = tmp_path / "trusted.pem"
    bundle.write_text("".join(trusted))
    control, entra = (bad, good) if where == "control_plane" else (good, bad)
    rig = await make_rig("v2", ssl=(control.server_context(), entra.server_context(), str(bundle)))
    assert_proxy_503(*await score(rig))
    ready = await unready(rig)
    assert ready["routes"]["r"]["last_refresh"] == "transient_error"
    if where == "control_plane":
        assert (
            ready["not_ready"]["r"]
            == "no aml-endpoint-token token yet: AML v2 token endpoint: TLS certificate not trusted"
        )
    assert rig.refreshes("transient_error") == 1
    await rig.next_attempt()
    await rig.next_attempt()
    assert rig.refreshes("transient_error") == 3
    assert not any(t.done() for t in rig.svc._tasks)  # the refresher lives on
    assert len(rig.loud("token_refresh_failed")) == 1


# -- a token's edges -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plane", ["v1", "v2"])
async def test_a_token_is_never_sent_in_its_last_seconds_to_a_front_end_whose_clock_runs_ahead(
    make_rig: RigFactory, plane: str
) -> None:
    # The scoring front end's clock is 0.9 s ahead of the proxy's: less than whole-second Date headers can tell
    # from rounding, so the proxy cannot correct it. A token sent with under 0.9 s left by the proxy's clock
    # reached a front end for which it had expired, and the caller got the upstream's 401.
    rig = await make_rig(plane, before_start=lambda emu: emu.state.set_clock_offset(0.9))
    expiry = rig.clock.time() + rig.details()["expires_in"]
    rig.emu.state.add_fault(target="token", service=rig.service, action="status", status=503)
    await rig.advance_to(expiry - EXPIRY_MARGIN - 1 - rig.started)
    assert (await score(rig))[0] == 200  # the margin takes no more than its seconds
    answers = []
    for left in (EXPIRY_MARGIN - 0.01, 2.0, 0.5, 0.1):
        await rig.advance_to(expiry - left - rig.started)
        answers.append((left, *await score(rig)))
    assert [(left, status) for left, status, _, _ in answers] == [
        (EXPIRY_MARGIN - 0.01, 503),
        (2.0, 503),
        (0.5, 503),
        (0.1, 503),
    ]
    assert upstream_401s(rig) == 0  # the token never reached the front end in its last seconds
    for _, *answer in answers:
        assert_proxy_503(*answer)  # the proxy's own 503 with Retry-After, as for an expired token
    ready = await unready(rig)
    assert (
        ready["not_ready"]["r"]
        == f"{rig.kind} token is within its 5 s expiry margin; last refresh: {rig.what}: HTTP 503"
    )
    await heals(rig)


@pytest.mark.parametrize("plane", ["v1", "v2"])
async def test_service_resumes_within_two_seconds_of_the_token_endpoint_answering_again(
    make_rig: RigFactory, plane: str
) -> None:
    rig = await make_rig(plane)
    expiry = rig.clock.time() + rig.details()["expires_in"]
    rig.emu.state.add_fault(target="token", service=rig.service, action="status", status=503)
    await rig.advance_to(REFRESH_AFTER)
    # A 10 s outage of the token endpoint after the token is gone.
    while rig.clock.time() < expiry + 10:
        await rig.next_attempt()
        if rig.provider.current is None:
            assert rig.details()["refresh_in"] <= 1.0  # the next attempt is never more than a second away
    assert_proxy_503(*await score(rig))
    rig.emu.state.clear_faults()
    healed = rig.clock.time()
    while (await score(rig))[0] != 200:
        assert rig.clock.time() - healed < 2.0, rig.details()
        await rig.next_attempt()
    assert upstream_401s(rig) == 0


async def test_an_operator_reads_when_503s_began_how_long_they_lasted_and_no_azure_chatter(
    make_rig: RigFactory, json_log: io.StringIO
) -> None:
    # v2: every AML token renewal first gets an ARM token from Entra ID through azure-identity.
    rig = await make_rig("v2")
    await rig.advance_to(REFRESH_AFTER)  # a renewal on schedule, through Entra ID
    assert rig.refreshes("success") == 2
    expiry = rig.clock.time() + rig.details()["expires_in"]
    rig.emu.state.add_fault(target="entra", action="status", status=500)  # Entra ID down, then the token endpoint
    for _ in range(3):
        await rig.next_attempt()
    rig.emu.state.clear_faults()
    rig.emu.state.add_fault(target="token", service=rig.service, action="status", status=503)
    while rig.clock.time() < expiry + 10:
        await rig.next_attempt()
    rig.emu.state.clear_faults()
    while rig.details()["last_refresh"] != "success":
        await rig.next_attempt()
    restored_at = rig.clock.time()
    lines = json_log.getvalue().splitlines()
    docs = [json.loads(line) for line in lines]  # every line is one JSON document, multi-line messages included
    assert not [d for d in docs if d["level"] == "info" and d["logger"].startswith(("azure", "msal"))]
    azure = [d for d in docs if d["logger"].startswith(("azure", "msal"))]
    assert len(azure) <= 1, azure  # azure-identity's warning about the failing Entra ID calls: once
    refreshed = [d for d in docs if d.get("event") == "token_refreshed"]
    assert [d["trigger"] for d in refreshed] == ["startup", "scheduled"]  # renewals on schedule are debug lines;
    assert refreshed[1]["recovered"] is True  # the one that ended the failures is not
    expired = [d for d in docs if d.get("event") == "token_expired"]
    assert len(expired) == 1 and expired[0]["level"] == "warning" and expired[0]["route"] == "r"
    restored = [d for d in docs if d.get("event") == "token_restored"]
    assert len(restored) == 1 and restored[0]["level"] == "info"
    assert restored[0]["outage_seconds"] == pytest.approx(restored_at - (expiry - EXPIRY_MARGIN), abs=0.05)
    failed = [d for d in docs if d.get("event") == "token_refresh_failed"]
    assert len(failed) == 2 and failed[0]["reason"].startswith("Entra ID: HTTP 500 (")  # one line per reason
    assert failed[1]["reason"] == f"{rig.what}: HTTP 503"
    assert not any(s in line for s in SESSION_SECRETS for line in lines)
