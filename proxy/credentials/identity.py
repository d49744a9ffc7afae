"""The proxy's own Azure identity: azure-identity's async credentials, selected by config, with metrics.

azure-identity does the Entra ID protocols (client assertion from the federated token file, IMDS, client
secret) and caches tokens; this module picks the credential, reads the client secret from its file, points it
at the configured authority and CA, and classifies failures as transient or permanent.
"""

from __future__ import annotations

import time
from typing import Any

from azure.core.credentials import AccessTokenInfo
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError, ServiceResponseError
from azure.identity import CredentialUnavailableError
from azure.identity.aio import ClientSecretCredential, ManagedIdentityCredential, WorkloadIdentityCredential

from proxy.config import Identity
from proxy.credentials.keys import KeyFileError, read_key_file
from proxy.logs import REDACTOR
from proxy.metrics import Metrics
from proxy.refresher import PermanentError, TransientError


class AzureIdentity:
    """Tokens for the proxy's identity, one credential object per route."""

    def __init__(self, *, config: Identity, ca_file: str | None, metrics: Metrics) -> None:
        self.kind = config.type
        self._config = config
        self._ca_file = ca_file
        self._metrics = metrics
        self._credential: Any = None
        self._last: dict[str, str] = {}

    def _build(self) -> Any:
        c = self._config
        kwargs: dict[str, Any] = {}
        if self._ca_file:
            kwargs["connection_verify"] = self._ca_file
        if c.authority_host:
            kwargs["authority"] = c.authority_host
        if c.type == "client_secret":
            assert c.client_secret_file and c.tenant_id and c.client_id  # config requires them
            try:
                secret = read_key_file(c.client_secret_file)
            except KeyFileError as exc:
                raise PermanentError(f"client secret file: {exc}") from exc
            REDACTOR.add(secret)
            return ClientSecretCredential(c.tenant_id, c.client_id, secret, **kwargs)
        if c.type == "managed":
            kwargs.pop("authority", None)  # IMDS; AZURE_POD_IDENTITY_AUTHORITY_HOST points elsewhere
            return ManagedIdentityCredential(client_id=c.client_id, **kwargs)
        if c.tenant_id:
            kwargs["tenant_id"] = c.tenant_id
        if c.client_id:
            kwargs["client_id"] = c.client_id
        if c.token_file:
            kwargs["token_file_path"] = c.token_file
        try:
            return WorkloadIdentityCredential(**kwargs)
        except ValueError as exc:  # a missing AZURE_* variable; the message names it
            raise PermanentError(f"workload identity: {exc}") from exc

    async def token(self, scope: str) -> AccessTokenInfo:
        """A token for `scope`, from azure-identity's cache when it is still good."""
        if self._credential is None:
            self._credential = self._build()
        started = time.perf_counter()
        try:
            info: AccessTokenInfo = await self._credential.get_token_info(scope)
        except CredentialUnavailableError as exc:
            self._metrics.entra_requests.labels(self.kind, "error").inc()
            raise PermanentError(f"{self.kind} identity unavailable: {_first_line(exc)}") from exc
        except ClientAuthenticationError as exc:
            self._metrics.entra_requests.labels(self.kind, "error").inc()
            status = getattr(getattr(exc, "response", None), "status_code", None)
            reason = f"Entra ID refused the {self.kind} identity: {_first_line(exc)}"
            if status is not None and (status >= 500 or status == 429):
                raise TransientError(reason) from exc
            if status is None and not _looks_like_an_answer(exc):
                raise TransientError(f"Entra ID unreachable: {_first_line(exc)}") from exc
            raise PermanentError(reason) from exc
        except (ServiceRequestError, ServiceResponseError, OSError) as exc:
            self._metrics.entra_requests.labels(self.kind, "error").inc()
            raise TransientError(f"Entra ID unreachable: {type(exc).__name__}") from exc
        REDACTOR.add(info.token)
        if self._last.get(scope) == info.token:
            self._metrics.entra_requests.labels(self.kind, "cached").inc()
        else:
            self._last[scope] = info.token
            self._metrics.entra_requests.labels(self.kind, "acquired").inc()
            self._metrics.entra_duration.labels(self.kind).observe(time.perf_counter() - started)
        return info

    async def reset(self) -> None:
        """Drop azure-identity's cached tokens: the next call acquires a new one (after a control plane's 401)."""
        await self.close()
        self._last.clear()

    async def close(self) -> None:
        if self._credential is not None:
            await self._credential.close()
            self._credential = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _looks_like_an_answer(exc: BaseException) -> bool:
    """Entra ID answered (an AADSTS error), as opposed to a transport failure wrapped by azure-identity."""
    text = str(exc)
    return "AADSTS" in text or "invalid_" in text or "unauthorized_client" in text
