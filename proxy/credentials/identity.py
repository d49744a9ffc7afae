"""The proxy's own Azure identity: azure-identity's async credentials, selected by config, with metrics.

azure-identity does the Entra ID protocols (client assertion from the federated token file, IMDS, client
secret) and caches tokens; this module picks the credential, reads the client secret from its file, points it
at the configured authority and CA, and classifies failures as transient or permanent.

Its HTTP calls go through azure-core's AsyncioRequestsTransport (requests, run in the loop's thread pool) rather
than its default aiohttp transport: msal, which azure-identity always loads, already loads requests, while
aiohttp would add about 10 MiB to every process with an Azure identity for a few calls an hour. The exception is
`auth.identity.azure_proxy` (AKS identity bindings): azure-identity then brings its own transport, aiohttp when it
is installed, imported only by a credential built with the switch on.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import time
from typing import Any

from azure.core.credentials import AccessTokenInfo
from azure.core.exceptions import ClientAuthenticationError, DecodeError, ServiceRequestError, ServiceResponseError
from azure.core.pipeline.transport import AsyncioRequestsTransport
from azure.identity import CredentialUnavailableError
from azure.identity.aio import ClientSecretCredential, ManagedIdentityCredential, WorkloadIdentityCredential
from requests.exceptions import RequestException, SSLError

from proxy.config.settings import Identity
from proxy.credentials.files import SecretFileError, read_secret_file
from proxy.credentials.http import is_transient_status, parse_retry_after
from proxy.credentials.secret_keys import SecretFeed
from proxy.credentials.tokens import PermanentError, TransientError
from proxy.logs import REDACTOR
from proxy.metrics import Metrics


class AzureIdentity:
    """Tokens for the proxy's identity, one credential object per route."""

    def __init__(
        self,
        *,
        config: Identity,
        ca_file: str | None,
        metrics: Metrics,
        timeout: float = 10.0,
        secret_feed: SecretFeed | None = None,
    ) -> None:
        self.identity_type = config.type
        self._secret_feed = secret_feed  # client_secret_ref: the watched Secret
        self._secret_used: str | None = None
        self._config = config
        self._ca_file = ca_file
        self._metrics = metrics
        self._timeout = timeout
        self._credential: Any = None
        self._last: dict[str, str] = {}

    def _build(self) -> Any:
        c = self._config
        # No retries inside azure-core: the refresher owns backoff and honours Retry-After, and a fetch must not
        # sleep through the refresher's timeout.
        kwargs: dict[str, Any] = {
            "retry_total": 0,
            "transport": AsyncioRequestsTransport(
                connection_verify=self._ca_file or system_ca_store(),
                connection_timeout=self._timeout,  # the thread gives up when the refresher's timeout does
                read_timeout=self._timeout,
            ),
        }
        if c.authority_host:
            kwargs["authority"] = c.authority_host
        if c.type == "client_secret":
            assert c.tenant_id and c.client_id  # config requires them
            secret = self._client_secret()
            REDACTOR.add(secret)
            self._secret_used = secret
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
        if c.azure_proxy:
            # AKS identity bindings: with AZURE_KUBERNETES_TOKEN_PROXY set, azure-identity replaces the transport
            # with its own (aiohttp, else requests) that sends the token request to that proxy with the SNI name
            # and CA of AZURE_KUBERNETES_SNI_NAME and AZURE_KUBERNETES_CA_FILE/_DATA; it takes the timeouts from
            # these keywords. The config check made sure the installed azure-identity knows the keyword.
            kwargs["enable_azure_proxy"] = True
            kwargs["connection_timeout"] = self._timeout
            kwargs["read_timeout"] = self._timeout
        try:
            return WorkloadIdentityCredential(**kwargs)
        except ValueError as exc:  # a missing AZURE_* variable; the message names it
            raise PermanentError(f"workload identity: {exc}") from exc

    def _client_secret(self) -> str:
        c = self._config
        if c.client_secret_ref is not None and self._secret_feed is not None:
            state = self._secret_feed.state
            try:
                if state is None:
                    raise SecretFileError("not read yet")
                return state.value(c.client_secret_ref.key)
            except SecretFileError as exc:
                raise PermanentError(f"client secret Secret {c.client_secret_ref}: {exc}") from exc
        assert c.client_secret_file  # config requires the file or the Secret
        try:
            return read_secret_file(c.client_secret_file)
        except SecretFileError as exc:
            raise PermanentError(f"client secret file: {exc}") from exc

    def _secret_rotated(self) -> bool:
        """The watched client secret changed since the credential was built (a bad update keeps the old one)."""
        ref, feed = self._config.client_secret_ref, self._secret_feed
        if ref is None or feed is None or feed.state is None or self._secret_used is None:
            return False
        try:
            return feed.state.value(ref.key) != self._secret_used
        except SecretFileError:
            return False

    async def token(self, scope: str) -> AccessTokenInfo:
        """A token for `scope`, from azure-identity's cache when it is still good."""
        if self._credential is not None and self._secret_rotated():
            await self.reset()  # a rotated client secret: the next token is acquired with the new one
        if self._credential is None:
            self._credential = self._build()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                info: AccessTokenInfo = await self._credential.get_token_info(scope)
        except CredentialUnavailableError as exc:
            self._count_error()
            raise PermanentError(f"{self.identity_type} identity unavailable: {_first_line(exc)}") from exc
        except ClientAuthenticationError as exc:
            self._count_error()
            raise _classify_refusal(exc, self.identity_type) from exc
        except TimeoutError as exc:
            self._count_error()
            raise TransientError(f"Entra ID did not answer within {self._timeout:g} s") from exc
        except (DecodeError, KeyError, ValueError, TypeError) as exc:  # an answer that is not a token response
            self._count_error()
            raise TransientError("Entra ID sent a malformed answer") from exc
        except (ServiceRequestError, ServiceResponseError, OSError, RequestException) as exc:
            self._count_error()
            raise TransientError(_transport_reason(exc)) from exc
        REDACTOR.add(info.token, owner=f"identity:{id(self)}")
        if self._last.get(scope) == info.token:
            self._metrics.entra_requests.labels(self.identity_type, "cached").inc()
        else:
            self._last[scope] = info.token
            self._metrics.entra_requests.labels(self.identity_type, "acquired").inc()
            self._metrics.entra_duration.labels(self.identity_type).observe(time.perf_counter() - started)
        return info

    def _count_error(self) -> None:
        self._metrics.entra_requests.labels(self.identity_type, "error").inc()

    async def reset(self) -> None:
        """Drop azure-identity's cached tokens: the next call acquires a new one (after a control plane's 401)."""
        await self.close()
        self._last.clear()

    async def close(self) -> None:
        if self._credential is not None:
            await self._credential.close()
            self._credential = None


