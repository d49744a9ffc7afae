"""AKS identity bindings: `auth.identity.azure_proxy` reaches azure-identity's enable_azure_proxy, end to end.

A stand-in for the AKS identity-binding token proxy (proxy/emulator/tokenproxy.py) listens over HTTPS on 127.0.0.1
with a certificate from a trustme CA issued for the SNI name only (not for 127.0.0.1), refuses any other SNI, and
forwards the token request to the emulator's Entra stand-in. The proxy's route gets its Entra token through it,
with the variables the workload identity webhook injects for identity bindings, and a scoring call succeeds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from proxy.config import checks
from proxy.config.reader import parse
from proxy.config.settings import ConfigError
from proxy.emulator.runner import RunningEmulator, start_emulator
from proxy.emulator.tls import make_local_tls
from proxy.emulator.tokenproxy import TokenProxyStandIn
from tests.support.emulated import emulated_service
from tests.support.servers import ProxyFactory, start_app

WORKLOAD = "22222222-2222-2222-2222-222222222222"
SNI = "identity-binding.aks.example"  # what AZURE_KUBERNETES_SNI_NAME names; no DNS behind it


@pytest.fixture
async def emu(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningEmulator]:
    config = {
        "entra": {"federated": {WORKLOAD: "system:serviceaccount:scoring:caller"}},
        "services": [emulated_service("aad1", "v2", "westeurope", auth_mode="aad_token")],
    }
    tls = make_local_tls(tmp_path_factory.mktemp("tls"))
    async with await start_emulator(config, ssl_context=tls.server_context(), ca_file=tls.ca_file) as emulator:
        yield emulator


@pytest.fixture
async def token_proxy(
    emu: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TokenProxyStandIn]:
    """The token proxy on 127.0.0.1, and the variables the webhook injects for an identity binding."""
    ca = trustme.CA()
    cert = ca.issue_cert(SNI)
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tp-cert.pem"))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(tmp_path / "tp-cert.pem"), append=True)
    cert.private_key_pem.write_to_path(str(tmp_path / "tp-key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "tp-ca.crt"))
    stand_in = TokenProxyStandIn(sni_name=SNI, entra_url=emu.entra_url, entra_ca_file=emu.ca_file)
    context = stand_in.server_context(tmp_path / "tp-cert.pem", tmp_path / "tp-key.pem")
    runner, url = await start_app(stand_in.app(), ssl_context=context)
    monkeypatch.setenv("AZURE_KUBERNETES_TOKEN_PROXY", url)
    monkeypatch.setenv("AZURE_KUBERNETES_SNI_NAME", SNI)
    monkeypatch.setenv("AZURE_KUBERNETES_CA_FILE", str(tmp_path / "tp-ca.crt"))
    monkeypatch.delenv("AZURE_KUBERNETES_CA_DATA", raising=False)
    yield stand_in
    await runner.cleanup()


def aad_route(emu: RunningEmulator, tmp_path: Path, *, azure_proxy: bool) -> dict[str, Any]:
    token_file = emu.write_service_account_token(WORKLOAD, tmp_path / "sa-token")
    return {
        "name": "aoai",
        "upstream": emu.service_urls["aad1"],
        "tls": {"ca_file": emu.ca_file},
        "auth": {
            "type": "aad",
            "ca_file": emu.ca_file,
            "identity": {
                "type": "workload",
                "client_id": WORKLOAD,
                "tenant_id": emu.tenant,
                "authority_host": emu.entra_url,
                "token_file": str(token_file),
                "azure_proxy": azure_proxy,
            },
            "refresh": {"backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.5, "timeout_seconds": 5},
        },
    }


async def score(svc: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"http://127.0.0.1:{svc.proxy_port}/score", json={"data": [1, 2, 3]}) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def test_azure_proxy_gets_the_token_through_the_identity_binding_proxy_with_its_sni(
    emu: RunningEmulator, token_proxy: TokenProxyStandIn, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    svc = await make_proxy(aad_route(emu, tmp_path, azure_proxy=True))
    assert await score(svc) == (200, {"result": [2, 4, 6]})
    # The one token request went through the token proxy (then to the Entra stand-in), on the SNI name only.
    assert token_proxy.token_calls == {WORKLOAD: 1}
    assert token_proxy.paths == [f"/{emu.tenant}/oauth2/v2.0/token"]
    assert set(token_proxy.sni_seen) == {SNI}
    assert emu.state.entra_token_calls[WORKLOAD] == 1


async def test_without_the_switch_the_token_goes_to_entra_directly(
    emu: RunningEmulator, token_proxy: TokenProxyStandIn, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The same environment (the webhook injects it either way), the switch off: the token proxy sees nothing."""
    svc = await make_proxy(aad_route(emu, tmp_path, azure_proxy=False))
    assert await score(svc) == (200, {"result": [2, 4, 6]})
    assert not token_proxy.token_calls and not token_proxy.sni_seen
    assert emu.state.entra_token_calls[WORKLOAD] == 1


