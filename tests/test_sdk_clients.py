"""Microsoft's own client SDKs as independent readers of the emulator's wire formats.

azureml-core (v1) and azure-ai-ml (v2) run in their own venvs (`make install` builds them in .tools/; `make test`
passes their interpreters as AZUREML_CORE_PYTHON and AZURE_AI_ML_PYTHON). Each test starts the emulator in this
process on 127.0.0.1 over TLS with its own CA, runs one script from tests/sdk/ with the SDK's interpreter (JSON in
on stdin, one JSON line out) and asserts on what the SDK read. Where an SDK and the emulator disagree, the
emulator is wrong. A missing SDK is a failure, never a skip.

The SDK processes get a minimal environment: HOME in tmp_path (azureml-core caches discovery answers there), TZ
UTC, the emulator's CA, and HTTP(S)_PROXY pointing at a trap on 127.0.0.1 with NO_PROXY for loopback: a call that
would leave the machine (telemetry, instance discovery, ARM, ...) reaches the trap instead, which answers nothing
and records the request line, and the test fails on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from proxy.emulator.runner import DEFAULT_SUBSCRIPTION, RunningEmulator, start_emulator
from proxy.emulator.state import Service
from tests.support.servers import ProxyFactory
from tests.support.session import remember

ROOT = Path(__file__).resolve().parent.parent
SDK_DIR = ROOT / "tests" / "sdk"
SDK_TIMEOUT = 240.0  # seconds for one SDK script: imports take seconds, regen_key polls after 5 s

APP = "5dk-c11e-0000-4000-8000-000000000001"
APP_SECRET = "sdk-client-secret-value"
WORKSPACE_ID = "11111111-2222-4333-8444-555555555555"
DATA = [1, 2, 3]
RESULT = {"result": [2, 4, 6]}  # the echo backend's /score doubles
ARM_SCOPE = "https://management.azure.com/.default"
ARM_RESOURCE_V1 = "https://management.core.windows.net/"  # what azureml-core asks its auth object for
# The SDK versions these checks were written against; the Makefile pins the same ones (AZUREML_CORE_VERSION,
# AZURE_AI_ML_VERSION). After a bump, rerun these tests against the new SDK before changing the numbers here.
AZUREML_CORE_VERSION = "1.61.0.post4"
AZURE_AI_ML_VERSION = "1.35.2"


def sdk_python(variable: str, venv: str) -> str:
    value = os.environ.get(variable)
    if not value:
        pytest.fail(
            f"{variable} is not set: run `make test` (it installs the SDK into .tools/{venv} and sets {variable}), "
            f"or set {variable} to that venv's python",
            pytrace=False,
        )
    if not Path(value).is_file():
        pytest.fail(f"{variable}={value} does not exist: run `make install` to build .tools/{venv}", pytrace=False)
    return value


class OutboundTrap:
    """An HTTP proxy on 127.0.0.1 that forwards nothing: it records each request line (`CONNECT host:443 ...`)
    and closes the connection, so the SDK's call fails at once and the test knows where it wanted to go."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> OutboundTrap:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            self.seen.append(line.decode(errors="replace").strip())
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def trap() -> AsyncIterator[OutboundTrap]:
    started = await OutboundTrap().start()
    try:
        yield started
    finally:
        await started.close()


def sdk_env(emu: RunningEmulator, trap: OutboundTrap, tmp_path: Path, **extra: str) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    assert emu.ca_file is not None
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "TZ": "UTC",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "REQUESTS_CA_BUNDLE": emu.ca_file,
        "SSL_CERT_FILE": emu.ca_file,
        "HTTP_PROXY": trap.url,
        "HTTPS_PROXY": trap.url,
        "http_proxy": trap.url,
        "https_proxy": trap.url,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        **extra,
    }


async def run_sdk(
    python: str, script: str, params: dict[str, Any], *, env: dict[str, str], trap: OutboundTrap, tmp_path: Path
) -> dict[str, Any]:
    """Run tests/sdk/<script> with an SDK venv's python while this event loop keeps serving the emulator."""
    process = await asyncio.create_subprocess_exec(
        python,
        str(SDK_DIR / script),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(json.dumps(params).encode()), SDK_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"{script} did not finish within {SDK_TIMEOUT:.0f} s", pytrace=False)
    stderr = err.decode(errors="replace")
    (tmp_path / f"{script}.stderr.log").write_text(stderr)
    lines = out.decode(errors="replace").strip().splitlines()
    if not lines:
        tail = "\n".join(stderr.strip().splitlines()[-25:])
        pytest.fail(f"{script} exited {process.returncode} without an answer; stderr ends:\n{tail}", pytrace=False)
    answer: dict[str, Any] = json.loads(lines[-1])
    failed = answer.get("failed")
    if failed:
        pytest.fail(
            f"{script}: the SDK failed at step {failed['step']!r} with {failed['type']}: {failed['message']}\n"
            f"(steps that passed: {sorted(set(answer) - {'failed'})}; calls that tried to leave the machine: "
            f"{trap.seen})",
            pytrace=False,
        )
    return answer


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def check_aml_token(emu: RunningEmulator, name: str, token: str, *, refresh_after: int, expiry: int) -> None:
    """`token` is one the emulator issued for `name`, and the times the SDK read are the ones issued with it."""
    service = emu.state.services[name]
    emu.state.check_scoring_token(service, token)  # raises TokenRejected otherwise
    exp = claims(token)["exp"]
    assert expiry == exp, "the expiry the SDK read is not the token's exp"
    assert refresh_after == exp - service.token_lifetime_seconds + service.refresh_after_seconds
    assert abs(exp - (time.time() + service.token_lifetime_seconds)) < 120


