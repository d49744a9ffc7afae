"""Token auth in the emulator: Entra ID and IMDS (checked with the real azure-identity credentials), the AML token
operations, token-checked scoring, ML Server login, the emulator's clock, token faults and call counters.

Every server is real and listens on 127.0.0.1. Time is an injected clock that starts at the real time (so
azure-identity, which uses the real clock, stays happy) and that tests move forward instead of sleeping.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity.aio import ClientSecretCredential, ManagedIdentityCredential, WorkloadIdentityCredential
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.emulator.dates import http_date
from proxy.emulator.runner import RunningEmulator, start_emulator
from proxy.emulator.state import SERVICE_ACCOUNT_ISSUER
from proxy.emulator.tls import make_local_tls
from proxy.emulator.tokens import token_digest
from tests.support.emulated import API, V1_WS, V2_WS, emulated_service
from tests.support.emulator_checks import config_problems
from tests.support.procs import emulator_main, first_line, sigterm
from tests.support.session import remember

STATIC = "dev-control-token"
APP, SECRET = "app-secret-client", "entra-client-secret-value-1"
WI_APP, WI_SUBJECT = "wi-client", "system:serviceaccount:ml:scorer"
WI_OTHER = "wi-other-client"
MI_DEFAULT, MI_OTHER = "mi-default-client", "mi-other-client"
ML_USER, ML_PASSWORD = "admin", "mlserver-password-value-1"
ARM = "https://management.azure.com"
ML = "https://ml.azure.com"
remember(SECRET, ML_PASSWORD)


class FakeClock:
    """The emulator's time source: starts at the real time, moves only when a test says so."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "control_plane_tokens": [STATIC],
        "entra": {
            "clients": {APP: SECRET},
            "federated": {WI_APP: WI_SUBJECT, WI_OTHER: "system:serviceaccount:other:sa"},
            "managed_identities": [MI_DEFAULT, MI_OTHER],
        },
        "mlserver": {"users": {ML_USER: ML_PASSWORD}, "access_token_lifetime_seconds": 600, "backend": "echo"},
        "services": [
            emulated_service(
                "tok1",
                "v1",
                "eastus",
                auth_mode="aml_token",
                token_lifetime_seconds=3600,
                token_refresh_after_seconds=1800,
            ),
            emulated_service("tok2", "v2", "westeurope", auth_mode="aml_token", token_lifetime_seconds=600),
            emulated_service("aad", "v2", "westeurope", auth_mode="aad_token", deployments={"b": "echo"}),
            emulated_service("keyed", "v1", "eastus"),
            emulated_service("keyed2", "v2", "westeurope"),
        ],
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def emu(clock: FakeClock) -> AsyncIterator[RunningEmulator]:
    async with await start_emulator(config(), clock=clock) as running:
        yield running


@pytest.fixture
async def http(emu: RunningEmulator) -> AsyncIterator[aiohttp.ClientSession]:
    trust = ssl.create_default_context(cafile=emu.ca_file)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=trust), timeout=aiohttp.ClientTimeout(total=20)
    ) as session:
        yield session


@pytest.fixture
def no_azure_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the developer's environment may steer azure-identity."""
    for name in (
        "AZURE_CLIENT_ID",
        "AZURE_CLIENT_SECRET",
        "AZURE_TENANT_ID",
        "AZURE_AUTHORITY_HOST",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_POD_IDENTITY_AUTHORITY_HOST",
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "IMDS_ENDPOINT",
        "MSI_ENDPOINT",
        "MSI_SECRET",
        "AZURE_TOKEN_CREDENTIALS",
    ):
        monkeypatch.delenv(name, raising=False)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def claims_of(token: str) -> dict[str, Any]:
    """Claims without checking the signature (the emulator's checks are tested through its endpoints)."""
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def token_url(emu: RunningEmulator, tenant: str | None = None) -> str:
    return f"{emu.entra_url}/{tenant or emu.tenant}/oauth2/v2.0/token"


def v1_token_url(emu: RunningEmulator, name: str) -> str:
    return f"{emu.control_url}{V1_WS}/services/{name}/token"


def v2_token_url(emu: RunningEmulator, name: str) -> str:
    return f"{emu.control_url}{V2_WS}/onlineEndpoints/{name}/token?{API}"


