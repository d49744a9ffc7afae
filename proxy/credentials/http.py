"""The one HTTP client for credential calls (AML control planes, ML Server), with their error classification.

Network errors, timeouts, 408, 425, 429 and 5xx are transient (Retry-After is kept); other non-2xx answers are
permanent; a 2xx whose body is not the expected JSON object is transient (a glitch, retried with backoff).
Reasons never quote a response body: bodies of credential endpoints may echo credentials.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from proxy import __version__
from proxy.credentials.tokens import PermanentError, TransientError, jwt_claims
from proxy.upstream import UpstreamError, UpstreamPool, UpstreamResponse

_TRANSIENT_STATUS = frozenset({408, 425, 429})
USER_AGENT = f"aml-auth-proxy/{__version__}"
MAX_ANSWER_BYTES = 1 << 20  # a token or key answer is a few KiB; an endless body is cut here


@dataclass(frozen=True, kw_only=True)
class JsonAnswer:
    status: int
    body: dict[str, Any]
    server_now: float | None  # the server's clock from its Date header, for skew correction


def is_transient_status(status: int) -> bool:
    """Worth retrying soon: 5xx, 408 Request Timeout, 425 Too Early, 429 Too Many Requests. Every credential kind
    that speaks HTTP classifies its answers here."""
    return status >= 500 or status in _TRANSIENT_STATUS


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
    claims = jwt_claims(token)
    if claims is None:
        return None, None
    iat, exp = claims.get("iat"), claims.get("exp")
    return (float(iat) if isinstance(iat, int | float) else None, float(exp) if isinstance(exp, int | float) else None)


class CredentialHttp:
    """One route's client for its credential calls, on the proxy's own HTTP/1.1 client (proxy/upstream.py): a
    small keep-alive pool per origin, TLS verified against the system store or `ca_file`, no redirects, no
    cookies, no proxy from the environment. `timeout` bounds each call, connecting included."""

    def __init__(self, *, what: str, ca_file: str | None, timeout: float) -> None:
        self._what = what
        self._ca_file = ca_file
        self._timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        self._pools: dict[tuple[str, str, int], UpstreamPool] = {}

    def _pool(self, url: URL) -> UpstreamPool:
        scheme, host = url.scheme, url.raw_host or ""
        port = url.port or (443 if scheme == "https" else 80)
        pool = self._pools.get((scheme, host, port))
        if pool is None:
            if scheme == "https" and self._ssl is None:
                self._ssl = ssl.create_default_context(cafile=self._ca_file)  # the system store without one
            shown = f"[{host}]" if ":" in host else host
            pool = UpstreamPool(
                scheme=scheme,
                host=host,
                port=port,
                host_header=shown if url.is_default_port() else f"{shown}:{port}",
                ssl_context=self._ssl,
                max_connections=4,
                keepalive_seconds=15.0,
                connect_timeout=self._timeout,
                read_timeout=self._timeout,
                total_timeout=self._timeout,
            )
            self._pools[(scheme, host, port)] = pool
        return pool

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
        expect_json: bool = True,
    ) -> JsonAnswer:
        target = URL(url)
        if target.scheme not in ("http", "https") or not target.raw_host:
            raise PermanentError(f"{self._what}: not an http(s) URL")
        data = b""  # a POST without a body says Content-Length: 0, as the SDKs send
        send = CIMultiDict({"Accept": "application/json", "User-Agent": USER_AGENT})
        if json_body is not None:
            data = json.dumps(json_body).encode()
            send["Content-Type"] = "application/json; charset=utf-8"
        send.update(headers or {})
        if data or method == "POST":
            send["Content-Length"] = str(len(data))
        try:
            async with asyncio.timeout(self._timeout):
                answer = await self._pool(target).request(method, target.raw_path_qs, send, data or None)
                try:
                    raw = await _read_bounded(answer)
                finally:
                    answer.release()
        except TimeoutError as exc:
            raise TransientError(f"{self._what}: timed out") from exc
        except UpstreamError as exc:
            raise TransientError(f"{self._what}: {_transport_reason(exc)}") from exc
        status = answer.status
        found = CIMultiDict(answer.raw_headers)
        retry_after = parse_retry_after(found.get("Retry-After"), now=time.time())
        now = server_date(found.get("Date"))
        if is_transient_status(status):
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
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.close()


async def _read_bounded(answer: UpstreamResponse) -> bytes:
    """The whole body of a credential endpoint's answer, which is small: more than MAX_ANSWER_BYTES is a fault."""
    parts: list[bytes] = []
    size = 0
    while chunk := await answer.read_chunk():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            answer.close()
            raise UpstreamError("protocol", "the answer is larger than a credential answer can be")
        parts.append(chunk)
    return b"".join(parts)


def _transport_reason(exc: UpstreamError) -> str:
    """A fixed text for a failed exchange: an untrusted certificate is told apart from other TLS failures."""
    cause: BaseException | None = exc.__cause__ or exc.__context__  # compiled code may set only the context
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return "TLS certificate not trusted"
        cause = cause.__cause__ or cause.__context__
    if exc.kind == "timeout":
        return "timed out"
    return exc.reason.replace("upstream ", "server ", 1) if exc.reason.startswith("upstream ") else exc.reason


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