def keys_of(service: Service) -> list[str]:
    return [service.primary_key, service.secondary_key]


def service_config(name: str, api: str, auth_mode: str = "key", region: str = "eastus") -> dict[str, Any]:
    return {"name": name, "api": api, "auth_mode": auth_mode, "region": region, "deployments": {"blue": "echo"}}


@pytest.fixture
async def emu(tmp_path: Path) -> AsyncIterator[RunningEmulator]:
    config = {
        "tls": True,
        "entra": {"clients": {APP: APP_SECRET}},
        "keys_dir": str(tmp_path / "keys"),
        "services": [
            service_config("v1-key", "v1"),
            service_config("v1-token", "v1", "aml_token", region="westeurope"),
            # Two deployments, all traffic on blue: azure-ai-ml's get() lists the deployments and shows green at 0.
            {
                **service_config("v2-key", "v2"),
                "deployments": {"blue": "echo", "green": "echo"},
                "default_deployment": "blue",
            },
            service_config("v2-token", "v2", "aml_token", region="westeurope"),
        ],
    }
    remember(APP_SECRET)
    async with await start_emulator(config) as running:
        for service in running.state.services.values():
            remember(service.primary_key, service.secondary_key)
        yield running


async def test_azureml_core_reads_the_v1_control_plane_and_scores_through_the_proxy(
    emu: RunningEmulator, make_proxy: ProxyFactory, trap: OutboundTrap, tmp_path: Path
) -> None:
    python = sdk_python("AZUREML_CORE_PYTHON", "azureml-core-venv")
    keys = tmp_path / "keys" / "v1-key"
    proxy = await make_proxy(
        {
            "name": "v1-key",
            "region": "eastus",
            "upstream": emu.service_urls["v1-key"],
            "tls": {"ca_file": emu.ca_file},
            "auth": {
                "type": "key",
                "primary_file": str(keys / "primary"),
                "secondary_file": str(keys / "secondary"),
                "reload_seconds": 0.2,
            },
        }
    )
    arm_token = emu.entra_token(ARM_RESOURCE_V1)
    remember(arm_token)
    before = keys_of(emu.state.services["v1-key"])
    params = {
        "discovery_url": f"{emu.control_url}/discovery",
        "subscription": DEFAULT_SUBSCRIPTION,
        "resource_group": "rg",
        "workspace": "ws",
        "workspace_id": WORKSPACE_ID,
        "location": "eastus",
        "arm_token": arm_token,
        "key_service": "v1-key",
        "token_service": "v1-token",
        "missing_service": "no-such-service",
        "proxy_url": f"http://127.0.0.1:{proxy.proxy_port}",
        "data": DATA,
    }
    env = sdk_env(emu, trap, tmp_path)
    got = await run_sdk(python, "azureml_core_client.py", params, env=env, trap=trap, tmp_path=tmp_path)
    assert trap.seen == [], "azureml-core tried to leave the machine"

    assert got["sdk_version"] == AZUREML_CORE_VERSION
    assert got["mms_url"] == emu.control_url  # found through the emulator's workspace discovery document
    assert got["audiences"] == [ARM_RESOURCE_V1]
    scoring_uri = emu.service_urls["v1-key"] + "/score"
    for step in ("get_webservice", "get_aks_webservice"):
        seen = got[step]
        assert seen["class"] == "AksWebservice"
        assert (seen["name"], seen["compute_type"], seen["state"]) == ("v1-key", "AKS", "Healthy")
        assert (seen["auth_enabled"], seen["token_auth_enabled"]) == (True, False)
        assert seen["scoring_uri"] == scoring_uri
        assert seen["swagger_uri"] == emu.service_urls["v1-key"] + "/swagger.json"
        assert seen["created_time"].endswith("+00:00")
    aks = got["get_aks_webservice"]
    assert aks["compute_name"] and aks["namespace"] and aks["num_replicas"] >= 1
    assert aks["cpu"] > 0 and aks["memory_in_gb"] > 0 and aks["scoring_timeout_ms"] > 0

    after = keys_of(emu.state.services["v1-key"])
    assert got["keys_before"] == before
    assert got["keys_after"] == after
    assert after[0] != before[0] and after[1] == before[1]  # regen_key("Primary") changed the primary only
    remember(*after)

    assert got["run_direct"] == RESULT
    assert "Response Code: 401" in got["run_direct_stale"]["message"]  # the revoked key, sent straight
    assert got["run_proxy_stale"] == RESULT  # the same revoked key, sent through the proxy: it put its own

    tokened = got["get_token_service"]
    assert (tokened["auth_enabled"], tokened["token_auth_enabled"]) == (False, True)
    assert tokened["scoring_uri"] == emu.service_urls["v1-token"] + "/score"
    token = got["get_access_token"]
    remember(got["get_token"]["access_token"], token["access_token"])
    # AksServiceAccessToken inherits WebServiceAccessToken.deserialize, which builds the base class.
    assert (token["class"], token["token_type"]) == ("WebServiceAccessToken", "Bearer")
    check_aml_token(
        emu, "v1-token", token["access_token"], refresh_after=token["refresh_after"], expiry=token["expiry_on"]
    )
    first = got["get_token"]
    exp = claims(first["access_token"])["exp"]
    check_aml_token(emu, "v1-token", first["access_token"], refresh_after=first["refresh_after"], expiry=exp)
    assert got["run_token_direct"] == RESULT
    assert emu.state.token_calls["v1-token"] >= 3  # get_token, get_access_token, run

    assert "WebserviceNotFound" in got["get_missing"]["message"]


