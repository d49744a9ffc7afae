"""Credentials fetched from AML with the proxy's Azure identity: v1 service tokens, v2 endpoint tokens,
v1/v2 keys, and Entra ID tokens for `aad_token` endpoints. Wire formats: shared/docs/aml-protocol.md §1, §3, §4.
"""

from __future__ import annotations

from urllib.parse import quote

from proxy.clock import Clock, SystemClock
from proxy.config.settings import (
    AAD,
    AML_ENDPOINT_TOKEN,
    AML_KEYS,
    AML_SCOPE,
    AML_SERVICE_TOKEN,
    V1_SCOPE,
    V2_SCOPE,
    AadAuth,
    AmlAuth,
    AmlEndpointTokenAuth,
    AmlKeysAuth,
    AmlServiceTokenAuth,
    IdentityAuth,
)
from proxy.credentials.http import CredentialHttp, JsonAnswer, epoch, jwt_times, require
from proxy.credentials.identity import AzureIdentity
from proxy.credentials.tokens import NothingToWatch, PermanentError, Token, TransientError, skew_corrected

_PROVIDER = "providers/Microsoft.MachineLearningServices"


def _workspace_path(auth: AmlAuth) -> str:
    return (
        f"/subscriptions/{quote(auth.subscription_id, safe='')}"
        f"/resourceGroups/{quote(auth.resource_group, safe='')}"
        f"/{_PROVIDER}/workspaces/{quote(auth.workspace, safe='')}"
    )


def v1_service_url(auth: AmlKeysAuth | AmlServiceTokenAuth, action: str) -> str:
    """`{mms}/modelmanagement/v1.0/subscriptions/.../workspaces/{ws}/services/{name}/{action}`."""
    base = (auth.mms_url or "").rstrip("/")
    return f"{base}/modelmanagement/v1.0{_workspace_path(auth)}/services/{quote(auth.service or '', safe='')}/{action}"


def v2_endpoint_url(auth: AmlKeysAuth | AmlEndpointTokenAuth, action: str) -> str:
    """`{arm}/subscriptions/.../onlineEndpoints/{ep}/{action}?api-version=...`."""
    base = auth.arm_url.rstrip("/")
    endpoint = quote(auth.endpoint or "", safe="")
    return f"{base}{_workspace_path(auth)}/onlineEndpoints/{endpoint}/{action}?api-version={quote(auth.api_version)}"


def default_scope(auth: IdentityAuth) -> str:
    """The route's `scope`, else its type's: Azure ML for aad, the plane's ARM scope for the AML control planes."""
    if auth.scope:
        return auth.scope
    if isinstance(auth, AadAuth):
        return AML_SCOPE
    if isinstance(auth, AmlEndpointTokenAuth):
        return V2_SCOPE
    return V1_SCOPE if auth.service else V2_SCOPE


def _token_from(
    access: str, *, expiry: float, refresh_after: float | None, server_now: float | None, local_now: float
) -> Token:
    """Move the server's times onto the local clock and trust the earlier of expiry and the JWT's exp."""
    iat, exp = jwt_times(access)
    if server_now is None and iat is not None:
        server_now = iat + 1.0  # iat is whole seconds, truncated: take the end of that second
    expires_at = skew_corrected(expiry, server_now=server_now, local_now=local_now)
    if exp is not None:
        jwt_expires = skew_corrected(exp, server_now=server_now, local_now=local_now)
        if jwt_expires is not None and expires_at is not None:
            expires_at = min(expires_at, jwt_expires)
    refresh_at = skew_corrected(refresh_after, server_now=server_now, local_now=local_now)
    return Token(value=access, expires_at=expires_at, refresh_at=refresh_at)


class _ControlPlaneSource(NothingToWatch):
    def __init__(self, *, auth: AmlAuth, identity: AzureIdentity, what: str, clock: Clock | None) -> None:
        self.auth = auth
        self.identity = identity
        self.clock = clock or SystemClock()
        self.http = CredentialHttp(what=what, ca_file=auth.ca_file, timeout=auth.refresh.timeout_seconds)
        self.scope = default_scope(auth)

    async def _bearer(self) -> dict[str, str]:
        info = await self.identity.token(self.scope)
        return {"Authorization": f"Bearer {info.token}"}

    async def _call(self, url: str) -> JsonAnswer:
        """POST with the identity's ARM token. A 401 means the control plane no longer accepts that token (it
        expired by the server's clock, or was revoked) although azure-identity's cache still holds it: acquire a
        new one and try once more before calling it a permanent failure."""
        try:
            return await self.http.request("POST", url, headers=await self._bearer())
        except PermanentError as exc:
            if exc.status != 401:
                raise
        await self.identity.reset()
        return await self.http.request("POST", url, headers=await self._bearer())

    async def revoke(self, token: Token) -> None:
        return None  # AML tokens and keys cannot be revoked by their holder

    async def close(self) -> None:
        await self.http.close()
        await self.identity.close()


