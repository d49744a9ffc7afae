"""Every credential kind end to end: proxy → emulator scoring front end, with credentials fetched from the
emulator's Entra ID, AML control planes and ML Server over real HTTP(S) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from proxy.emulator.azmlinfsrv import AzmlinfsrvProcess, start_azmlinfsrv
from proxy.emulator.runner import RunningEmulator, start_emulator
from proxy.emulator.tls import make_local_tls
from tests.support.emulated import WORKSPACE, control_plane_auth, emulated_service, ready_of
from tests.support.procs import ProxyProcess
from tests.support.servers import ProxyFactory
from tests.support.session import SESSION_DIGESTS, remember

CLIENT = "11111111-1111-1111-1111-111111111111"
WORKLOAD = "22222222-2222-2222-2222-222222222222"
MANAGED = "33333333-3333-3333-3333-333333333333"
FAST = {
    "jitter_seconds": 0.05,
    "min_interval_seconds": 0.05,
    "backoff_initial_seconds": 0.05,
    "backoff_max_seconds": 0.5,
    "timeout_seconds": 5,
}


@pytest.fixture
async def emu(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningEmulator]:
    secret = "client-secret-" + secrets.token_urlsafe(16)
    password = "mls-password-" + secrets.token_urlsafe(12)
    remember(secret, password)
    config = {
        "entra": {
            "clients": {CLIENT: secret},
            "federated": {WORKLOAD: "system:serviceaccount:scoring:caller"},
            "managed_identities": [MANAGED],
        },
        "mlserver": {"users": {"admin": password}, "access_token_lifetime_seconds": 3600, "backend": "echo"},
        "services": [
            emulated_service("svc1", "v1", "eastus", auth_mode="aml_token"),
            emulated_service("ep2", "v2", "westeurope", auth_mode="aml_token"),
            emulated_service("aad3", "v2", "westeurope", auth_mode="aad_token"),
            emulated_service("keys4", "v2", "eastus", auth_mode="key"),
        ],
    }
    # Every listener over TLS with a throwaway CA, as the control planes, Entra ID and the endpoints are in Azure.
    tls = make_local_tls(tmp_path_factory.mktemp("tls"))
    async with await start_emulator(config, ssl_context=tls.server_context(), ca_file=tls.ca_file) as emulator:
        for service in emulator.state.services.values():
            remember(service.primary_key, service.secondary_key)
        emulator.secret = secret  # type: ignore[attr-defined]
        emulator.password = password  # type: ignore[attr-defined]
        yield emulator
        if emulator.state.mlserver is not None:
            SESSION_DIGESTS.update(emulator.state.mlserver_revoked)


@pytest.fixture
async def azmlinfsrv() -> AsyncIterator[AzmlinfsrvProcess]:
    process = await start_azmlinfsrv()
    yield process
    await process.stop()


def route(emu: RunningEmulator, name: str, upstream: str, auth: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "upstream": upstream, "tls": {"ca_file": emu.ca_file}, "auth": auth, **extra}


async def ep2_proxy(
    emu: RunningEmulator, make_proxy: ProxyFactory, tmp_path: Path, name: str, *, refresh: dict[str, Any], **extra: Any
) -> Any:
    """A proxy with one aml-endpoint-token route to the v2 endpoint ep2, with a client-secret identity."""
    return await make_proxy(
        route(emu, name, emu.service_urls["ep2"], ep2_auth(emu, tmp_path, refresh=refresh), **extra)
    )


def ep2_auth(emu: RunningEmulator, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """aml-endpoint-token auth for the v2 endpoint ep2, with a client-secret identity."""
    return client_secret_auth(
        emu, tmp_path, type="aml-endpoint-token", endpoint="ep2", arm_url=emu.control_url, **extra
    )


def control_plane(emu: RunningEmulator, **auth: Any) -> dict[str, Any]:
    return {**WORKSPACE, "ca_file": emu.ca_file, **auth}


def client_secret_auth(emu: RunningEmulator, tmp_path: Path, **auth: Any) -> dict[str, Any]:
    """`auth` reaching the emulator's control plane as CLIENT, with its client secret in a file under tmp_path."""
    path = tmp_path / "client-secret"
    path.write_text(emu.secret + "\n")  # type: ignore[attr-defined]
    return {**control_plane_auth(ready_of(emu), CLIENT, path), **auth}


