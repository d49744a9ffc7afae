"""The local dev loop of the README, as a user runs it: three commands, every route answered.

aml-auth-proxy emulator --config emulator.yaml --proxy-config dev/proxy.yaml
aml-auth-proxy run --config dev/proxy.yaml
curl http://127.0.0.1:8080/<service>/score
"""

from __future__ import annotations

import asyncio
import signal
import stat
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.config.reader import load
from tests.support.procs import ProxyProcess, start_emulator_process
from tests.support.session import remember

PASSWORD = "dev-loop-mls-password-0123456789"
# The route each emulated service gets, and its credential kind.
KINDS = {
    "keyed": "key",
    "endpoint": "key",
    "tokened": "aml-service-token",
    "endpoint-token": "aml-endpoint-token",
    "managed": "aad",
    "mlserver": "mlserver",
}


def emulator_config() -> dict[str, Any]:
    def service(name: str, api: str, auth_mode: str = "key") -> dict[str, Any]:
        return {"name": name, "api": api, "auth_mode": auth_mode, "deployments": {"blue": "echo"}}

    return {
        "mlserver": {"users": {"dev": PASSWORD}},
        "services": [
            service("keyed", "v1"),
            service("endpoint", "v2"),
            service("tokened", "v1", "aml_token"),
            service("endpoint-token", "v2", "aml_token"),
            service("managed", "v2", "aad_token"),
        ],
    }


async def run_dev_loop(tmp_path: Path, config: dict[str, Any] | None, kinds: dict[str, str]) -> dict[str, Any]:
    remember(PASSWORD)
    config_path = tmp_path / "dev" / "proxy.yaml"
    emulator, ready = await start_emulator_process(
        config, tmp_path, "--proxy-config", str(config_path), name="dev-loop-emulator"
    )
    try:
        assert ready["proxy_config"] == str(config_path)
        doc = yaml.safe_load(config_path.read_text())
        secrets_dir = tmp_path / "dev" / "proxy-secrets"
        assert ready["keys_dir"] == str(secrets_dir)
        client_secret = (secrets_dir / "_entra" / "client-secret").read_text().strip()
        remember(client_secret)
        # Every secret the config points at is private to the user; the config itself names files only.
        for secret in (secrets_dir / "_entra" / "client-secret", secrets_dir / next(iter(kinds)) / "primary"):
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        text = config_path.read_text()
        assert client_secret not in text and PASSWORD not in text
        assert [(r["name"], r["auth"]["type"]) for r in doc["routes"]] == list(kinds.items())
        assert load(str(config_path), {}).routes  # valid as written, with no environment
        assert (doc["listen"], doc["admin"]) == (
            {"host": "127.0.0.1", "port": 8080},
            {"host": "127.0.0.1", "port": 9090},
        )

        # Port 0 instead of 8080/9090 only so that tests never collide; everything else is the file as written.
        proxy = await ProxyProcess.start_file(
            config_path,
            name="dev-loop-proxy",
            env={"AML_AUTH_PROXY_LISTEN_PORT": "0", "AML_AUTH_PROXY_ADMIN_PORT": "0", "AML_AUTH_PROXY_WORKERS": "1"},
        )
        try:
            answers = {}
            async with aiohttp.ClientSession() as client:
                for name in kinds:
                    async with client.post(f"{proxy.proxy_url}/{name}/score", json={"data": [1, 2, 3]}) as resp:
                        answers[name] = (resp.status, await resp.json())
                async with client.get(proxy.admin_url + "/readyz") as resp:
                    readyz = await resp.json()
            assert answers == {name: (200, {"result": [2, 4, 6]}) for name in kinds}
            assert {name: r["kind"] for name, r in readyz["routes"].items()} == kinds
        finally:
            assert await proxy.stop() == 0
        return doc
    finally:
        emulator.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await emulator.wait() == 0


async def test_the_three_line_dev_loop_with_the_default_emulator(tmp_path: Path) -> None:
    doc = await run_dev_loop(tmp_path, None, {"demo": "key"})
    (route,) = doc["routes"]
    assert route["match"] == "/demo" and route["strip_prefix"] is True
    assert route["upstream"].startswith("https://127.0.0.1:") and route["upstream"].endswith("/api/v1/service/demo")
    assert route["tls"]["ca_file"]  # --proxy-config implies --tls: the proxy verifies it against the emulator's CA
    assert route["auth"]["primary_file"] == str(tmp_path / "dev" / "proxy-secrets" / "demo" / "primary")


async def test_the_dev_loop_reaches_every_kind_of_emulated_service(tmp_path: Path) -> None:
    doc = await run_dev_loop(tmp_path, emulator_config(), KINDS)
    for route in doc["routes"]:
        assert route["upstream"].startswith("https://127.0.0.1:"), route["name"]
        assert route["tls"]["ca_file"], route["name"]
    assert doc["routes"][2]["auth"]["identity"]["client_id"] == "aml-auth-proxy-dev"