class _TokenEndpointSource(_ControlPlaneSource):
    """An AML token endpoint: POST, then `accessToken` with an expiry and an optional refresh-after time, under
    field names that differ between the planes."""

    what = ""
    expiry_field = ""
    refresh_field = ""

    def __init__(self, *, auth: AmlAuth, identity: AzureIdentity, url: str, clock: Clock | None) -> None:
        super().__init__(auth=auth, identity=identity, what=self.what, clock=clock)
        self.url = url

    async def fetch(self, previous: Token | None) -> Token:
        answer = await self._call(self.url)
        body, what = answer.body, self.what
        require(body, what, "accessToken", self.expiry_field)
        refresh = body.get(self.refresh_field)
        return _token_from(
            str(body["accessToken"]),
            expiry=epoch(body, what, self.expiry_field),
            refresh_after=None if refresh is None else epoch(body, what, self.refresh_field),
            server_now=answer.server_now,
            local_now=self.clock.time(),
        )


class AmlServiceTokenSource(_TokenEndpointSource):
    """v1 AKS web service token: `POST .../services/{name}/token` → accessToken, refreshAfter, expiryOn."""

    auth_type = AML_SERVICE_TOKEN
    what = "AML v1 token endpoint"
    expiry_field = "expiryOn"
    refresh_field = "refreshAfter"

    def __init__(self, *, auth: AmlServiceTokenAuth, identity: AzureIdentity, clock: Clock | None = None) -> None:
        super().__init__(auth=auth, identity=identity, url=v1_service_url(auth, "token"), clock=clock)


class AmlEndpointTokenSource(_TokenEndpointSource):
    """v2 online endpoint aml_token: `POST .../onlineEndpoints/{ep}/token` → expiryTimeUtc, refreshAfterTimeUtc."""

    auth_type = AML_ENDPOINT_TOKEN
    what = "AML v2 token endpoint"
    expiry_field = "expiryTimeUtc"
    refresh_field = "refreshAfterTimeUtc"

    def __init__(self, *, auth: AmlEndpointTokenAuth, identity: AzureIdentity, clock: Clock | None = None) -> None:
        super().__init__(auth=auth, identity=identity, url=v2_endpoint_url(auth, "token"), clock=clock)


class AmlKeysSource(_ControlPlaneSource):
    """Keys from v1 `listkeys` or v2 `listKeys`; fetched again periodically and after a 401 with both keys."""

    auth_type = AML_KEYS

    def __init__(self, *, auth: AmlKeysAuth, identity: AzureIdentity, clock: Clock | None = None) -> None:
        v1 = auth.service is not None
        super().__init__(auth=auth, identity=identity, what="AML v1 listkeys" if v1 else "AML v2 listKeys", clock=clock)
        self.refetch_seconds = auth.refetch_seconds
        self.url = v1_service_url(auth, "listkeys") if v1 else v2_endpoint_url(auth, "listKeys")

    async def fetch(self, previous: Token | None) -> Token:
        answer = await self._call(self.url)
        body = answer.body
        require(body, "AML listKeys", "primaryKey")
        primary = str(body["primaryKey"]).strip()
        secondary = str(body.get("secondaryKey") or "").strip() or None
        if not primary.isprintable() or (secondary is not None and not secondary.isprintable()):
            raise TransientError("AML listKeys: a key contains control characters")
        return Token(
            value=primary,
            secondary=secondary,
            expires_at=None,
            refresh_at=self.clock.time() + self.refetch_seconds,
        )


class AadSource(NothingToWatch):
    """An Entra ID token for `https://ml.azure.com/.default` (managed endpoints in aad_token mode)."""

    auth_type = AAD

    def __init__(self, *, auth: AadAuth, identity: AzureIdentity, clock: Clock | None = None) -> None:
        self.identity = identity
        self.scope = default_scope(auth)

    async def fetch(self, previous: Token | None) -> Token:
        info = await self.identity.token(self.scope)
        refresh_on = getattr(info, "refresh_on", None)
        return Token(
            value=info.token, expires_at=float(info.expires_on), refresh_at=float(refresh_on) if refresh_on else None
        )

    async def revoke(self, token: Token) -> None:
        return None

    async def close(self) -> None:
        await self.identity.close()