def system_ca_store() -> str | bool:
    """The system's CA store (OpenSSL's default file or directory, which SSL_CERT_FILE and SSL_CERT_DIR move), as
    the proxy's other TLS clients use it; requests would otherwise trust only certifi's bundle (True)."""
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.capath):
        if path and os.path.exists(path):
            return path
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")


def _classify_refusal(exc: ClientAuthenticationError, kind: str) -> TransientError | PermanentError:
    """Entra ID's refusal as a stable reason: the status and the OAuth error code, never the description, whose
    trace id and timestamp change on every answer (so each retry would look like a new state)."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is None:
        if _looks_like_an_answer(exc):
            return PermanentError(f"Entra ID refused the {kind} identity")
        return TransientError(_transport_reason(exc))
    code = "no error code"
    try:
        body = json.loads(response.text())  # type: ignore[union-attr]
        if isinstance(body, dict) and _ERROR_CODE.match(str(body.get("error", ""))):
            code = str(body["error"])
    except (ValueError, TypeError, AttributeError):
        pass
    reason = f"Entra ID: HTTP {status} ({code})"
    if is_transient_status(status):
        retry_after = parse_retry_after(getattr(response, "headers", {}).get("Retry-After"), now=time.time())
        return TransientError(reason, retry_after=retry_after, status=status)
    return PermanentError(reason, status=status)


def _transport_reason(exc: BaseException) -> str:
    """Why Entra ID could not be reached, from the whole chain of causes: TLS is told apart from the rest."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    tls = False
    while todo:
        cause = todo.pop()
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return "Entra ID TLS certificate not trusted"
        tls = tls or isinstance(cause, ssl.SSLError | SSLError)
        # azure-core keeps the transport's error as inner_exception; requests and urllib3 wrap theirs in args and
        # in MaxRetryError.reason, besides the usual __cause__ and __context__.
        linked = (getattr(cause, "inner_exception", None), getattr(cause, "reason", None), cause.__cause__)
        todo += [c for c in (*linked, cause.__context__, *cause.args) if isinstance(c, BaseException)]
    if tls:
        return "Entra ID TLS handshake failed"
    return f"Entra ID unreachable: {type(exc).__name__}"


def _looks_like_an_answer(exc: BaseException) -> bool:
    """Entra ID answered (an AADSTS error), as opposed to a transport failure wrapped by azure-identity."""
    text = str(exc)
    return "AADSTS" in text or "invalid_" in text or "unauthorized_client" in text