async def test_azure_ai_ml_reads_the_v2_control_plane(emu: RunningEmulator, trap: OutboundTrap, tmp_path: Path) -> None:
    python = sdk_python("AZURE_AI_ML_PYTHON", "azure-ai-ml-venv")
    before = keys_of(emu.state.services["v2-key"])
    params = {
        "tenant": emu.tenant,
        "client_id": APP,
        "client_secret": APP_SECRET,
        "authority": emu.entra_url,
        "subscription": DEFAULT_SUBSCRIPTION,
        "resource_group": "rg",
        "workspace": "ws",
        "key_endpoint": "v2-key",
        "token_endpoint": "v2-token",
        "work_dir": str(tmp_path),
        "data": DATA,
    }
    env = sdk_env(emu, trap, tmp_path, AZUREML_DEV_URL_MFE=emu.control_url)
    got = await run_sdk(python, "azure_ai_ml_client.py", params, env=env, trap=trap, tmp_path=tmp_path)
    assert trap.seen == [], "azure-ai-ml tried to leave the machine"

    assert got["sdk_version"] == AZURE_AI_ML_VERSION
    assert got["base_url"] == emu.control_url
    assert got["scopes"] == [ARM_SCOPE]
    assert emu.state.entra_token_calls[APP] >= 1  # azure-identity's own token request, to the Entra stand-in

    provider = "providers/Microsoft.MachineLearningServices"
    workspace_id = f"/subscriptions/{DEFAULT_SUBSCRIPTION}/resourceGroups/rg/{provider}/workspaces/ws"
    for step, name, mode, region, traffic in (
        ("get_key_endpoint", "v2-key", "key", "eastus", {"blue": 100, "green": 0}),
        ("get_token_endpoint", "v2-token", "aml_token", "westeurope", {"blue": 100}),
    ):
        seen = got[step]
        assert seen["class"] == "ManagedOnlineEndpoint"
        assert (seen["name"], seen["auth_mode"], seen["location"]) == (name, mode, region)
        assert seen["id"] == f"{workspace_id}/onlineEndpoints/{name}"
        assert seen["scoring_uri"] == emu.service_urls[name] + "/score"
        assert seen["traffic"] == traffic
        assert seen["provisioning_state"] == "Succeeded"

    keys = got["keys"]
    assert keys["class"] == "EndpointAuthKeys"
    assert [keys["primary_key"], keys["secondary_key"]] == before
    assert got["regenerate_secondary"] == {"status": "Succeeded", "done": True}
    after = got["keys_after_regenerate"]
    assert [after["primary_key"], after["secondary_key"]] == keys_of(emu.state.services["v2-key"])
    assert got["invoke_key_endpoint"] == RESULT

    token = got["token"]
    remember(token["access_token"])
    assert (token["class"], token["token_type"]) == ("EndpointAuthToken", "Bearer")
    assert isinstance(token["expiry_time_utc"], int) and isinstance(token["refresh_after_time_utc"], int)
    check_aml_token(
        emu,
        "v2-token",
        token["access_token"],
        refresh_after=token["refresh_after_time_utc"],
        expiry=token["expiry_time_utc"],
    )
    assert got["invoke_token_endpoint"] == RESULT