async def test_a_token_proxy_that_does_not_answer_to_the_sni_name_is_not_trusted(
    emu: RunningEmulator, token_proxy: TokenProxyStandIn, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The SNI name is what the client verifies the certificate against: another name, no token, no forward."""
    token_proxy.sni_name = "elsewhere.example"
    svc = await make_proxy(aad_route(emu, tmp_path, azure_proxy=True))
    status, _ = await score(svc)
    assert status == 503
    assert not token_proxy.token_calls and SNI in token_proxy.sni_seen
    assert emu.state.entra_token_calls[WORKLOAD] == 0


# -- the config switch -------------------------------------------------------------------------------------------


def _doc(identity: dict[str, Any]) -> dict[str, Any]:
    return {"routes": [{"upstream": "https://x.openai.azure.com", "auth": {"type": "aad", "identity": identity}}]}


def test_the_switch_is_off_by_default_and_read_when_on() -> None:
    auth: Any = parse(_doc({"type": "workload"}), {}).routes[0].auth
    assert auth.identity.azure_proxy is False
    auth = parse(_doc({"type": "workload", "azure_proxy": True}), {}).routes[0].auth
    assert auth.identity.azure_proxy is True


def test_the_switch_is_set_by_the_route_environment_variable() -> None:
    doc = _doc({"type": "workload"})
    auth: Any = parse(doc, {"AML_AUTH_PROXY_ROUTE_AUTH_IDENTITY_AZURE_PROXY": "true"}).routes[0].auth
    assert auth.identity.azure_proxy is True


@pytest.mark.parametrize("kind", ["managed", "client_secret"])
def test_the_switch_is_for_workload_identity_only(kind: str) -> None:
    identity = {"type": kind, "azure_proxy": True, "client_id": "c", "tenant_id": "t", "client_secret_file": "/s"}
    with pytest.raises(ConfigError) as err:
        parse(_doc(identity), {})
    assert err.value.problems == [
        f"routes[0].auth.identity.azure_proxy: is used only with auth.identity.type 'workload' (not {kind!r})"
    ]


@pytest.mark.parametrize("installed", ["1.26.0", "1.19.0", None])
def test_an_azure_identity_without_enable_azure_proxy_is_a_config_error(
    installed: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checks, "installed_azure_identity", lambda: installed)
    with pytest.raises(ConfigError) as err:
        parse(_doc({"type": "workload", "azure_proxy": True}), {})
    (line,) = err.value.problems
    assert line.startswith("routes[0].auth.identity.azure_proxy: true needs azure-identity >= 1.27.0")
    assert f"installed: {installed or 'none'}" in line
    parse(_doc({"type": "workload"}), {})  # the switch off: any azure-identity will do


@pytest.mark.parametrize("installed", ["1.27.0", "1.27.1", "1.28.0b1", "2.0.0"])
def test_an_azure_identity_with_enable_azure_proxy_passes(installed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "installed_azure_identity", lambda: installed)
    parse(_doc({"type": "workload", "azure_proxy": True}), {})


def test_check_config_exits_2_naming_the_key_with_an_old_azure_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from proxy.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_doc({"type": "workload", "azure_proxy": True})))
    assert main(["check-config", "--config", str(path)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(checks, "installed_azure_identity", lambda: "1.25.1")
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "config error: routes[0].auth.identity.azure_proxy: true needs azure-identity >= 1.27.0" in err
    assert "installed: 1.25.1" in err


def test_the_installed_azure_identity_is_read_from_its_metadata() -> None:
    import azure.identity

    assert checks.installed_azure_identity() == azure.identity.__version__


@pytest.mark.parametrize("azure_proxy", [False, True])
def test_aiohttp_is_loaded_only_by_a_credential_built_with_the_switch(azure_proxy: bool, tmp_path: Path) -> None:
    """The proxy process never loads aiohttp (about 10 MiB) for its Entra calls, except where azure-identity's
    identity-binding transport needs it: a workload credential built with the switch on and the proxy variables."""
    import subprocess
    import sys

    token_file = tmp_path / "sa-token"
    token_file.write_text("x\n")
    program = f"""
import sys
from prometheus_client import CollectorRegistry
from proxy.config.settings import Identity
from proxy.credentials.identity import AzureIdentity
from proxy.metrics import Metrics
config = Identity(type="workload", client_id="c", tenant_id="t", authority_host=None, token_file={str(token_file)!r},
                  client_secret_file=None, client_secret_ref=None, azure_proxy={azure_proxy!r})
credential = AzureIdentity(config=config, ca_file=None, metrics=Metrics(CollectorRegistry()))._build()
print(type(credential._client._pipeline._transport).__name__, "aiohttp" in sys.modules)
"""
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "AZURE_KUBERNETES_TOKEN_PROXY": "https://127.0.0.1:9",
        "AZURE_KUBERNETES_SNI_NAME": SNI,
    }
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = "CustomAioHttpTransport True" if azure_proxy else "AsyncioRequestsTransport False"
    assert out.stdout.strip() == expected