async def post(http: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.post(url, **kw) as resp:
        text = await resp.text()
    try:
        body: Any = json.loads(text) if text else None
    except ValueError:
        body = text
    return resp.status, body, resp


async def aml_token(http: aiohttp.ClientSession, emu: RunningEmulator, name: str, api: str = "v1") -> dict[str, Any]:
    url = v1_token_url(emu, name) if api == "v1" else v2_token_url(emu, name)
    status, body, _ = await post(http, url, headers=bearer(STATIC))
    assert status == 200, body
    remember(body["accessToken"])
    return dict(body)


async def score(http: aiohttp.ClientSession, emu: RunningEmulator, name: str, token: str) -> tuple[int, str]:
    async with http.post(emu.service_urls[name] + "/score", json={"data": [1]}, headers=bearer(token)) as resp:
        return resp.status, await resp.text()


# -- Entra ID, through the real azure-identity credentials -------------------------------------------------------


async def test_client_secret_credential_gets_an_arm_token_with_entra_claims(
    emu: RunningEmulator, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with ClientSecretCredential(
        emu.tenant, APP, SECRET, authority=emu.entra_url, connection_verify=emu.ca_file
    ) as cred:
        token = await cred.get_token("https://management.core.windows.net//.default")
    remember(token.token)
    claims = claims_of(token.token)
    assert claims["aud"] == "https://management.core.windows.net/"
    assert claims["iss"] == f"{emu.entra_url}/{emu.tenant}/v2.0"
    assert (claims["tid"], claims["appid"], claims["azp"], claims["idtyp"]) == (emu.tenant, APP, APP, "app")
    assert claims["oid"] and claims["iat"] == claims["nbf"] == int(clock.now)
    assert claims["exp"] - claims["iat"] == 3599
    assert emu.state.entra_token_calls == {APP: 1}
    # The token opens the control plane like a static one does.
    status, body, _ = await post(http, v1_token_url(emu, "tok1"), headers=bearer(token.token))
    assert status == 200 and body["accessToken"]


def workload_credential(emu: RunningEmulator, token_file: Path) -> WorkloadIdentityCredential:
    """azure-identity's WorkloadIdentityCredential for WI_APP with the service-account token in `token_file`,
    against the emulator's Entra ID."""
    return WorkloadIdentityCredential(
        tenant_id=emu.tenant,
        client_id=WI_APP,
        token_file_path=str(token_file),
        authority=emu.entra_url,
        connection_verify=emu.ca_file,
    )


@pytest.mark.parametrize(
    ("scope", "audience"),
    [
        ("https://management.azure.com/.default", "https://management.azure.com"),
        ("https://ml.azure.com/.default", "https://ml.azure.com"),
    ],
)
async def test_workload_identity_credential_sends_the_kubelet_token_file(
    emu: RunningEmulator, tmp_path: Path, scope: str, audience: str
) -> None:
    path = emu.write_service_account_token(WI_APP, tmp_path / "token")
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 1  # like kubelet; azure-identity sends it verbatim
    sa_claims = claims_of(text.strip())
    assert sa_claims["sub"] == WI_SUBJECT and sa_claims["aud"] == ["api://AzureADTokenExchange"]
    assert sa_claims["iss"] == SERVICE_ACCOUNT_ISSUER and sa_claims["exp"] - sa_claims["iat"] == 3600
    async with workload_credential(emu, path) as cred:
        token = await cred.get_token(scope)
    remember(token.token)
    assert claims_of(token.token)["aud"] == audience
    assert claims_of(token.token)["appid"] == WI_APP


@pytest.mark.usefixtures("no_azure_env")
@pytest.mark.parametrize("client_id", [None, MI_OTHER], ids=["default-identity", "chosen-identity"])
async def test_managed_identity_credential_uses_imds(
    emu: RunningEmulator, monkeypatch: pytest.MonkeyPatch, client_id: str | None
) -> None:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", emu.imds_url)
    async with ManagedIdentityCredential(client_id=client_id) as cred:
        token = await cred.get_token("https://management.azure.com/.default")
    remember(token.token)
    claims = claims_of(token.token)
    expected = client_id or MI_DEFAULT
    assert claims["aud"] == ARM and claims["appid"] == expected
    assert emu.state.entra_token_calls == {expected: 1}
    assert abs(token.expires_on - (time.time() + 3599)) < 60


async def test_wrong_client_secret_fails_in_azure_identity_and_in_entras_shape(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    wrong = "not-the-client-secret-value"
    async with ClientSecretCredential(
        emu.tenant, APP, wrong, authority=emu.entra_url, connection_verify=emu.ca_file
    ) as cred:
        with pytest.raises(ClientAuthenticationError) as info:
            await cred.get_token(f"{ARM}/.default")
    assert "AADSTS7000215" in str(info.value) and wrong not in str(info.value)
    form = {"grant_type": "client_credentials", "client_id": APP, "client_secret": wrong, "scope": f"{ARM}/.default"}
    status, body, resp = await post(http, token_url(emu), data=form, headers={"client-request-id": "abc-123"})
    assert status == 401
    assert body["error"] == "invalid_client" and body["error_codes"] == [7000215]
    assert body["error_description"].startswith("AADSTS7000215: ")
    assert body["correlation_id"] == "abc-123" and body["trace_id"] and body["timestamp"].endswith("Z")
    assert wrong not in json.dumps(body) and resp.headers["Cache-Control"].startswith("no-store")


def _foreign_assertion(now: float) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = {
        "iss": SERVICE_ACCOUNT_ISSUER,
        "sub": WI_SUBJECT,
        "aud": "api://AzureADTokenExchange",
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + 600,
    }
    return jwt.encode(claims, key, algorithm="RS256")


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("foreign-key", 401, 70021),
        ("other-subject", 401, 70021),
        ("expired", 401, 700024),
        ("garbage", 400, 50027),
        ("wrong-assertion-type", 400, 700010),
        ("secret-and-assertion", 401, 7000218),
    ],
)
async def test_bad_client_assertions_are_refused(
    emu: RunningEmulator, http: aiohttp.ClientSession, clock: FakeClock, case: str, status: int, code: int
) -> None:
    form = {
        "grant_type": "client_credentials",
        "client_id": WI_APP,
        "scope": f"{ARM}/.default",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": emu.service_account_token(WI_APP) + "\n",
    }
    if case == "foreign-key":
        form["client_assertion"] = _foreign_assertion(clock.now)
    elif case == "other-subject":
        form["client_assertion"] = emu.service_account_token(WI_OTHER)
    elif case == "expired":
        clock.advance(3600)
    elif case == "garbage":
        form["client_assertion"] = "not a jwt"
    elif case == "wrong-assertion-type":
        form["client_assertion_type"] = "urn:example:other"
    elif case == "secret-and-assertion":
        form["client_secret"] = "some-secret"
    got, body, _ = await post(http, token_url(emu), data=form)
    assert (got, body["error_codes"]) == (status, [code]), body
    assert form["client_assertion"].strip() not in json.dumps(body)


async def test_workload_identity_credential_with_an_expired_token_file_fails(
    emu: RunningEmulator, clock: FakeClock, tmp_path: Path
) -> None:
    path = emu.write_service_account_token(WI_APP, tmp_path / "token")
    clock.advance(3601)
    async with workload_credential(emu, path) as cred:
        with pytest.raises(ClientAuthenticationError, match="AADSTS700024"):
            await cred.get_token(f"{ARM}/.default")


@pytest.mark.parametrize(
    ("change", "status", "error", "code"),
    [
        ({"tenant": "11111111-1111-1111-1111-111111111111"}, 400, "invalid_request", 90002),
        ({"grant_type": None}, 400, "invalid_request", 900144),
        ({"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
        ({"client_id": None}, 400, "invalid_request", 900144),
        ({"scope": None}, 400, "invalid_request", 900144),
        ({"scope": ARM}, 400, "invalid_scope", 1002012),
        ({"client_id": "nobody"}, 400, "unauthorized_client", 700016),
        ({"client_id": MI_DEFAULT}, 400, "unauthorized_client", 700016),  # a managed identity is not an app
        ({"client_secret": None}, 401, "invalid_client", 7000218),
    ],
)
async def test_token_endpoint_request_errors(
    emu: RunningEmulator, http: aiohttp.ClientSession, change: dict[str, Any], status: int, error: str, code: int
) -> None:
    form: dict[str, Any] = {
        "grant_type": "client_credentials",
        "client_id": APP,
        "client_secret": SECRET,
        "scope": f"{ARM}/.default",
    }
    tenant = change.pop("tenant", None)
    form.update(change)
    form = {k: v for k, v in form.items() if v is not None}
    got, body, _ = await post(http, token_url(emu, tenant), data=form)
    assert (got, body["error"], body["error_codes"]) == (status, error, [code])
    assert SECRET not in json.dumps(body)


async def test_discovery_documents_and_jwks_verify_issued_tokens(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{emu.entra_url}/{emu.tenant}/v2.0/.well-known/openid-configuration") as resp:
        assert resp.status == 200
        oidc = await resp.json()
    assert oidc["token_endpoint"] == token_url(emu)
    assert oidc["issuer"] == f"{emu.entra_url}/{emu.tenant}/v2.0"
    async with http.get(oidc["jwks_uri"]) as resp:
        jwks = await resp.json()
    token = emu.entra_token(ML)
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid]
    claims = jwt.decode(token, key.key, algorithms=["RS256"], audience=ML, issuer=oidc["issuer"])
    assert claims["aud"] == ML
    async with http.get(f"{emu.entra_url}/elsewhere/v2.0/.well-known/openid-configuration") as resp:
        assert resp.status == 400 and (await resp.json())["error_codes"] == [90002]


async def test_imds_wants_the_metadata_header_and_a_known_identity(
    emu: RunningEmulator, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    url = f"{emu.imds_url}/metadata/identity/oauth2/token"
    query = {"api-version": "2018-02-01", "resource": ML}
    async with http.get(url, params=query) as resp:
        assert resp.status == 400 and "metadata" in (await resp.json())["error_description"].lower()
    async with http.get(url, params={**query, "client_id": "nobody"}, headers={"Metadata": "true"}) as resp:
        assert resp.status == 400 and (await resp.json())["error_description"] == "Identity not found"
    async with http.get(url, params={"api-version": "2018-02-01"}, headers={"Metadata": "true"}) as resp:
        assert resp.status == 400
    async with http.get(url, params=query, headers={"Metadata": "true"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    remember(body["access_token"])
    assert body["token_type"] == "Bearer" and body["resource"] == ML
    assert body["expires_in"] == "3599" and body["expires_on"] == str(int(clock.now) + 3599)
    assert claims_of(body["access_token"])["appid"] == MI_DEFAULT


# -- AML token operations ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "audience",
    [
        "https://management.azure.com",
        "https://management.azure.com/",
        "https://management.core.windows.net",
        "https://management.core.windows.net/",
    ],
)
async def test_v1_token_with_an_entra_arm_token(
    emu: RunningEmulator, http: aiohttp.ClientSession, clock: FakeClock, audience: str
) -> None:
    status, body, _ = await post(http, v1_token_url(emu, "tok1"), headers=bearer(emu.entra_token(audience)))
    assert status == 200
    assert set(body) == {"accessToken", "tokenType", "refreshAfter", "expiryOn"} and body["tokenType"] == "Bearer"
    now = int(clock.now)
    assert (body["refreshAfter"], body["expiryOn"]) == (now + 1800, now + 3600)
    remember(body["accessToken"])
    claims = claims_of(body["accessToken"])
    assert claims["aud"] == "aml:v1:tok1" and claims["jti"]
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (now, now, now + 3600)
    assert jwt.get_unverified_header(body["accessToken"])["alg"] == "RS256"
    assert emu.state.token_calls == {"tok1": 1}


async def test_v2_token_with_an_entra_arm_token(
    emu: RunningEmulator, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    status, body, _ = await post(http, v2_token_url(emu, "tok2"), headers=bearer(emu.entra_token(ARM + "/")))
    assert status == 200
    assert set(body) == {"accessToken", "expiryTimeUtc", "refreshAfterTimeUtc", "tokenType"}
    now = int(clock.now)
    assert (body["refreshAfterTimeUtc"], body["expiryTimeUtc"]) == (now + 300, now + 600)  # default: half
    remember(body["accessToken"])
    assert claims_of(body["accessToken"])["aud"] == "aml:v2:tok2"


async def test_v2_token_needs_api_version(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    url = f"{emu.control_url}{V2_WS}/onlineEndpoints/tok2/token"
    status, body, _ = await post(http, url, headers=bearer(STATIC))
    assert status == 400 and body["error"]["code"] == "MissingApiVersionParameter"


async def test_control_planes_refuse_unfit_entra_tokens(
    emu: RunningEmulator, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    ml_token = emu.entra_token(ML)
    status, body, _ = await post(http, v1_token_url(emu, "tok1"), headers=bearer(ml_token))
    assert status == 401 and body["code"] == "InvalidAuthenticationTokenAudience"
    status, body, _ = await post(http, v2_token_url(emu, "tok2"), headers=bearer(ml_token))
    assert status == 401 and body["error"]["code"] == "InvalidAuthenticationTokenAudience"
    assert ml_token not in json.dumps(body)

    foreign = jwt.encode(
        {"aud": ARM, "tid": emu.tenant, "iat": int(clock.now), "nbf": int(clock.now), "exp": int(clock.now) + 60},
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        algorithm="RS256",
    )
    status, body, _ = await post(http, v1_token_url(emu, "tok1"), headers=bearer(foreign))
    assert status == 401 and body["code"] == "InvalidAuthenticationToken"

    arm = emu.entra_token(ARM)
    clock.advance(3599)
    status, body, _ = await post(http, f"{emu.control_url}{V1_WS}/services/keyed/listkeys", headers=bearer(arm))
    assert status == 401 and body["code"] == "ExpiredAuthenticationToken"
    assert emu.state.token_calls == {}  # refused calls never reach the operation


async def test_listkeys_and_regenerate_accept_an_entra_arm_token(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    arm = bearer(emu.entra_token("https://management.core.windows.net/"))
    status, keys, _ = await post(http, f"{emu.control_url}{V1_WS}/services/keyed/listkeys", headers=arm)
    assert status == 200 and keys["primaryKey"]
    remember(keys["primaryKey"], keys["secondaryKey"])
    url = f"{emu.control_url}{V2_WS}/onlineEndpoints/keyed2/regenerateKeys?{API}"
    status, _, _ = await post(http, url, json={"keyType": "Primary"}, headers=arm)
    assert status == 202


async def test_token_operation_of_a_key_service_is_400_in_each_planes_shape(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    status, body, _ = await post(http, v1_token_url(emu, "keyed"), headers=bearer(STATIC))
    assert status == 400 and set(body) == {"code", "statusCode", "message", "details"} and body["statusCode"] == 400
    for name in ("keyed2", "aad"):
        status, body, _ = await post(http, v2_token_url(emu, name), headers=bearer(STATIC))
        assert status == 400 and set(body) == {"error"} and body["error"]["code"]


async def test_service_objects_show_token_auth(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{emu.control_url}{V1_WS}/services/tok1", headers=bearer(STATIC)) as resp:
        v1 = await resp.json()
    assert (v1["authEnabled"], v1["aadAuthEnabled"]) == (False, True)
    for name, mode in (("tok2", "AMLToken"), ("aad", "AADToken")):
        async with http.get(f"{emu.control_url}{V2_WS}/onlineEndpoints/{name}?{API}", headers=bearer(STATIC)) as r:
            assert (await r.json())["properties"]["authMode"] == mode


# -- scoring with tokens -----------------------------------------------------------------------------------------


async def test_aml_token_opens_its_own_service_until_it_expires(
    emu: RunningEmulator, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    tok1 = (await aml_token(http, emu, "tok1"))["accessToken"]
    tok2 = (await aml_token(http, emu, "tok2", api="v2"))["accessToken"]
    assert await score(http, emu, "tok1", tok1) == (200, '{"result": [2]}')
    assert await score(http, emu, "tok2", tok2) == (200, '{"result": [2]}')
    status, text = await score(http, emu, "tok1", tok2)  # another service's token
    assert status == 401 and "invalid" in json.loads(text)["message"] and tok2 not in text
    status, text = await score(http, emu, "tok1", emu.entra_token(ML))  # an Entra token is not an AML token
    assert status == 401

    clock.advance(3599)
    assert (await score(http, emu, "tok1", tok1))[0] == 200  # one second left
    clock.advance(1)
    status, text = await score(http, emu, "tok1", tok1)
    assert status == 401 and "expired" in json.loads(text)["message"] and tok1 not in text


async def test_aml_token_service_refuses_keys_and_missing_credentials(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    key = emu.state.services["tok1"].primary_key
    assert (await score(http, emu, "tok1", key))[0] == 401
    async with http.post(emu.service_urls["tok1"] + "/score", json={"data": [1]}) as resp:
        assert resp.status == 401 and "missing" in (await resp.json())["message"]


async def test_expired_aml_token_with_a_short_real_lifetime_via_the_admin_clock(
    http: aiohttp.ClientSession,
) -> None:
    cfg = config()
    cfg["services"][0]["token_lifetime_seconds"] = 2
    cfg["services"][0]["token_refresh_after_seconds"] = 1
    async with await start_emulator(cfg) as running:  # the real clock
        body = await aml_token(http, running, "tok1")
        assert body["expiryOn"] - body["refreshAfter"] == 1
        assert (await score(http, running, "tok1", body["accessToken"]))[0] == 200
        async with http.put(running.control_url + "/_emulator/clock", json={"offset_seconds": 3}) as resp:
            assert resp.status == 200 and (await resp.json())["offset_seconds"] == 3
        assert (await score(http, running, "tok1", body["accessToken"]))[0] == 401


async def test_aad_token_service_takes_only_unexpired_ml_audience_entra_tokens(
    emu: RunningEmulator, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    ml_token = emu.entra_token(ML)
    assert (await score(http, emu, "aad", ml_token))[0] == 200
    assert (await score(http, emu, "aad", emu.entra_token(ML + "/")))[0] == 200
    assert (await score(http, emu, "aad", emu.entra_token(ARM)))[0] == 401
    assert (await score(http, emu, "aad", emu.state.services["aad"].primary_key))[0] == 401
    clock.advance(3599)
    status, text = await score(http, emu, "aad", ml_token)
    assert status == 401 and "expired" in text


# -- ML Server ---------------------------------------------------------------------------------------------------


async def login(http: aiohttp.ClientSession, emu: RunningEmulator) -> dict[str, Any]:
    status, body, _ = await post(http, f"{emu.mlserver_url}/login", json={"username": ML_USER, "password": ML_PASSWORD})
    assert status == 200, body
    remember(body["access_token"], body["refresh_token"])
    return dict(body)


async def ml_score(http: aiohttp.ClientSession, emu: RunningEmulator, access: str) -> int:
    async with http.post(f"{emu.mlserver_url}/score", json={"data": [3]}, headers=bearer(access)) as resp:
        await resp.read()
        return resp.status


async def test_mlserver_login_refresh_rotation_and_scoring(
    emu: RunningEmulator, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    first = await login(http, emu)
    assert set(first) == {"token_type", "access_token", "expires_in", "expires_on", "refresh_token"}
    assert (first["token_type"], first["expires_in"], first["expires_on"]) == ("Bearer", 600, int(clock.now) + 600)
    async with http.post(
        f"{emu.mlserver_url}/echo/api/demo/1.0", data=b"x", headers=bearer(first["access_token"])
    ) as resp:
        echoed = await resp.json()
    assert echoed["path"] == "/echo/api/demo/1.0"
    assert "authorization" not in [name.lower() for name, _ in echoed["headers"]]

    url = f"{emu.mlserver_url}/login/refreshToken"
    status, second, _ = await post(http, url, json={"refreshToken": first["refresh_token"]})
    assert status == 200
    remember(second["access_token"], second["refresh_token"])
    assert second["refresh_token"] != first["refresh_token"] and second["access_token"] != first["access_token"]
    assert await ml_score(http, emu, second["access_token"]) == 200
    assert await ml_score(http, emu, first["access_token"]) == 401  # the old pair died with the rotation
    status, body, _ = await post(http, url, json={"refreshToken": first["refresh_token"]})
    assert status == 401
    assert body == {
        "message": "Unauthorized (invalid or expired refresh token)",
        "link": "",
        "exceptionType": "UnauthorizedAccessException",
    }
    clock.advance(600)
    assert await ml_score(http, emu, second["access_token"]) == 401  # expired by the emulator's clock
    assert emu.state.mlserver_calls == {"login": 1, "refresh": 2, "forward": 4}


async def test_mlserver_revoke_then_login_again(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    pair = await login(http, emu)
    async with http.delete(
        f"{emu.mlserver_url}/login/refreshToken", params={"refreshToken": pair["refresh_token"]}
    ) as r:
        assert r.status == 200
    assert emu.state.mlserver_revoked == [token_digest(pair["refresh_token"])]
    assert await ml_score(http, emu, pair["access_token"]) == 401
    status, _, _ = await post(
        http, f"{emu.mlserver_url}/login/refreshToken", json={"refreshToken": pair["refresh_token"]}
    )
    assert status == 401
    again = await login(http, emu)
    assert await ml_score(http, emu, again["access_token"]) == 200

    assert emu.state.mlserver_revoke_all() == 1  # an administrator ends every session
    assert await ml_score(http, emu, again["access_token"]) == 401
    third = await login(http, emu)
    async with http.post(emu.control_url + "/_emulator/mlserver/revoke-all") as resp:
        assert (await resp.json()) == {"revoked": 1}
    assert await ml_score(http, emu, third["access_token"]) == 401


@pytest.mark.parametrize(
    "body",
    [{"username": ML_USER, "password": "wrong-password"}, {"username": "nobody", "password": ML_PASSWORD}],
    ids=["wrong-password", "unknown-user"],
)
async def test_mlserver_bad_credentials_are_401(
    emu: RunningEmulator, http: aiohttp.ClientSession, body: dict[str, str]
) -> None:
    status, answer, _ = await post(http, f"{emu.mlserver_url}/login", json=body)
    assert status == 401 and "invalid credentials" in answer["message"]
    assert answer["exceptionType"] == "UnauthorizedAccessException" and answer["link"] == ""
    assert await ml_score(http, emu, "made-up-token") == 401


# -- the emulator's clock ----------------------------------------------------------------------------------------


async def test_clock_offset_moves_issued_times_and_date_headers(
    emu: RunningEmulator, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with http.put(emu.control_url + "/_emulator/clock", json={"offset_seconds": 600}) as resp:
        assert (await resp.json()) == {"offset_seconds": 600, "now": clock.now + 600}
    ahead = int(clock.now) + 600
    status, body, resp = await post(http, v1_token_url(emu, "tok1"), headers=bearer(STATIC))
    assert status == 200 and (body["refreshAfter"], body["expiryOn"]) == (ahead + 1800, ahead + 3600)
    assert resp.headers["Date"] == http_date(ahead)
    status, body, resp = await post(http, v2_token_url(emu, "tok2"), headers=bearer(STATIC))
    assert status == 200 and (body["refreshAfterTimeUtc"], body["expiryTimeUtc"]) == (ahead + 300, ahead + 600)
    assert parsedate_to_datetime(resp.headers["Date"]).timestamp() == ahead

    form = {"grant_type": "client_credentials", "client_id": APP, "client_secret": SECRET, "scope": f"{ML}/.default"}
    status, body, resp = await post(http, token_url(emu), data=form)
    assert status == 200 and body["expires_in"] == 3599 and claims_of(body["access_token"])["iat"] == ahead
    assert resp.headers["Date"] == http_date(ahead)
    status, body, resp = await post(
        http, f"{emu.mlserver_url}/login", json={"username": ML_USER, "password": ML_PASSWORD}
    )
    remember(body["access_token"], body["refresh_token"])
    assert status == 200 and (body["expires_in"], body["expires_on"]) == (600, ahead + 600)
    assert resp.headers["Date"] == http_date(ahead)

    # Behind: tokens issued "now" by a clock 10 minutes slow are already stale for a client 10 minutes ahead.
    emu.state.set_clock_offset(-600)
    body = await aml_token(http, emu, "tok1")
    assert body["expiryOn"] == int(clock.now) - 600 + 3600


async def test_clock_offset_from_config_and_admin_validation(clock: FakeClock) -> None:
    async with (
        await start_emulator(config(clock_offset_seconds=-120), clock=clock) as running,
        aiohttp.ClientSession() as http,
    ):
        assert running.state.now() == clock.now - 120
        async with http.get(running.control_url + "/_emulator/clock") as resp:
            assert (await resp.json())["offset_seconds"] == -120
        for bad in ({"offset_seconds": "soon"}, {"offset_seconds": 1e12}, {"seconds": 5}, [1]):
            async with http.put(running.control_url + "/_emulator/clock", json=bad) as resp:
                assert resp.status == 400 and (await resp.json())["message"]
        assert running.state.clock_offset_seconds == -120


# -- faults and latency on token calls ---------------------------------------------------------------------------


async def test_token_429_with_retry_after_in_each_planes_shape_then_recovers(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    fault = {"target": "token", "action": "status", "status": 429, "retry_after": 7, "count": 2}
    async with http.post(emu.control_url + "/_emulator/faults", json=fault) as resp:
        assert resp.status == 201
        assert (await resp.json())["retry_after"] == 7
    status, body, resp = await post(http, v1_token_url(emu, "tok1"), headers=bearer(STATIC))
    assert (status, resp.headers["Retry-After"], body["statusCode"]) == (429, "7", 429)
    status, body, resp = await post(http, v2_token_url(emu, "tok2"), headers=bearer(STATIC))
    assert (status, resp.headers["Retry-After"]) == (429, "7") and body["error"]["code"]
    await aml_token(http, emu, "tok1")
    assert emu.state.token_calls == {"tok1": 2, "tok2": 1}  # faulted calls count too


async def test_token_503_once_and_a_control_fault_also_hits_token_calls(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    emu.state.add_fault(target="token", action="status", status=503, count=1)
    status, _, resp = await post(http, v1_token_url(emu, "tok1"), headers=bearer(STATIC))
    assert status == 503 and "Retry-After" not in resp.headers
    await aml_token(http, emu, "tok1")
    emu.state.add_fault(target="control", action="status", status=500, count=1)
    status, _, _ = await post(http, v1_token_url(emu, "tok1"), headers=bearer(STATIC))
    assert status == 500
    # A token fault leaves the other control-plane calls alone.
    emu.state.add_fault(target="token", action="status", status=503, count=1)
    status, _, _ = await post(http, f"{emu.control_url}{V1_WS}/services/keyed/listkeys", headers=bearer(STATIC))
    assert status == 200
    assert len(emu.state.faults) == 1


@pytest.mark.parametrize("api", ["v1", "v2"])
async def test_invalid_json_and_missing_fields_on_token_endpoints(
    emu: RunningEmulator, http: aiohttp.ClientSession, api: str
) -> None:
    name, url = ("tok1", v1_token_url(emu, "tok1")) if api == "v1" else ("tok2", v2_token_url(emu, "tok2"))
    emu.state.add_fault(target="token", service=name, action="invalid_json", count=1)
    async with http.post(url, headers=bearer(STATIC)) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        with pytest.raises(ValueError):
            json.loads(await resp.text())
    emu.state.add_fault(target="token", service=name, action="missing_fields", count=1)
    status, body, _ = await post(http, url, headers=bearer(STATIC))
    assert status == 200 and "accessToken" not in body
    assert ("expiryOn" if api == "v1" else "expiryTimeUtc") in body
    await aml_token(http, emu, name, api=api)


async def test_malformed_answers_from_entra_and_mlserver(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    form = {"grant_type": "client_credentials", "client_id": APP, "client_secret": SECRET, "scope": f"{ML}/.default"}
    emu.state.add_fault(target="entra", action="missing_fields", count=1)
    status, body, _ = await post(http, token_url(emu), data=form)
    assert status == 200 and "access_token" not in body and body["expires_in"] == 3599
    emu.state.add_fault(target="entra", action="invalid_json", count=1)
    status, body, _ = await post(http, token_url(emu), data=form)
    assert status == 200 and isinstance(body, str)
    emu.state.add_fault(target="mlserver", action="missing_fields", count=1)
    credentials = {"username": ML_USER, "password": ML_PASSWORD}
    status, body, _ = await post(http, f"{emu.mlserver_url}/login", json=credentials)
    remember(body["refresh_token"])
    assert status == 200 and "access_token" not in body
    emu.state.add_fault(target="mlserver", action="status", status=503, retry_after=2, count=1)
    status, body, resp = await post(http, f"{emu.mlserver_url}/login", json=credentials)
    assert (status, resp.headers["Retry-After"]) == (503, "2") and set(body) == {"message", "link", "exceptionType"}
    await login(http, emu)


async def test_region_scoped_outage_spares_other_regions_and_region_less_services(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    emu.state.add_fault(target="token", region="westeurope", action="status", status=503)
    emu.state.add_fault(target="control", region="westeurope", action="status", status=503)
    emu.state.add_fault(target="entra", region="westeurope", action="status", status=503)  # never matches
    status, _, _ = await post(http, v2_token_url(emu, "tok2"), headers=bearer(STATIC))
    assert status == 503
    status, _, _ = await post(
        http, f"{emu.control_url}{V2_WS}/onlineEndpoints/keyed2/listKeys?{API}", headers=bearer(STATIC)
    )
    assert status == 503
    await aml_token(http, emu, "tok1")  # eastus
    status, _, _ = await post(http, f"{emu.control_url}{V1_WS}/services/keyed/listkeys", headers=bearer(STATIC))
    assert status == 200
    form = {"grant_type": "client_credentials", "client_id": APP, "client_secret": SECRET, "scope": f"{ML}/.default"}
    status, body, _ = await post(http, token_url(emu), data=form)
    assert status == 200
    await login(http, emu)

    emu.state.clear_faults()
    emu.state.add_fault(target="entra", action="status", status=503, retry_after=1)
    status, body, resp = await post(http, token_url(emu), data=form)
    assert status == 503 and body["error"] == "temporarily_unavailable" and resp.headers["Retry-After"] == "1"
    imds = f"{emu.imds_url}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={ML}"
    async with http.get(imds, headers={"Metadata": "true"}) as resp:
        assert resp.status == 503
    assert emu.state.entra_token_calls == {APP: 2, MI_DEFAULT: 1}


async def test_region_latency_delays_token_calls(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    async with http.put(emu.control_url + "/_emulator/latency", json={"region": "westeurope", "seconds": 0.4}) as r:
        assert r.status == 200
    started = time.monotonic()
    await aml_token(http, emu, "tok2", api="v2")
    assert time.monotonic() - started >= 0.35
    started = time.monotonic()
    await aml_token(http, emu, "tok1")
    assert time.monotonic() - started < 0.35  # eastus has no latency


@pytest.mark.parametrize(
    "fault",
    [
        {"target": "scoring", "action": "invalid_json"},
        {"target": "control", "action": "missing_fields"},
        {"target": "token", "action": "delay", "seconds": 1, "retry_after": 3},
        {"target": "token", "action": "status", "status": 429, "retry_after": -1},
        {"target": "token", "action": "status", "status": 429, "region": ""},
        {"target": "clock", "action": "status", "status": 429},
    ],
)
async def test_admin_rejects_bad_token_faults(
    emu: RunningEmulator, http: aiohttp.ClientSession, fault: dict[str, Any]
) -> None:
    async with http.post(emu.control_url + "/_emulator/faults", json=fault) as resp:
        assert resp.status == 400 and (await resp.json())["message"]
    assert emu.state.faults == []


async def test_call_counters_via_admin_api(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    await aml_token(http, emu, "tok1")
    await aml_token(http, emu, "tok1")
    pair = await login(http, emu)
    async with http.delete(f"{emu.mlserver_url}/login/refreshToken", params={"refreshToken": pair["refresh_token"]}):
        pass
    async with http.get(emu.control_url + "/_emulator/calls") as resp:
        text = await resp.text()
    assert json.loads(text) == {
        "token": {"tok1": 2},
        "entra_token": {},
        "mlserver": {"login": 1, "revoke": 1},
        "mlserver_revoked": 1,
    }
    assert pair["refresh_token"] not in text


# -- config, TLS and CLI -----------------------------------------------------------------------------------------


def test_parse_config_names_every_bad_token_key() -> None:
    cfg = config(
        clock_offset_seconds="later",
        entra={
            "tenant": "a/b",
            "token_lifetime_seconds": 0,
            "clients": {"app": ""},
            "federated": {"wi": 5},
            "managed_identities": ["mi", "mi"],
            "colour": "red",
        },
        mlserver={"users": {"admin": ""}, "backend": "ftp://x", "access_token_lifetime_seconds": -1},
        listen={"entra_port": 70000, "imds_port": "x"},
    )
    cfg["services"][3]["auth_mode"] = "aad_token"  # a v1 service
    cfg["services"][0]["token_refresh_after_seconds"] = 4000  # more than its lifetime
    cfg["services"][1]["token_lifetime_seconds"] = "long"
    text = config_problems(
        cfg,
        "clock_offset_seconds:",
        "entra.tenant:",
        "entra.token_lifetime_seconds:",
        "entra.clients.app:",
        "entra.federated.wi:",
        "entra.managed_identities[1]: duplicate",
        "entra.colour: unknown key",
        "mlserver.users.admin:",
        "mlserver.backend:",
        "mlserver.access_token_lifetime_seconds:",
        "listen.entra_port:",
        "listen.imds_port:",
        "services[3] (keyed).auth_mode: aad_token is only for v2",
        "services[0] (tok1).token_refresh_after_seconds:",
        "services[1] (tok2).token_lifetime_seconds:",
    )
    assert SECRET not in text and ML_PASSWORD not in text


async def test_self_made_ca_serves_entra_and_is_removed_on_close() -> None:
    running = await start_emulator(config(mlserver=None))
    try:
        assert running.ca_file is not None and running.entra_url.startswith("https://127.0.0.1:")
        assert running.mlserver_url is None and running.control_url.startswith("http://")
        trust = ssl.create_default_context(cafile=running.ca_file)
        async with aiohttp.ClientSession() as http:
            url = f"{running.entra_url}/{running.tenant}/v2.0/.well-known/openid-configuration"
            async with http.get(url, ssl=trust) as resp:
                assert resp.status == 200
            localhost = url.replace("127.0.0.1", "localhost")
            async with http.get(localhost, ssl=trust) as resp:
                assert resp.status == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with http.get(url) as resp:  # the system trust store does not know the throwaway CA
                    pass
    finally:
        await running.close()
    assert not Path(running.ca_file).exists() and not Path(running.ca_file).parent.exists()


async def test_given_ssl_context_is_used_for_every_https_listener(tmp_path: Path) -> None:
    tls = make_local_tls(tmp_path / "pki")
    async with await start_emulator(config(), ssl_context=tls.server_context(), ca_file=tls.ca_file) as running:
        assert running.ca_file == str(tls.ca_file)
        for url in (running.entra_url, running.control_url, running.mlserver_url or "", running.scoring_url):
            assert url.startswith("https://")
        assert running.imds_url.startswith("http://")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls.client_context())) as http:
            body = await login(http, running)
            assert await ml_score(http, running, body["access_token"]) == 200
            async with http.get(f"{running.entra_url}/{running.tenant}/discovery/v2.0/keys") as resp:
                assert (await resp.json())["keys"][0]["kty"] == "RSA"
    async with await start_emulator(config(), ssl_context=tls.server_context()) as running:
        assert running.ca_file is None


async def test_cli_ready_line_names_the_new_listeners_without_secrets(tmp_path: Path) -> None:
    cfg_path = tmp_path / "emulator.yaml"
    cfg_path.write_text(json.dumps(config()))  # JSON is YAML
    async with emulator_main("--config", str(cfg_path), cwd=tmp_path) as proc:
        first = await first_line(proc)
        ready = json.loads(first)
        assert ready["entra_url"].startswith("https://127.0.0.1:") and ready["imds_url"].startswith("http://")
        assert ready["mlserver_url"].startswith("http://127.0.0.1:") and ready["tenant"] == ready["tenant"].strip()
        assert Path(ready["ca_file"]).is_file()
        trust = ssl.create_default_context(cafile=ready["ca_file"])
        form = {
            "grant_type": "client_credentials",
            "client_id": APP,
            "client_secret": SECRET,
            "scope": f"{ARM}/.default",
        }
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.post(
                f"{ready['entra_url']}/{ready['tenant']}/oauth2/v2.0/token", data=form, ssl=trust
            ) as r:
                assert r.status == 200
                remember((await r.json())["access_token"])
        rest, err = await sigterm(proc)
        assert proc.returncode == 0
    output = (first + rest + err).decode()
    assert SECRET not in output and ML_PASSWORD not in output
    assert not Path(ready["ca_file"]).exists()  # removed on shutdown


async def test_tls_option_serves_every_listener_but_imds_over_https_with_the_emulators_ca() -> None:
    import ssl as _ssl

    from proxy.emulator.runner import start_emulator as _start

    config = {"tls": True, "services": [{"name": "s", "api": "v2", "deployments": {"blue": "echo"}}]}
    async with await _start(config) as emu:
        assert emu.control_url.startswith("https://") and emu.service_urls["s"].startswith("https://")
        assert emu.entra_url.startswith("https://") and emu.imds_url.startswith("http://")
        assert emu.ca_file is not None
        ctx = _ssl.create_default_context(cafile=emu.ca_file)
        async with aiohttp.ClientSession() as client, client.get(emu.control_url + "/_emulator/services", ssl=ctx) as r:
            assert r.status == 200