async def score(svc: Any, path: str = "/score", data: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"http://127.0.0.1:{svc.proxy_port}{path}", json=data or {"data": [1, 2, 3]}) as resp,
    ):
        body = await resp.json(content_type=None)
        return resp.status, body


async def admin(svc: Any, method: str, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as client,
        client.request(method, f"http://127.0.0.1:{svc.admin_port}{path}") as resp,
    ):
        return resp.status, await resp.json()


async def test_aml_service_token_v1_with_a_client_secret_reaches_azmlinfsrv(
    emu: RunningEmulator, make_proxy: ProxyFactory, tmp_path: Path, azmlinfsrv: AzmlinfsrvProcess
) -> None:
    emu.state.services["svc1"] = dataclasses.replace(emu.state.services["svc1"], deployments={"blue": azmlinfsrv.url})
    auth = client_secret_auth(emu, tmp_path, type="aml-service-token", service="svc1", mms_url=emu.control_url)
    svc = await make_proxy(route(emu, "v1", emu.service_urls["svc1"], auth, region="eastus"))
    assert await score(svc) == (200, {"result": [2, 4, 6]})
    assert emu.state.token_calls["svc1"] == 1
    status, body = await admin(svc, "GET", "/readyz")
    state = body["routes"]["v1"]
    assert status == 200 and state["kind"] == "aml-service-token" and state["last_refresh"] == "success"
    assert 3500 < state["expires_in"] <= 3600 and 1700 < state["refresh_in"] <= 1800
    assert "token" not in str(body).replace("aml-service-token", "")  # kind names only, never a credential
    status, body = await admin(svc, "POST", "/refresh?route=v1")
    assert status == 200 and emu.state.token_calls["svc1"] == 2
    samples = svc.metrics.registry.get_sample_value(
        "aml_auth_proxy_token_refresh_duration_seconds_count",
        {"route": "v1", "region": "eastus", "kind": "aml-service-token", "outcome": "success"},
    )
    assert samples == 2
    assert (
        svc.metrics.registry.get_sample_value(
            "aml_auth_proxy_entra_token_requests_total", {"identity": "client_secret", "outcome": "acquired"}
        )
        == 1
    )


