"""The local AML emulator: scoring front end, control planes, faults, echo backend, secret dir, runner, azmlinfsrv.

Every server here is real and listens on 127.0.0.1 with a port chosen by the kernel.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from proxy.emulator.azmlinfsrv import start_azmlinfsrv
from proxy.emulator.echo import create_echo_app, expected_download_sha256
from proxy.emulator.main import main
from proxy.emulator.runner import RunningEmulator, start_emulator
from proxy.emulator.secretdir import write_secret_dir
from tests.support.emulated import API, PROVIDER, SUBSCRIPTION, V1_WS, V2_WS
from tests.support.emulator_checks import config_problems
from tests.support.procs import emulator_main, first_line, sigterm

REPO = Path(__file__).resolve().parent.parent
TOKEN = "dev-control-token"
V1_PRIMARY, V1_SECONDARY = "v1-primary-key-value", "v1-secondary-key-value"
V2_PRIMARY = "v2-primary-key-value"
CP = {"Authorization": f"Bearer {TOKEN}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "control_plane_tokens": [TOKEN],
        "services": [
            {
                "name": "demo",
                "api": "v1",
                "region": "eastus",
                "primary_key": V1_PRIMARY,
                "secondary_key": V1_SECONDARY,
                "deployments": {"blue": "echo"},
            },
            {
                "name": "ep",
                "api": "v2",
                "region": "westeurope",
                "primary_key": V2_PRIMARY,
                "deployments": {"blue": "echo"},
            },
        ],
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture
async def emu() -> AsyncIterator[RunningEmulator]:
    async with await start_emulator(config()) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def score(http: aiohttp.ClientSession, emu: RunningEmulator, key: str, service: str = "demo") -> int:
    async with http.post(emu.service_urls[service] + "/score", json={"data": [1]}, headers=bearer(key)) as resp:
        await resp.read()
        return resp.status


async def control_post(http: aiohttp.ClientSession, url: str, status: int, headers: dict[str, str] = CP) -> Any:
    """POST to a control plane `url` (with the control-plane token unless `headers` say otherwise): the answer has
    `status`; returns its JSON."""
    async with http.post(url, headers=headers) as resp:
        assert resp.status == status
        return await resp.json()


# -- scoring front end -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-the-key-at-all"},
        {"Authorization": f"Bearer {V1_PRIMARY}x"},
    ],
    ids=["missing", "not-bearer", "empty-bearer", "wrong", "prefix-of-right-key"],
)
async def test_scoring_answers_401_json_without_echoing_the_credential(
    emu: RunningEmulator, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    async with http.post(emu.service_urls["demo"] + "/score", json={"data": [1]}, headers=headers) as resp:
        assert resp.status == 401
        body = await resp.json()
        text = await resp.text()
    assert set(body) == {"message"}
    presented = headers.get("Authorization", "").partition(" ")[2]
    if presented:
        assert presented not in text


async def test_scoring_accepts_primary_and_secondary_keys(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    for key in (V1_PRIMARY, V1_SECONDARY):
        async with http.post(emu.service_urls["demo"] + "/score", json={"data": [1, 2.5]}, headers=bearer(key)) as r:
            assert r.status == 200
            assert await r.json() == {"result": [2, 5.0]}
            assert r.headers["azureml-model-deployment"] == "blue"
    assert await score(http, emu, V2_PRIMARY, service="ep") == 200


async def test_a_key_of_one_service_does_not_open_another(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    assert await score(http, emu, V2_PRIMARY, service="demo") == 401
    assert await score(http, emu, V1_PRIMARY, service="ep") == 401


async def test_scoring_unknown_service_and_v2_service_on_v1_path_are_404(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    for name in ("nope", "ep"):
        async with http.post(f"{emu.scoring_url}/api/v1/service/{name}/score", headers=bearer(V2_PRIMARY)) as r:
            assert r.status == 404
            assert "message" in await r.json()


async def test_forwarding_keeps_path_query_body_and_headers_but_not_auth_or_hop_by_hop(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    url = emu.service_urls["demo"] + "/echo/a%2Fb/c?x=1&y=%20z&x=2"
    headers = [
        ("Authorization", f"Bearer {V1_PRIMARY}"),
        ("X-Repeat", "one"),
        ("X-Repeat", "two"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "drop me"),
        ("Keep-Alive", "timeout=5"),
        ("Content-Type", "text/plain"),
    ]
    async with http.put(url, data=b"hello body", headers=headers) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert echoed["method"] == "PUT"
    assert echoed["path"] == "/echo/a%2Fb/c"
    assert echoed["query"] == "x=1&y=%20z&x=2"
    assert echoed["body_bytes"] == len(b"hello body")
    assert echoed["body_sha256"] == hashlib.sha256(b"hello body").hexdigest()
    names = [name.lower() for name, _ in echoed["headers"]]
    assert [v for n, v in echoed["headers"] if n.lower() == "x-repeat"] == ["one", "two"]
    for gone in ("authorization", "x-hop", "keep-alive"):
        assert gone not in names
    host = dict((n.lower(), v) for n, v in echoed["headers"])["host"]
    assert host == emu.echo_url.removeprefix("http://")  # type: ignore[union-attr]
    assert V1_PRIMARY not in json.dumps(echoed)


async def test_v2_endpoint_serves_every_path_on_its_own_host(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    async with http.get(emu.service_urls["ep"] + "/echo/deep/path?q=1", headers=bearer(V2_PRIMARY)) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert (echoed["path"], echoed["query"]) == ("/echo/deep/path", "q=1")
    async with http.get(emu.service_urls["ep"] + "/", headers=bearer(V2_PRIMARY)) as resp:
        assert await resp.text() == "Healthy"


async def test_deployment_header_picks_backend_and_unknown_deployment_is_404(
    aiohttp_server: Any, http: aiohttp.ClientSession
) -> None:
    green = await aiohttp_server(create_echo_app())
    cfg = config()
    cfg["services"][1]["deployments"] = {"blue": "echo", "green": str(green.make_url("/"))}
    cfg["services"][1]["default_deployment"] = "blue"
    async with await start_emulator(cfg) as running:
        url = running.service_urls["ep"] + "/echo"

        async def seen_host(extra: dict[str, str]) -> tuple[str, str]:
            async with http.get(url, headers={**bearer(V2_PRIMARY), **extra}) as resp:
                assert resp.status == 200
                hosts = [v for n, v in (await resp.json())["headers"] if n.lower() == "host"]
                return resp.headers["azureml-model-deployment"], hosts[0]

        assert await seen_host({}) == ("blue", running.echo_url.removeprefix("http://"))  # type: ignore[union-attr]
        green_host = f"127.0.0.1:{green.port}"
        assert await seen_host({"azureml-model-deployment": "green"}) == ("green", green_host)
        async with http.get(url, headers={**bearer(V2_PRIMARY), "azureml-model-deployment": "red"}) as resp:
            assert resp.status == 404
            assert "message" in await resp.json()


async def test_unreachable_backend_is_502_json(http: aiohttp.ClientSession) -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago and that nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    cfg = config()
    cfg["services"][0]["deployments"] = {"blue": f"http://127.0.0.1:{dead_port}"}
    async with await start_emulator(cfg) as running:
        async with http.post(running.service_urls["demo"] + "/score", headers=bearer(V1_PRIMARY)) as resp:
            assert resp.status == 502
            assert "message" in await resp.json()


@pytest.mark.parametrize("with_length", [False, True], ids=["chunked", "content-length"])
async def test_big_bodies_stream_both_ways_with_bounded_memory(
    emu: RunningEmulator, http: aiohttp.ClientSession, with_length: bool
) -> None:
    size = 96 * 1024 * 1024 + 123
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    query = f"bytes={size}" + ("&length=1" if with_length else "")
    digest = hashlib.sha256()
    received = 0
    async with http.get(f"{emu.service_urls['demo']}/download?{query}", headers=bearer(V1_PRIMARY)) as resp:
        assert resp.status == 200
        assert (resp.headers.get("Content-Length") == str(size)) is with_length
        async for chunk in resp.content.iter_chunked(1 << 20):
            digest.update(chunk)
            received += len(chunk)
    assert received == size
    assert digest.hexdigest() == expected_download_sha256(size)

    block = os.urandom(1 << 20)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(96):
            yield block

    upload_headers = {**bearer(V1_PRIMARY), "Content-Length": str(96 << 20)} if with_length else bearer(V1_PRIMARY)
    async with http.post(f"{emu.service_urls['demo']}/upload", data=body(), headers=upload_headers) as resp:
        assert resp.status == 200
        result = await resp.json()
    assert result == {"bytes": 96 << 20, "sha256": hashlib.sha256(block * 96).hexdigest()}
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 150  # far less than the ~400 MiB that buffering both bodies would take


# -- control planes ----------------------------------------------------------------------------------------------


async def test_v1_listkeys_returns_both_keys(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    async with http.post(emu.control_url + V1_WS + "/services/demo/listkeys", headers=CP) as resp:
        assert resp.status == 200
        assert await resp.json() == {"primaryKey": V1_PRIMARY, "secondaryKey": V1_SECONDARY}


async def test_v1_regenerate_keys_202_then_operation_succeeds_and_old_key_is_dead(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    body = {"keyType": "Primary", "keyValue": None}
    async with http.post(emu.control_url + V1_WS + "/services/demo/regenerateKeys", json=body, headers=CP) as r:
        assert r.status == 202
        location = r.headers["Operation-Location"]
    op_id = location.rsplit("/", 1)[1]
    assert location == f"{emu.control_url}{V1_WS}/operations/{op_id}"
    async with http.get(location, headers=CP) as resp:
        assert resp.status == 200
        op = await resp.json()
    assert op["id"] == op_id and op["state"] == "Succeeded"

    async with http.post(emu.control_url + V1_WS + "/services/demo/listkeys", headers=CP) as resp:
        keys = await resp.json()
    assert keys["primaryKey"] != V1_PRIMARY and keys["secondaryKey"] == V1_SECONDARY
    assert await score(http, emu, V1_PRIMARY) == 401
    assert await score(http, emu, keys["primaryKey"]) == 200
    assert await score(http, emu, V1_SECONDARY) == 200


async def test_v1_regenerate_sets_a_given_key_value(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    body = {"keyType": "Secondary", "keyValue": "chosen-secondary"}
    async with http.post(emu.control_url + V1_WS + "/services/demo/regenerateKeys", json=body, headers=CP) as r:
        assert r.status == 202
    assert await score(http, emu, "chosen-secondary") == 200
    assert await score(http, emu, V1_SECONDARY) == 401


@pytest.mark.parametrize(
    "body", [{"keyType": "Tertiary"}, {"keyValue": "x"}, {"keyType": "Primary", "keyValue": 5}, [1]]
)
async def test_v1_regenerate_rejects_bad_bodies_with_400_in_mms_shape(
    emu: RunningEmulator, http: aiohttp.ClientSession, body: Any
) -> None:
    async with http.post(emu.control_url + V1_WS + "/services/demo/regenerateKeys", json=body, headers=CP) as r:
        assert r.status == 400
        err = await r.json()
    assert set(err) == {"code", "statusCode", "message", "details"} and err["statusCode"] == 400
    assert await score(http, emu, V1_PRIMARY) == 200


@pytest.mark.parametrize("action", ["listKeys", "listkeys", "LISTKEYS"])
async def test_v2_listkeys_any_case(emu: RunningEmulator, http: aiohttp.ClientSession, action: str) -> None:
    async with http.post(f"{emu.control_url}{V2_WS}/onlineEndpoints/ep/{action}?{API}", headers=CP) as resp:
        assert resp.status == 200
        keys = await resp.json()
    assert keys["primaryKey"] == V2_PRIMARY and keys["secondaryKey"]


async def test_v2_regenerate_keys_202_location_polls_200(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    url = f"{emu.control_url}{V2_WS}/onlineEndpoints/ep/regenerateKeys?{API}"
    async with http.post(url, json={"keyType": "Primary"}, headers=CP) as resp:
        assert resp.status == 202
        assert resp.headers["Retry-After"] == "1"
        location = resp.headers["Location"]
    assert location.startswith(f"{emu.control_url}/subscriptions/{SUBSCRIPTION}/{PROVIDER}/locations/westeurope/")
    assert location.endswith(f"?{API}")
    async with http.get(location, headers=CP) as resp:
        assert resp.status == 200
    assert await score(http, emu, V2_PRIMARY, service="ep") == 401
    primary = emu.state.services["ep"].primary_key
    assert await score(http, emu, primary, service="ep") == 200


async def test_v2_without_api_version_is_400_in_arm_shape(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{emu.control_url}{V2_WS}/onlineEndpoints/ep/listKeys", headers=CP) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "MissingApiVersionParameter"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}])
async def test_control_planes_require_a_known_bearer_token(
    emu: RunningEmulator, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    v1 = await control_post(http, emu.control_url + V1_WS + "/services/demo/listkeys", 401, headers)
    assert set(v1) == {"code", "statusCode", "message", "details"} and v1["statusCode"] == 401
    v2 = await control_post(http, f"{emu.control_url}{V2_WS}/onlineEndpoints/ep/listKeys?{API}", 401, headers)
    assert set(v2) == {"error"} and set(v2["error"]) == {"code", "message"}


@pytest.mark.parametrize(
    ("plane", "path"),
    [
        ("v1", V1_WS + "/services/nope/listkeys"),
        ("v1", V1_WS + "/services/ep/listkeys"),  # a v2 endpoint is not a v1 service
        ("v1", V1_WS.replace("/ws", "/other") + "/services/demo/listkeys"),
        ("v2", V2_WS + "/onlineEndpoints/nope/listKeys"),
        ("v2", V2_WS + "/onlineEndpoints/demo/listKeys"),  # a v1 service is not an online endpoint
        ("v2", V2_WS.replace("/rg/", "/other-rg/") + "/onlineEndpoints/ep/listKeys"),
    ],
)
async def test_an_unknown_service_endpoint_or_workspace_is_404_in_its_planes_shape(
    emu: RunningEmulator, http: aiohttp.ClientSession, plane: str, path: str
) -> None:
    if plane == "v1":  # MMS's shape
        err = await control_post(http, emu.control_url + path, 404)
        assert err["statusCode"] == 404 and err["details"] == [] and err["code"]
    else:  # ARM's, to a call with its api-version
        err = await control_post(http, f"{emu.control_url}{path}?{API}", 404)
        assert err["error"]["code"] == "ResourceNotFound"


async def test_region_latency_delays_only_that_regions_control_calls(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    async with http.put(emu.control_url + "/_emulator/latency", json={"region": "eastus", "seconds": 0.4}) as r:
        assert r.status == 200
    started = time.monotonic()
    async with http.post(emu.control_url + V1_WS + "/services/demo/listkeys", headers=CP) as resp:
        assert resp.status == 200
    assert time.monotonic() - started >= 0.35
    started = time.monotonic()
    async with http.post(f"{emu.control_url}{V2_WS}/onlineEndpoints/ep/listKeys?{API}", headers=CP) as resp:
        assert resp.status == 200
    assert time.monotonic() - started < 0.35  # westeurope has no latency set
    emu.state.set_latency("eastus", 0)
    assert emu.state.latency == {}


async def test_admin_lists_services_without_keys(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    async with http.get(emu.control_url + "/_emulator/services") as resp:
        text = await resp.text()
    services = json.loads(text)["services"]
    assert {(s["name"], s["api"], s["region"]) for s in services} == {
        ("demo", "v1", "eastus"),
        ("ep", "v2", "westeurope"),
    }
    assert all(s["deployments"] for s in services)
    for secret in (V1_PRIMARY, V1_SECONDARY, V2_PRIMARY, emu.state.services["ep"].secondary_key):
        assert secret not in text


async def test_service_objects_show_scoring_uri_and_auth_in_each_plane(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    async with http.get(emu.control_url + V1_WS + "/services/demo", headers=CP) as resp:
        v1 = await resp.json()
    assert v1["scoringUri"] == emu.service_urls["demo"] + "/score" and v1["authEnabled"] is True
    async with http.get(f"{emu.control_url}{V2_WS}/onlineEndpoints/ep?{API}", headers=CP) as resp:
        v2 = await resp.json()
    assert v2["properties"]["scoringUri"] == emu.service_urls["ep"] + "/score"
    assert v2["properties"]["authMode"] == "Key"
    async with http.get(emu.control_url + V1_WS + "/services/ep", headers=CP) as resp:
        assert resp.status == 404


async def test_regeneration_during_a_burst_of_requests_never_rejects_the_untouched_key(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    url = emu.control_url + V1_WS + "/services/demo/regenerateKeys"

    async def regenerate_secondary() -> int:
        async with http.post(url, json={"keyType": "Secondary"}, headers=CP) as resp:
            return resp.status

    calls = [score(http, emu, V1_PRIMARY) for _ in range(40)] + [regenerate_secondary() for _ in range(10)]
    async with asyncio.timeout(15):
        statuses = await asyncio.gather(*calls)
    assert statuses[:40] == [200] * 40 and statuses[40:] == [202] * 10
    assert await score(http, emu, V1_SECONDARY) == 401


# -- faults ------------------------------------------------------------------------------------------------------


async def test_status_fault_via_admin_api_counts_down_and_is_removed(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    fault = {"target": "scoring", "service": "demo", "action": "status", "status": 503, "count": 2}
    async with http.post(emu.control_url + "/_emulator/faults", json=fault) as resp:
        assert resp.status == 201
        assert (await resp.json())["id"]
    assert await score(http, emu, V2_PRIMARY, service="ep") == 200  # other service: untouched
    assert [await score(http, emu, V1_PRIMARY) for _ in range(3)] == [503, 503, 200]
    async with http.get(emu.control_url + "/_emulator/faults") as resp:
        assert (await resp.json())["faults"] == []


async def test_status_fault_on_control_plane_uses_the_planes_error_shape(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    emu.state.add_fault(target="control", action="status", status=429)
    async with http.post(emu.control_url + V1_WS + "/services/demo/listkeys", headers=CP) as resp:
        assert resp.status == 429
        assert (await resp.json())["statusCode"] == 429
    async with http.post(f"{emu.control_url}{V2_WS}/onlineEndpoints/ep/listKeys?{API}", headers=CP) as resp:
        assert resp.status == 429
        assert "error" in await resp.json()
    async with http.delete(emu.control_url + "/_emulator/faults") as resp:
        assert (await resp.json())["cleared"] == 1
    async with http.post(emu.control_url + V1_WS + "/services/demo/listkeys", headers=CP) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("target", ["scoring", "control"])
async def test_reset_fault_drops_the_connection_without_a_response(
    emu: RunningEmulator, http: aiohttp.ClientSession, target: str
) -> None:
    emu.state.add_fault(target=target, action="reset", count=1)  # type: ignore[arg-type]
    if target == "scoring":
        url, headers = emu.service_urls["demo"] + "/score", bearer(V1_PRIMARY)
    else:
        url, headers = emu.control_url + V1_WS + "/services/demo/listkeys", CP
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.post(url, json={"data": [1]}, headers=headers) as resp:
            await resp.read()
    async with http.post(url, json={"data": [1]}, headers=headers) as resp:
        assert resp.status == 200


async def test_delay_fault_sleeps_then_answers_normally(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    emu.state.add_fault(target="scoring", action="delay", seconds=0.4, count=1)
    started = time.monotonic()
    assert await score(http, emu, V1_PRIMARY) == 200
    assert time.monotonic() - started >= 0.35


@pytest.mark.parametrize("target", ["scoring", "control"])
async def test_stall_after_headers_sends_headers_then_holds_the_body(
    emu: RunningEmulator, http: aiohttp.ClientSession, target: str
) -> None:
    emu.state.add_fault(target=target, action="stall_after_headers", seconds=0.6, count=1)  # type: ignore[arg-type]
    if target == "scoring":
        url, headers = emu.service_urls["demo"] + "/score", bearer(V1_PRIMARY)
    else:
        url, headers = emu.control_url + V1_WS + "/services/demo/listkeys", CP
    started = time.monotonic()
    async with http.post(url, json={"data": [1]}, headers=headers) as resp:
        headers_after = time.monotonic() - started
        assert resp.status == 200
        body = await resp.json()
        body_after = time.monotonic() - started
    assert headers_after < 0.5 and body_after >= 0.55
    assert body == (
        {"result": [2]} if target == "scoring" else {"primaryKey": V1_PRIMARY, "secondaryKey": V1_SECONDARY}
    )


async def test_trickle_sends_the_real_body_one_byte_at_a_time(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    emu.state.add_fault(target="scoring", service="demo", action="trickle", seconds=0.05, count=1)
    started = time.monotonic()
    pieces: list[bytes] = []
    async with http.get(emu.service_urls["demo"] + "/", headers=bearer(V1_PRIMARY)) as resp:
        assert resp.status == 200
        async with asyncio.timeout(10):
            async for piece in resp.content.iter_any():
                pieces.append(piece)
    assert b"".join(pieces) == b"Healthy"
    assert len(pieces) >= 3  # it really came in pieces
    assert time.monotonic() - started >= 6 * 0.05 * 0.9  # 7 bytes, 6 pauses


@pytest.mark.parametrize(
    "fault",
    [
        {"action": "status", "status": 503},
        {"target": "scoring", "action": "explode"},
        {"target": "dns", "action": "reset"},
        {"target": "scoring", "action": "status", "status": 99},
        {"target": "scoring", "action": "delay", "seconds": -1},
        {"target": "scoring", "action": "trickle", "seconds": 0},
        {"target": "scoring", "action": "reset", "count": 0},
        {"target": "scoring", "action": "reset", "colour": "red"},
    ],
)
async def test_admin_rejects_bad_faults_with_400(
    emu: RunningEmulator, http: aiohttp.ClientSession, fault: dict[str, Any]
) -> None:
    async with http.post(emu.control_url + "/_emulator/faults", json=fault) as resp:
        assert resp.status == 400
        assert (await resp.json())["message"]
    assert emu.state.faults == []


# -- echo backend ------------------------------------------------------------------------------------------------


async def test_echo_backend_endpoints(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_echo_app())
    resp = await client.get("/")
    assert (resp.status, await resp.text()) == (200, "Healthy")
    resp = await client.post("/score", json={"data": [1, 2, 3]})
    assert await resp.json() == {"result": [2, 4, 6]}
    for bad in (b"not json", b'{"data": "x"}', b'{"data": [true]}', b"[1]"):
        resp = await client.post("/score", data=bad)
        assert resp.status == 400 and "message" in await resp.json()
    resp = await client.post("/upload", data=b"abc")
    assert await resp.json() == {"bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}
    resp = await client.get("/download?bytes=70000")
    data = await resp.read()
    assert len(data) == 70000 and hashlib.sha256(data).hexdigest() == expected_download_sha256(70000)
    assert resp.headers.get("Transfer-Encoding") == "chunked"
    resp = await client.get("/download?bytes=10&length=1")
    assert resp.headers["Content-Length"] == "10" and len(await resp.read()) == 10
    assert (await client.get("/download?bytes=-1")).status == 400
    resp = await client.get("/status/418")
    assert (resp.status, await resp.json()) == (418, {"status": 418})
    assert (await client.get("/status/204")).status == 204
    assert (await client.get("/status/abc")).status == 400
    started = time.monotonic()
    resp = await client.get("/sleep?seconds=0.2")
    assert resp.status == 200 and time.monotonic() - started >= 0.18
    assert (await client.get("/sleep?seconds=nan")).status == 400
    resp = await client.request("PATCH", "/echo/x?a=%20b", data=b"xy", headers=[("X-Twice", "1"), ("X-Twice", "2")])
    echoed = await resp.json()
    assert echoed["method"] == "PATCH" and echoed["path"] == "/echo/x" and echoed["query"] == "a=%20b"
    assert ["X-Twice", "1"] in echoed["headers"] and ["X-Twice", "2"] in echoed["headers"]
    assert echoed["body_bytes"] == 2 and echoed["body_sha256"] == hashlib.sha256(b"xy").hexdigest()


def test_expected_download_sha256_matches_a_direct_hash() -> None:
    from proxy.emulator.echo import PATTERN_BLOCK

    n = 3 * len(PATTERN_BLOCK) + 17
    assert expected_download_sha256(n) == hashlib.sha256((PATTERN_BLOCK * 4)[:n]).hexdigest()
    assert expected_download_sha256(0) == hashlib.sha256(b"").hexdigest()


# -- secret dir --------------------------------------------------------------------------------------------------


def test_secret_dir_switches_atomically_like_kubelet(tmp_path: Path) -> None:
    target = tmp_path / "keys"
    write_secret_dir(target, {"primary": "one", "secondary": b"two", "old": "gone soon"})
    first = os.readlink(target / "..data")
    assert first.startswith("..") and (target / first).is_dir()
    assert (target / "primary").read_text() == "one"
    assert os.readlink(target / "primary") == "..data/primary"

    write_secret_dir(target, {"primary": "three", "secondary": "four"})
    assert (target / "..data").is_symlink()
    second = os.readlink(target / "..data")
    assert second != first and second.startswith("..")
    assert not (target / first).exists()
    assert (target / "primary").read_text() == "three"
    assert (target / "secondary").read_text() == "four"
    assert not (target / "old").exists() and not (target / "old").is_symlink()
    assert not (target / "..data_tmp").exists()
    assert sorted(p.name for p in target.iterdir()) == sorted(["..data", second, "primary", "secondary"])
    assert (target / second / "primary").stat().st_mode & 0o777 == 0o600


def test_secret_dir_rejects_path_like_keys(tmp_path: Path) -> None:
    for key in ("../x", "a/b", "..data", ""):
        with pytest.raises(ValueError):
            write_secret_dir(tmp_path / "k", {key: "v"})


# -- runner ------------------------------------------------------------------------------------------------------


def test_parse_config_names_every_bad_key() -> None:
    raw = {
        "services": [
            {"name": "a", "api": "v3", "deployments": {"x": "ftp://nowhere"}},
            {"name": "b", "deployments": {"x": "echo", "y": "echo"}},
            {"deployments": {}},
        ],
        "listen": {"scoring_port": 70000},
        "latency": {"eastus": "slow"},
        "colour": "red",
    }
    config_problems(
        raw,
        "services[0] (a).api",
        "services[0] (a).deployments.x",
        "services[1] (b).default_deployment",
        "services[2].name",
        "services[2].deployments",
        "listen.scoring_port",
        "latency.eastus",
        "colour: unknown key",
    )


def test_example_config_is_valid() -> None:
    from proxy.emulator.runner import load_config_file

    cfg = load_config_file(REPO / "proxy" / "emulator" / "emulator.example.yaml")
    assert [s.name for s in cfg.services] == ["demo", "endpoint"]


def test_runner_main_bad_config_exits_2_with_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "emulator.yaml"
    path.write_text("services:\n  - name: a\n    api: v9\n    deployments: {x: 'nope'}\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("services[0] (a)" in line for line in err)
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["--scoring-port", "not-a-number"]) == 2


async def test_keys_dir_mirrors_keys_at_start_and_after_regeneration(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    keys_dir = tmp_path / "keys"
    async with await start_emulator(config(keys_dir=str(keys_dir))) as running:
        assert (keys_dir / "demo" / "primary").read_text() == V1_PRIMARY
        assert (keys_dir / "demo" / "secondary").read_text() == V1_SECONDARY
        assert (keys_dir / "ep" / "primary").read_text() == V2_PRIMARY
        body = {"keyType": "Primary", "keyValue": None}
        url = running.control_url + V1_WS + "/services/demo/regenerateKeys"
        async with http.post(url, json=body, headers=CP) as resp:
            assert resp.status == 202
        new_primary = (keys_dir / "demo" / "primary").read_text()
        assert new_primary == running.state.services["demo"].primary_key != V1_PRIMARY
        assert (keys_dir / "demo" / "..data").is_symlink()


async def test_tls_serves_both_planes_over_https(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with await start_emulator(config(), ssl_context=server_ctx) as running:
        assert running.control_url.startswith("https://") and running.scoring_url.startswith("https://")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx)) as https:
            url = running.control_url + V1_WS + "/services/demo/regenerateKeys"
            async with https.post(url, json={"keyType": "Secondary"}, headers=CP) as resp:
                assert resp.headers["Operation-Location"].startswith(running.control_url + "/")
            async with https.post(
                running.service_urls["demo"] + "/score", json={"data": [4]}, headers=bearer(V1_PRIMARY)
            ) as resp:
                assert await resp.json() == {"result": [8]}
            async with https.get(running.service_urls["ep"] + "/", headers=bearer(V2_PRIMARY)) as resp:
                assert resp.status == 200


async def test_cli_prints_one_ready_line_without_keys_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    async with emulator_main("--keys-dir", str(keys_dir), cwd=tmp_path) as proc:
        first = await first_line(proc)
        ready = json.loads(first)
        assert ready["event"] == "emulator_ready" and ready["services"] == ["demo"]
        assert ready["scoring_url"].startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            url = ready["control_url"] + V1_WS + "/services/demo/listkeys"
            auth = {"Authorization": f"Bearer {ready['control_plane_token']}"}
            async with http.post(url, headers=auth) as resp:
                keys = await resp.json()
            async with http.post(ready["scoring_url"] + "/api/v1/service/demo/score", json={"data": [5]},
                                 headers=bearer(keys["primaryKey"])) as resp:  # fmt: skip
                assert await resp.json() == {"result": [10]}
        assert (keys_dir / "demo" / "primary").read_text() == keys["primaryKey"]
        rest, err = await sigterm(proc)
        assert proc.returncode == 0
    output = (first + rest + err).decode()
    assert rest.strip() == b""  # exactly one line on stdout
    for secret in keys.values():
        assert secret not in output


# -- the real AML scoring server ---------------------------------------------------------------------------------


async def test_real_azmlinfsrv_behind_the_front_end(http: aiohttp.ClientSession) -> None:
    server = await start_azmlinfsrv()  # AZMLINFSRV, as `make test` sets it
    try:
        cfg = config()
        cfg["services"][0]["deployments"] = {"blue": server.url}
        async with await start_emulator(cfg) as running:
            url = running.service_urls["demo"] + "/score"
            async with http.post(url, json={"data": [1, 2, 3]}, headers=bearer(V1_PRIMARY)) as resp:
                assert resp.status == 200
                assert await resp.json() == {"result": [2, 4, 6]}
                assert resp.headers["azureml-model-deployment"] == "blue"
                assert resp.headers["x-ms-server-version"].startswith("azmlinfsrv/")
            async with http.post(url, json={"data": [1]}, headers=bearer("wrong")) as resp:
                assert resp.status == 401
    finally:
        await server.stop()
    assert server.process.returncode is not None
