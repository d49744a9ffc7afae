"""The one HTTP client for credential calls (AML control planes, ML Server), with their error classification.

Network errors, timeouts, 408, 429 and 5xx are transient (Retry-After is kept); other non-2xx answers are
permanent; a 2xx whose body is not the expected JSON object is transient (a glitch, retried with backoff).
Reasons never quote a response body: bodies of credential endpoints may echo credentials.
"""

from __future__ import annotations

import email.utils
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from proxy.refresher import PermanentError, TransientError

_TRANSIENT_STATUS = frozenset({408, 425, 429})


@dataclass(frozen=True, kw_only=True)
class JsonAnswer:
    status: int
    body: dict[str, Any]
    server_now: float | None  # the server's clock from its Date header, for skew correction


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Retry-After as seconds from now (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


def server_date(value: str | None) -> float | None:
    """The server's clock from a Date header: the end of the (truncated) second it names."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() + 1.0
    except (TypeError, ValueError):
        return None


def jwt_times(token: str) -> tuple[float | None, float | None]:
    """(iat, exp) of a JWT, read without verifying it (only the server can verify its tokens); else Nones."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None, None
    iat, exp = claims.get("iat"), claims.get("exp")
    return (float(iat) if isinstance(iat, int | float) else None, float(exp) if isinstance(exp, int | float) else None)


class CredentialHttp:
    """A small aiohttp client for one route's credential calls."""

    def __init__(self, *, what: str, ca_file: str | None, timeout: float) -> None:
        self._what = what
        self._ssl: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=4),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=self._timeout,
            )
        return self._session

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
        expect_json: bool = True,
    ) -> JsonAnswer:
        data = None
        send_headers = {"Accept": "application/json", **(headers or {})}
        if json_body is not None:
            data = json.dumps(json_body).encode()
            send_headers["Content-Type"] = "application/json; charset=utf-8"
        elif method == "POST":
            data = b""  # Content-Length: 0, as the SDKs send
        try:
            async with self._client().request(
                method, url, data=data, headers=send_headers, allow_redirects=False
            ) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), now=time.time())
                now = server_date(resp.headers.get("Date"))
        except TimeoutError as exc:
            raise TransientError(f"{self._what}: timed out") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise TransientError(f"{self._what}: TLS certificate not trusted") from exc
        except aiohttp.ClientError as exc:
            raise TransientError(f"{self._what}: {type(exc).__name__}") from exc
        if status >= 500 or status in _TRANSIENT_STATUS:
            raise TransientError(f"{self._what}: HTTP {status}", retry_after=retry_after, status=status)
        if not 200 <= status < 300:
            raise PermanentError(f"{self._what}: HTTP {status}{_error_code(raw)}", status=status)
        if not expect_json:
            return JsonAnswer(status=status, body={}, server_now=now)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise TransientError(f"{self._what}: the answer is not JSON") from exc
        if not isinstance(body, dict):
            raise TransientError(f"{self._what}: the answer is not a JSON object")
        return JsonAnswer(status=status, body=body, server_now=now)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _error_code(raw: bytes) -> str:
    """The service's error code (ARM `error.code`, MMS `code`), never the message, which may echo input."""
    try:
        body = json.loads(raw)
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    code = body.get("code")
    if isinstance(body.get("error"), dict):
        code = body["error"].get("code")
    elif isinstance(body.get("error"), str):
        code = body["error"]
    if isinstance(code, str) and code.replace("_", "").replace(".", "").isalnum() and len(code) < 80:
        return f" ({code})"
    return ""


def require(body: dict[str, Any], what: str, *fields: str) -> None:
    missing = [f for f in fields if body.get(f) in (None, "")]
    if missing:
        raise TransientError(f"{what}: the answer lacks {', '.join(missing)}")


def epoch(body: dict[str, Any], what: str, field: str) -> float:
    value = body.get(field)
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise TransientError(f"{what}: {field} is not a number") from exc