async def test_aml_endpoint_token_v2_with_workload_identity(
    emu: RunningEmulator, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    token_file = emu.write_service_account_token(WORKLOAD, tmp_path / "sa-token")
    auth = control_plane(
        emu,
        type="aml-endpoint-token",
        endpoint="ep2",
        arm_url=emu.control_url,
        identity={
            "type": "workload",
            "client_id": WORKLOAD,
            "tenant_id": emu.tenant,
            "authority_host": emu.entra_url,
            "token_file": str(token_file),
        },
    )
    svc = await make_proxy(route(emu, "v2", emu.service_urls["ep2"], auth, region="westeurope"))
    assert await score(svc) == (200, {"result": [2, 4, 6]})
    assert emu.state.token_calls["ep2"] == 1


async def test_aad_token_with_managed_identity(
    emu: RunningEmulator, make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", emu.imds_url)
    auth = {"type": "aad", "identity": {"type": "managed", "client_id": MANAGED}}
    svc = await make_proxy(route(emu, "aad", emu.service_urls["aad3"], auth))
    assert await score(svc) == (200, {"result": [2, 4, 6]})
    assert emu.state.entra_token_calls[MANAGED] == 1


async def test_without_auth_ca_file_entra_and_the_control_plane_trust_the_system_store(
    emu: RunningEmulator, make_proxy: ProxyFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SSL_CERT_FILE moves OpenSSL's system store to the emulator's CA: both the proxy's own client and the Entra
    ID calls (requests, whose own default would be certifi's bundle) must trust it."""
    monkeypatch.setenv("SSL_CERT_FILE", emu.ca_file)
    auth = ep2_auth(emu, tmp_path)
    del auth["ca_file"]
    svc = await make_proxy(route(emu, "sys", emu.service_urls["ep2"], auth))
    assert await score(svc) == (200, {"result": [2, 4, 6]})
    assert emu.state.entra_token_calls[CLIENT] == 1 and emu.state.token_calls["ep2"] == 1


async def test_aml_keys_fail_over_then_refetch_after_regeneration(
    emu: RunningEmulator, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    auth = client_secret_auth(
        emu,
        tmp_path,
        type="aml-keys",
        endpoint="keys4",
        arm_url=emu.control_url,
        refresh={"min_interval_seconds": 0.05},
    )
    svc = await make_proxy(route(emu, "keys", emu.service_urls["keys4"], auth))
    assert (await score(svc))[0] == 200
    emu.state.regenerate_key("keys4", "Primary")
    remember(emu.state.services["keys4"].primary_key)
    assert (await score(svc))[0] == 200  # failover to the secondary, no fetch
    assert svc.metrics.registry.get_sample_value("aml_auth_proxy_key_failovers_total", {"route": "keys"}) == 1
    emu.state.regenerate_key("keys4", "Secondary")
    remember(emu.state.services["keys4"].secondary_key)
    await asyncio.sleep(0.1)
    assert (await score(svc))[0] == 200  # both stale: one listKeys, then the new primary
    refreshes = svc.metrics.registry.get_sample_value(
        "aml_auth_proxy_token_refreshes_total",
        {"route": "keys", "region": "unknown", "kind": "aml-keys", "outcome": "success"},
    )
    assert refreshes == 2


def mlserver_auth(emu: RunningEmulator, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """An `auth` for the emulator's ML Server, signing in as its admin with files under `tmp_path`."""
    (tmp_path / "user").write_text("admin\n")
    (tmp_path / "password").write_text(emu.password + "\n")  # type: ignore[attr-defined]
    return {
        "type": "mlserver",
        "username_file": str(tmp_path / "user"),
        "password_file": str(tmp_path / "password"),
        "ca_file": emu.ca_file,
        **extra,
    }


async def test_mlserver_login_rotation_relogin_and_revoke_on_shutdown(
    emu: RunningEmulator, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    assert emu.mlserver_url is not None
    auth = mlserver_auth(emu, tmp_path, refresh={"min_interval_seconds": 0.05})
    svc = await make_proxy(route(emu, "mls", emu.mlserver_url, auth))
    assert (await score(svc, "/score"))[0] == 200
    calls = emu.state.mlserver_calls
    assert calls["login"] == 1
    await admin(svc, "POST", "/refresh?route=mls")  # rotation: refresh token for a new pair
    assert calls["refresh"] == 1 and calls["login"] == 1
    assert (await score(svc, "/score"))[0] == 200
    await asyncio.sleep(0.1)  # forced refreshes are rate-limited (min_interval_seconds)
    emu.state.mlserver_revoke_all()  # an administrator ends every session
    assert (await score(svc, "/score"))[0] == 200  # 401 -> refresh refused -> login again -> retried
    assert calls["login"] == 2
    await svc.stop()
    assert calls["revoke"] == 1 and len(emu.state.mlserver_revoked) >= 1


async def test_mlserver_token_times_are_read_on_the_injected_clock(emu: RunningEmulator, tmp_path: Path) -> None:
    """The ML Server kind reads its times on the clock the proxy runs on (proxy/clock.py), as every kind does: a
    proxy whose clock is a ManualClock far from the wall clock sees the token's lifetime from that clock."""
    from proxy.clock import ManualClock
    from proxy.config.reader import parse
    from proxy.credentials.mlserver import MlServerSource

    assert emu.mlserver_url is not None
    auth = mlserver_auth(emu, tmp_path)
    settings = parse({"routes": [route(emu, "mls", emu.mlserver_url, auth)]}, {})
    clock = ManualClock(start=time.time() + 10 * 86400)  # ten days ahead of the wall clock
    source = MlServerSource(auth=settings.routes[0].auth, base_url=emu.mlserver_url, clock=clock)
    try:
        token = await source.fetch(None)
        await source.revoke(token)
    finally:
        await source.close()
    assert token.expires_at is not None
    assert abs(token.expires_at - (clock.time() + 3600)) < 5, token.expires_at - clock.time()


async def test_jwt_file_expiry_makes_the_route_unready_until_a_newer_token_appears(
    serve: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    from proxy.emulator.echo import create_echo_app

    upstream = await serve(create_echo_app())
    key = secrets.token_bytes(32)
    path = tmp_path / "run-token"

    def write(lifetime: float) -> str:
        token = jwt.encode({"sub": "run", "exp": int(time.time() + lifetime)}, key, algorithm="HS256")
        tmp = tmp_path / "tmp-token"
        tmp.write_text(token + "\n")
        tmp.replace(path)
        return token

    write(2)
    svc = await make_proxy(
        {
            "name": "jwt",
            "upstream": upstream,
            "auth": {"type": "jwt-file", "token_file": str(path), "reload_seconds": 0.05, "refresh": FAST},
        }
    )
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{svc.proxy_port}/echo") as resp:
            seen = await resp.json()
            assert next(v for k, v in seen["headers"] if k == "Authorization").startswith("Bearer eyJ")
        await asyncio.sleep(2.2)
        async with client.get(f"http://127.0.0.1:{svc.proxy_port}/echo") as resp:
            assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
            body = await resp.json()
            assert body["error"].startswith("route has no usable credential: jwt-file token expired")
        write(60)
        for _ in range(100):
            async with client.get(f"http://127.0.0.1:{svc.proxy_port}/echo") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.05)
        assert resp.status == 200


async def test_stampede_of_401s_makes_exactly_one_token_call(
    emu: RunningEmulator, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    _short_tokens(emu, "ep2", lifetime=60, refresh_after=30)
    svc = await ep2_proxy(emu, make_proxy, tmp_path, "s", refresh={"min_interval_seconds": 0.2})
    assert (await score(svc))[0] == 200
    await asyncio.sleep(0.3)
    before = emu.state.token_calls["ep2"]
    emu.state.set_clock_offset(61)  # the front end now sees the proxy's token as expired: everyone gets 401 once
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

        async def one() -> int:
            async with client.post(f"http://127.0.0.1:{svc.proxy_port}/score", json={"data": [1]}) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert statuses == [200] * 200
    assert emu.state.token_calls["ep2"] - before == 1
    assert (
        svc.metrics.registry.get_sample_value(
            "aml_auth_proxy_upstream_auth_failures_total", {"route": "s", "code": "401"}
        )
        == 200
    )


@pytest.mark.parametrize("offset", [600, -600])
async def test_server_clock_skew_neither_breaks_nor_hot_loops_refreshes(
    emu: RunningEmulator, make_proxy: ProxyFactory, tmp_path: Path, offset: int
) -> None:
    emu.state.set_clock_offset(offset)
    _short_tokens(emu, "ep2", lifetime=4, refresh_after=2)
    svc = await ep2_proxy(emu, make_proxy, tmp_path, "skew", refresh=FAST)
    statuses = await _load(svc, seconds=5)
    calls = emu.state.token_calls["ep2"]
    assert set(statuses) == {200}
    # Refresh-after 2 s, read through a whole-second Date header on the conservative side: about one refresh a
    # second over 5 s. A hot loop would make hundreds; an uncorrected skew would make 401s or expire the route.
    assert 2 <= calls <= 8, calls


async def test_outage_shorter_than_the_lifetime_fails_no_request_and_recovers(
    emu: RunningEmulator, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    _short_tokens(emu, "ep2", lifetime=6, refresh_after=1)
    svc = await ep2_proxy(emu, make_proxy, tmp_path, "o", refresh=FAST, region="westeurope")
    emu.state.add_fault(target="token", action="status", status=503, region="westeurope")
    statuses = await _load(svc, seconds=3.5)
    failures = svc.metrics.registry.get_sample_value(
        "aml_auth_proxy_token_refreshes_total",
        {"route": "o", "region": "westeurope", "kind": "aml-endpoint-token", "outcome": "transient_error"},
    )
    assert set(statuses) == {200} and failures is not None and failures >= 3
    emu.state.clear_faults()
    await asyncio.sleep(1.2)
    _status, body = await admin(svc, "GET", "/readyz")
    assert body["routes"]["o"]["last_refresh"] == "success" and body["routes"]["o"]["consecutive_failures"] == 0


async def test_outage_past_expiry_answers_503_never_sends_an_expired_token_and_recovers(
    emu: RunningEmulator, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    _short_tokens(emu, "ep2", lifetime=2, refresh_after=1)
    svc = await ep2_proxy(emu, make_proxy, tmp_path, "x", refresh=FAST)
    emu.state.add_fault(target="token", action="status", status=500)
    statuses = await _load(svc, seconds=4)
    assert 503 in statuses and 401 not in statuses and set(statuses) <= {200, 503}
    status, body = await admin(svc, "GET", "/readyz")
    assert status == 503 and body["not_ready"]["x"].startswith("aml-endpoint-token token expired")
    emu.state.clear_faults()
    await asyncio.sleep(1)
    assert (await score(svc))[0] == 200
    assert (await admin(svc, "GET", "/readyz"))[0] == 200


def _short_tokens(emu: RunningEmulator, name: str, *, lifetime: int, refresh_after: int) -> None:
    emu.state.services[name] = dataclasses.replace(
        emu.state.services[name], token_lifetime_seconds=lifetime, token_refresh_after_seconds=refresh_after
    )


async def _load(svc: Any, *, seconds: float) -> list[int]:
    statuses: list[int] = []
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as client:
        while time.monotonic() < deadline and len(statuses) < 10000:
            async with client.post(f"http://127.0.0.1:{svc.proxy_port}/score", json={"data": [1]}) as resp:
                await resp.read()
                statuses.append(resp.status)
            await asyncio.sleep(0.01)
    return statuses


async def test_a_control_plane_401_gets_a_fresh_identity_token_instead_of_a_permanent_failure(
    emu: RunningEmulator, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    svc = await ep2_proxy(emu, make_proxy, tmp_path, "r401", refresh={"min_interval_seconds": 0.05})
    entra_before = emu.state.entra_token_calls[CLIENT]
    # The control plane's clock passes the ARM token's expiry while azure-identity's cache still trusts it.
    emu.state.set_clock_offset(3600)
    status, body = await admin(svc, "POST", "/refresh?route=r401")
    assert status == 200 and body["last_refresh"] == "success", body
    assert emu.state.entra_token_calls[CLIENT] == entra_before + 1
    assert (await score(svc))[0] == 200


def _mapped_packages(pid: int) -> set[str]:
    """site-packages whose compiled extensions the process has mapped: a package imported in any way is here."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split()[-1]
        if "/site-packages/" in path and path.endswith(".so"):
            found.add(path.split("/site-packages/", 1)[1].split("/", 1)[0])
    return found


async def test_a_running_proxy_loads_neither_aiohttp_nor_for_key_routes_cryptography(
    emu: RunningEmulator, tmp_path: Path, key_dir: Any
) -> None:
    """The memory budget (docs/performance.md): the proxy's own server and client serve both ports and the
    control-plane calls, azure-identity runs on requests, and pyjwt (which loads cryptography) only where a route
    reads token times. A dependency that sneaks aiohttp back in costs every pod about 10 MiB."""
    keys = key_dir(emu.state.services["keys4"].primary_key)
    key_only = await ProxyProcess.start({"routes": [route(emu, "k", emu.service_urls["keys4"], keys)]}, tmp_path)
    auth = ep2_auth(emu, tmp_path, refresh=FAST)
    token = await ProxyProcess.start(
        {"routes": [route(emu, "t", emu.service_urls["ep2"], auth)]}, tmp_path, name="token-proxy"
    )
    try:
        async with aiohttp.ClientSession() as client:
            for proc in (key_only, token):
                async with asyncio.timeout(30):
                    while True:
                        async with client.get(proc.admin_url + "/readyz") as r:
                            if r.status == 200:
                                break
                        await asyncio.sleep(0.05)
                async with client.post(proc.proxy_url + "/score", json={"data": [1]}) as r:
                    assert r.status == 200
        key_packages = _mapped_packages(key_only.process.pid)
        token_packages = _mapped_packages(token.process.pid)
        assert "uvloop" in key_packages and "httptools" in key_packages  # the check sees what is loaded
        assert "aiohttp" not in key_packages and "cryptography" not in key_packages, key_packages
        assert "aiohttp" not in token_packages, token_packages
        assert "cryptography" in token_packages  # azure-identity's own import; the check is not vacuous
    finally:
        assert await key_only.stop() == 0
        assert await token.stop() == 0
