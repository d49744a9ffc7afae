"""End to end, as deployed: the console script in a subprocess, the emulator's scoring front end, the real
azmlinfsrv scoring server, key rotation through the control plane, SIGTERM, and 1 GiB each way."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.emulator.azmlinfsrv import AzmlinfsrvProcess, start_azmlinfsrv
from proxy.emulator.echo import create_echo_app, expected_download_sha256
from proxy.emulator.runner import RunningEmulator, start_emulator
from proxy.emulator.secretdir import write_secret_dir
from tests.support.emulated import API, V1_WS, V2_WS
from tests.support.procs import ProxyProcess
from tests.support.servers import start_app
from tests.support.session import SESSION_SECRETS, remember


def remember_emulator_keys(emu: RunningEmulator) -> None:
    for service in emu.state.services.values():
        remember(service.primary_key, service.secondary_key)


async def keyed_proxy(
    tmp_path: Path, upstream: str, key: str, route: dict[str, Any] | None = None, **top: Any
) -> ProxyProcess:
    """The proxy in a process with one route to `upstream` (more of the route in `route`, more of the config in
    `top`), sending `key` from a kubelet-style key file."""
    keys = tmp_path / "k"
    write_secret_dir(keys, {"primary": key})
    remember(key)
    auth = {"primary_file": str(keys / "primary")}
    return await ProxyProcess.start(
        {**top, "routes": [{"upstream": upstream, **(route or {}), "auth": auth}]}, tmp_path
    )


@pytest.fixture
async def azmlinfsrv() -> AsyncIterator[AzmlinfsrvProcess]:
    process = await start_azmlinfsrv()
    yield process
    await process.stop()


async def test_scoring_through_the_proxy_reaches_the_real_azmlinfsrv(
    azmlinfsrv: AzmlinfsrvProcess, tmp_path: Path
) -> None:
    config = {"services": [{"name": "demo", "api": "v1", "region": "eastus", "deployments": {"blue": azmlinfsrv.url}}]}
    async with await start_emulator(config) as emu:
        remember_emulator_keys(emu)
        service = emu.state.services["demo"]
        keys = tmp_path / "keys"
        write_secret_dir(keys, {"primary": service.primary_key + "\n", "secondary": service.secondary_key + "\n"})
        proxy = await ProxyProcess.start(
            {
                "routes": [
                    {
                        "name": "demo",
                        "region": "eastus",
                        "upstream": emu.service_urls["demo"],
                        "auth": {"primary_file": str(keys / "primary"), "secondary_file": str(keys / "secondary")},
                    }
                ]
            },
            tmp_path,
        )
        try:
            async with aiohttp.ClientSession() as client:
                async with client.post(
                    proxy.proxy_url + "/score", json={"data": [1, 2, 3]}, headers={"x-ms-client-request-id": "e2e-1"}
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    assert await resp.json() == {"result": [2, 4, 6]}
                    assert resp.headers["x-ms-server-version"].startswith("azmlinfsrv/")
                    assert resp.headers["azureml-model-deployment"] == "blue"
                    assert resp.headers["x-ms-client-request-id"] == "e2e-1"
                # Without the proxy the front end refuses the caller: the credential really comes from the proxy.
                async with client.post(emu.service_urls["demo"] + "/score", json={"data": [1]}) as resp:
                    assert resp.status == 401
                async with client.get(proxy.admin_url + "/readyz") as resp:
                    assert resp.status == 200
        finally:
            assert await proxy.stop() == 0


async def _regenerate(
    client: aiohttp.ClientSession, emu: RunningEmulator, *, api: str, name: str, key_type: str
) -> None:
    """Regenerate one key through the real control-plane protocol and wait for the operation to finish."""
    auth = {"Authorization": f"Bearer {emu.control_plane_token}"}
    if api == "v1":
        async with client.post(
            f"{emu.control_url}{V1_WS}/services/{name}/regenerateKeys",
            json={"keyType": key_type, "keyValue": None},
            headers=auth,
        ) as resp:
            assert resp.status == 202
            location = resp.headers["Operation-Location"]
        for _ in range(50):
            async with client.get(location, headers=auth) as resp:
                if (await resp.json())["state"] == "Succeeded":
                    return
            await asyncio.sleep(0.1)
    else:
        url = f"{emu.control_url}{V2_WS}/onlineEndpoints/{name}/regenerateKeys?{API}"
        async with client.post(url, json={"keyType": key_type}, headers=auth) as resp:
            assert resp.status in (200, 202)
            location = resp.headers.get("Location")
        if location is None:
            return
        for _ in range(50):
            async with client.get(location, headers=auth) as resp:
                if resp.status == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError("regeneration did not finish")


async def _list_keys(client: aiohttp.ClientSession, emu: RunningEmulator, *, api: str, name: str) -> dict[str, str]:
    auth = {"Authorization": f"Bearer {emu.control_plane_token}"}
    if api == "v1":
        url = f"{emu.control_url}{V1_WS}/services/{name}/listkeys"
    else:
        url = f"{emu.control_url}{V2_WS}/onlineEndpoints/{name}/listKeys?{API}"
    async with client.post(url, headers=auth) as resp:
        assert resp.status == 200
        keys: dict[str, str] = await resp.json()
    remember(keys["primaryKey"], keys["secondaryKey"])
    return keys


async def test_key_rotation_under_load_fails_no_request(tmp_path: Path) -> None:
    config = {
        "services": [
            {"name": "svc1", "api": "v1", "region": "eastus", "deployments": {"blue": "echo"}},
            {"name": "ep2", "api": "v2", "region": "westeurope", "deployments": {"blue": "echo"}},
        ]
    }
    async with await start_emulator(config) as emu, aiohttp.ClientSession() as admin:
        remember_emulator_keys(emu)
        dirs = {}
        routes = []
        for name, api in (("svc1", "v1"), ("ep2", "v2")):
            keys = await _list_keys(admin, emu, api=api, name=name)
            dirs[name] = tmp_path / name
            write_secret_dir(
                dirs[name], {"primary": keys["primaryKey"] + "\n", "secondary": keys["secondaryKey"] + "\n"}
            )
            routes.append(
                {
                    "name": name,
                    "match": f"/{name}",
                    "strip_prefix": True,
                    "upstream": emu.service_urls[name],
                    "auth": {
                        "primary_file": str(dirs[name] / "primary"),
                        "secondary_file": str(dirs[name] / "secondary"),
                        "reload_seconds": 0.1,
                    },
                }
            )
        proxy = await ProxyProcess.start({"routes": routes, "log_level": "debug"}, tmp_path)
        results: list[int] = []
        stop = asyncio.Event()

        async def load(worker: int) -> None:
            target = "svc1" if worker % 2 else "ep2"
            async with aiohttp.ClientSession() as client:
                deadline = time.monotonic() + 60  # bounded in time and in count
                while not stop.is_set() and time.monotonic() < deadline and len(results) < 20000:
                    async with client.post(f"{proxy.proxy_url}/{target}/score", json={"data": [1, 2]}) as resp:
                        await resp.read()
                        results.append(resp.status)

        workers = [asyncio.create_task(load(i)) for i in range(8)]
        try:
            await asyncio.sleep(0.5)
            for _cycle in range(2):
                for name, api in (("svc1", "v1"), ("ep2", "v2")):
                    for key_type in ("Secondary", "Primary"):
                        before = await proxy.metric(
                            "aml_auth_proxy_credential_reloads_total", outcome="success", route=name
                        )
                        await _regenerate(admin, emu, api=api, name=name, key_type=key_type)
                        await asyncio.sleep(0.3)  # requests meet the regenerated key before the files change
                        keys = await _list_keys(admin, emu, api=api, name=name)
                        # kubelet's part: the Secret volume is updated with an atomic symlink swap
                        write_secret_dir(
                            dirs[name], {"primary": keys["primaryKey"] + "\n", "secondary": keys["secondaryKey"] + "\n"}
                        )
                        async with asyncio.timeout(10):
                            while (
                                await proxy.metric(
                                    "aml_auth_proxy_credential_reloads_total", outcome="success", route=name
                                )
                                <= before
                            ):
                                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*workers)
        failovers = sum([await proxy.metric("aml_auth_proxy_key_failovers_total", route=n) for n in dirs])
        assert await proxy.stop() == 0
    failed = [s for s in results if s != 200]
    print(
        f"\nrotation: {len(results)} requests during 8 key regenerations, "
        f"{len(failed)} failed, {failovers:.0f} failovers"
    )
    assert len(results) > 200 and failed == []
    assert failovers >= 4  # the primary regenerations really hit requests in flight
    log_text = proxy.log_path.read_text()
    assert "key_loaded" in log_text and not any(secret in log_text for secret in SESSION_SECRETS)
    assert any(e.get("event") == "key_failover" for e in proxy.events())


async def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    runner, upstream = await start_app(create_echo_app())
    proxy = await keyed_proxy(tmp_path, upstream, "sigterm-test-key-0001", shutdown_grace_seconds=15)
    try:
        async with aiohttp.ClientSession() as client:

            async def slow() -> int:
                async with client.get(proxy.proxy_url + "/sleep?seconds=2") as resp:
                    await resp.read()
                    return resp.status

            calls = [asyncio.create_task(slow()) for _ in range(50)]
            async with asyncio.timeout(10):
                while await proxy.metric("aml_auth_proxy_requests_in_flight", route="default") < 50:
                    await asyncio.sleep(0.05)
            started = time.monotonic()
            proxy.process.terminate()
            await asyncio.sleep(0.3)
            async with client.get(proxy.admin_url + "/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["shutting_down"] is True
            with pytest.raises(aiohttp.ClientConnectorError):
                async with aiohttp.ClientSession() as fresh, fresh.get(proxy.proxy_url + "/"):
                    pass
            statuses = await asyncio.gather(*calls)
        assert statuses == [200] * 50
        assert await proxy.wait() == 0
        assert time.monotonic() - started < 10
        events = [e["event"] for e in proxy.events() if "event" in e]
        assert events.index("shutting_down") < events.index("stopped")
    finally:
        await runner.cleanup()


async def test_requests_beyond_the_grace_period_are_cut_and_the_process_still_exits_0(tmp_path: Path) -> None:
    runner, upstream = await start_app(create_echo_app())
    proxy = await keyed_proxy(tmp_path, upstream, "grace-test-key-0001", shutdown_grace_seconds=1)
    try:
        async with aiohttp.ClientSession() as client:
            call = asyncio.create_task(client.get(proxy.proxy_url + "/sleep?seconds=6"))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            assert await proxy.stop() == 0
            assert time.monotonic() - started < 8
            with pytest.raises(aiohttp.ClientError):
                resp = await call
                await resp.read()
    finally:
        await runner.cleanup()


async def test_one_gib_each_way_streams_with_bounded_memory(tmp_path: Path) -> None:
    gib = 1 << 30
    runner, upstream = await start_app(create_echo_app())
    proxy = await keyed_proxy(
        tmp_path, upstream, "stream-test-key-0001", route={"timeouts": {"read": 120}}, access_log=True
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as client:
            async with client.post(proxy.proxy_url + "/upload", data=b"warm-up") as resp:  # warm the pools
                assert resp.status == 200
            baseline = proxy.status_kib("VmHWM")
            block = bytes(range(256)) * 4096  # 1 MiB

            async def upload() -> AsyncIterator[bytes]:
                for _ in range(gib // len(block)):
                    yield block

            t0 = time.monotonic()
            async with client.post(proxy.proxy_url + "/upload", data=upload()) as resp:
                assert resp.status == 200
                got = await resp.json()
            up_s = time.monotonic() - t0
            expected = hashlib.sha256()
            for _ in range(gib // len(block)):
                expected.update(block)
            assert got == {"bytes": gib, "sha256": expected.hexdigest()}

            t0 = time.monotonic()
            digest = hashlib.sha256()
            size = 0
            async with client.get(proxy.proxy_url + f"/download?bytes={gib}") as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            down_s = time.monotonic() - t0
            assert size == gib and digest.hexdigest() == expected_download_sha256(gib)
        growth_mib = (proxy.status_kib("VmHWM") - baseline) / 1024
        print(
            f"\nstreaming 1 GiB: upload {up_s:.1f} s, download {down_s:.1f} s, "
            f"proxy peak RSS {baseline / 1024:.1f} MiB -> +{growth_mib:.1f} MiB"
        )
        assert growth_mib < 64
    finally:
        assert await proxy.stop() == 0
        await runner.cleanup()


async def test_truncated_upload_is_never_passed_upstream_as_complete(tmp_path: Path) -> None:
    received: list[Any] = []
    from aiohttp import web

    async def sink(request: web.Request) -> web.Response:
        try:
            body = await request.read()
            received.append(len(body))
        except Exception as exc:  # the proxy must make the upstream see a broken body
            received.append(type(exc).__name__)
        return web.Response()

    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/{t:.*}", sink)
    runner, upstream = await start_app(app)
    proxy = await keyed_proxy(tmp_path, upstream, "truncation-test-key-01")
    try:
        for declared in (100, 5_000_000):  # under and over the retry buffer
            _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(
                f"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: {declared}\r\n\r\n".encode() + b"a" * (declared // 2)
            )
            await writer.drain()
            await asyncio.sleep(0.3)
            writer.close()
        for sent in (300_000, 1_500_000):  # a chunked body cut short, under and over the retry buffer
            _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n200000\r\n" + b"b" * sent)
            await writer.drain()
            await asyncio.sleep(0.3)
            writer.close()
        await asyncio.sleep(0.5)
        # Bodies under the buffer never left the proxy; the two streamed ones reached the upstream broken.
        assert len(received) == 2 and not any(isinstance(r, int) for r in received), received
    finally:
        assert await proxy.stop() == 0
        await runner.cleanup()
