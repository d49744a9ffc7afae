"""The catch-all proxy handler: match a route, stream the request upstream with the route's credential, stream
the answer back. One retry with the other credential after a 401 when the body could be buffered.

What this module does not do: load credentials (credentials/), decide readiness (health.py), wire apps (app.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import http_exceptions, web
from multidict import CIMultiDict

from proxy.config import Limits, Route
from proxy.credentials.base import Credential, CredentialProvider
from proxy.headers import (
    CLIENT_REQUEST_ID,
    REQUEST_ID,
    downstream_response_headers,
    new_request_id,
    request_id,
    upstream_request_headers,
)
from proxy.logs import AccessLog, event
from proxy.metrics import Metrics, RouteMetrics
from proxy.upstream import UpstreamError, UpstreamPool, UpstreamResponse, pool_for

log = logging.getLogger("aml_auth_proxy.forwarding")


@dataclass(eq=False, kw_only=True)
class RouteRuntime:
    """One route, prepared at start-up: its config, credential provider, metrics and upstream pool."""

    config: Route
    provider: CredentialProvider
    metrics: RouteMetrics
    pool: UpstreamPool | None = None
    _base_path: str = field(init=False)
    _prefix: str = field(init=False)

    def __post_init__(self) -> None:
        self._base_path = self.config.upstream.raw_path.rstrip("/")
        self._prefix = self.config.match.rstrip("/")

    @property
    def name(self) -> str:
        return self.config.name

    def matches(self, path: str) -> bool:
        prefix = self._prefix
        return not prefix or path == prefix or path.startswith(prefix + "/")

    def target(self, path: str, query: str) -> str:
        """The request target sent upstream: the raw path (prefix stripped if configured) and the query as received;
        `query` is empty or starts with "?" (a bare "?" is kept)."""
        if self.config.strip_prefix and self._prefix:
            path = path[len(self._prefix) :] or "/"
        return self._base_path + path + query

    def make_pool(self) -> UpstreamPool:
        return pool_for(self.config)


class Router:
    """Longest-prefix route match on the raw path."""

    def __init__(self, routes: list[RouteRuntime]) -> None:
        self.routes = sorted(routes, key=lambda r: len(r.config.match), reverse=True)

    def match(self, path: str) -> RouteRuntime | None:
        for rt in self.routes:
            if rt.matches(path):
                return rt
        return None


# (response, status for metrics and logs, bytes sent, seconds waiting for the upstream's answer headers)
_Outcome = tuple[web.StreamResponse, int, int, float]


class _ClientGone(Exception):
    """The caller went away; nothing more can be sent to it."""


def _has_dot_segment(path: str) -> bool:
    """True when any segment is '.' or '..' raw, percent-encoded, or double-encoded."""
    for candidate in (path, unquote(path), unquote(unquote(path))):
        for seg in candidate.split("/"):
            if seg in (".", "..") or seg.startswith(("..\\", ".\\")):
                return True
    return False


def json_error(status: int, error: str, *, route: str | None, rid: str | None) -> web.Response:
    body = json.dumps({"error": error, "route": route, "request_id": rid}).encode()
    headers = {"Content-Type": "application/json"}
    if rid is not None:
        headers[REQUEST_ID] = rid
        headers[CLIENT_REQUEST_ID] = rid
    return web.Response(status=status, body=body, headers=headers)


def _classify(exc: BaseException) -> tuple[int, str, str]:
    """(status, metric kind, reason) for an upstream failure; the reasons are fixed texts (proxy/upstream.py)."""
    if isinstance(exc, UpstreamError):
        return exc.status, exc.kind, exc.reason
    if isinstance(exc, TimeoutError):
        return 504, "timeout", "upstream timed out"
    return 502, "protocol", "upstream exchange failed"


class _BodyTooLarge(Exception):
    """A body without Content-Length grew past limits.max_body_bytes."""


async def _read_body(request: web.BaseRequest, limit: int, max_body: int) -> bytes | _BodyStream | None:
    """The request body to send: bytes when it fits the retry buffer (so a retry can resend it), else a stream."""
    if not request.body_exists:
        return None
    content = request.content
    length = request.content_length
    if length is not None and length <= limit:
        try:
            return await content.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise _ClientGone from exc
    prefix = b""
    if length is None:  # chunked: buffer while it stays small enough
        buf = bytearray()
        while len(buf) <= limit:
            chunk = await content.readany()
            if not chunk:
                return bytes(buf)
            buf += chunk
            if max_body and len(buf) > max_body:
                raise _BodyTooLarge
        prefix = bytes(buf)
    return _BodyStream(prefix, content, max_body)


class _BodyStream:
    """A request body passed on as it arrives; one without Content-Length is cut off past `max_body`."""

    def __init__(self, prefix: bytes, content: aiohttp.StreamReader, max_body: int) -> None:
        self._prefix = prefix
        self._content = content
        self._max_body = max_body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        total = len(self._prefix)
        if self._prefix:
            yield self._prefix
        while True:
            chunk = await self._content.readany()
            if not chunk:
                return
            total += len(chunk)
            if self._max_body and total > self._max_body:
                raise _BodyTooLarge
            yield chunk


class ProxyHandler:
    """The single handler of the proxy port."""

    def __init__(
        self,
        *,
        router: Router,
        metrics: Metrics,
        access_log: AccessLog | None,
        limits: Limits | None = None,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.access_log = access_log
        self.limits = limits or Limits()
        self.in_flight = 0

    def _reject(self, status: int, error: str, reason: str, *, route: str | None, rid: str | None) -> web.Response:
        self.metrics.rejected.labels(reason).inc()
        return json_error(status, error, route=route, rid=rid or new_request_id())

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        limits = self.limits
        if getattr(request.protocol, "over_limit", False):
            refused = self._reject(503, "too many open connections to the proxy", "connections", route=None, rid=None)
            refused.headers["Retry-After"] = "1"
            refused.force_close()
            return refused
        if sum(len(k) + len(v) + 4 for k, v in request.raw_headers) > limits.max_header_bytes:
            return self._reject(431, "request header block too large", "too_large", route=None, rid=None)
        if limits.max_body_bytes and (request.content_length or 0) > limits.max_body_bytes:
            refused = self._reject(413, "request body too large", "too_large", route=None, rid=None)
            refused.force_close()  # do not read a body that will not be forwarded
            return refused
        raw = request.raw_path
        if request.method == "CONNECT":
            return self._reject(
                405, "CONNECT is not supported; this is not an open proxy", "connect", route=None, rid=None
            )
        if not raw.startswith("/"):
            return self._reject(
                400,
                "only origin-form request targets are served; this is not an open proxy",
                "absolute_form",
                route=None,
                rid=None,
            )
        path, mark, query = raw.partition("?")
        query = mark + query
        rid = request_id(request.headers)
        if rid is None:
            return self._reject(
                400, "invalid x-ms-client-request-id or x-request-id header", "request_id", route=None, rid=None
            )
        if ("." in path or "%" in path) and _has_dot_segment(path):
            return self._reject(400, "dot segments are not allowed in the path", "dot_segment", route=None, rid=rid)
        rt = self.router.match(path)
        if rt is None:
            return self._reject(404, "no route matches this path", "no_route", route=None, rid=rid)
        rm = rt.metrics
        start = time.perf_counter()
        rm.active += 1
        self.in_flight += 1
        status = 0
        sent = 0
        upstream_s = 0.0
        try:
            response, status, sent, upstream_s = await self._forward(request, rt, path, query, rid)
        finally:
            rm.active -= 1
            self.in_flight -= 1
            elapsed = time.perf_counter() - start
            rm.request_done(request.method, status, elapsed)
            if self.access_log is not None:
                self.access_log.request(
                    route=rt.name,
                    method=request.method,
                    path=path,
                    status=status,
                    seconds=elapsed,
                    request_id=rid,
                    bytes_in=request.content_length,
                    bytes_out=sent,
                    upstream_seconds=upstream_s,
                )
        return response

    async def _forward(self, request: web.BaseRequest, rt: RouteRuntime, path: str, query: str, rid: str) -> _Outcome:
        """Do the exchange; returns (response, status for metrics and logs, bytes sent)."""
        cfg = rt.config
        cred = rt.provider.current
        if cred is None:
            _ready, why = rt.provider.readiness()
            response = json_error(503, f"route has no usable credential: {why}", route=rt.name, rid=rid)
            response.headers["Retry-After"] = str(rt.provider.retry_after())
            return response, 503, 0, 0.0
        try:
            body = await _read_body(request, cfg.retry_buffer_bytes, self.limits.max_body_bytes)
        except (_ClientGone, ConnectionError, aiohttp.ClientPayloadError):
            return self._client_gone(rt, rid, "request body")
        except _BodyTooLarge:
            return self._too_large(rt, rid)
        url = rt.target(path, query)
        headers = upstream_request_headers(
            request.headers,
            credential=(cred.header, cred.value),
            keep_caller_credential=cfg.keep_caller_credential,
            rid=rid,
            deployment=cfg.deployment,
        )
        if isinstance(body, bytes):
            headers["Content-Length"] = str(len(body))
        elif body is not None and "Content-Length" not in headers:
            headers["Transfer-Encoding"] = "chunked"
        caller_credential = cfg.keep_caller_credential and cred.header in request.headers
        pool = rt.pool
        assert pool is not None
        try:
            started = time.perf_counter()
            upstream = await pool.request(request.method, url, headers, body)
            if upstream.status in (401, 403):
                rt.metrics.auth_failures[str(upstream.status)].inc()
            if upstream.status == 401 and not caller_credential:
                upstream = await self._after_401(request, rt, upstream, cred, headers, url, body)
        except _BodyTooLarge:
            return self._too_large(rt, rid)
        except (_ClientGone, UpstreamError, ConnectionError, aiohttp.ClientPayloadError) as exc:
            if self._caller_gone(request) and not isinstance(exc, UpstreamError):
                return self._client_gone(rt, rid, "request body")
            return self._upstream_failed(rt, rid, exc)
        try:
            return await self._relay(request, rt, upstream, rid, time.perf_counter() - started)
        finally:
            upstream.release()

    async def _after_401(
        self,
        request: web.BaseRequest,
        rt: RouteRuntime,
        upstream: UpstreamResponse,
        sent: Credential,
        headers: CIMultiDict[str],
        url: str,
        body: bytes | _BodyStream | None,
    ) -> UpstreamResponse:
        """Switch to the other credential; resend once when the body was buffered (a stream cannot be resent)."""
        other = await rt.provider.unauthorized(sent)
        if other is None or other is sent or not (body is None or isinstance(body, bytes)):
            return upstream
        try:
            await upstream.read()  # drain the small 401 body so the connection is reused
        finally:
            upstream.release()
        headers[other.header] = other.value
        rt.metrics.retries.inc()
        pool = rt.pool
        assert pool is not None
        retried = await pool.request(request.method, url, headers, body)
        if retried.status in (401, 403):
            rt.metrics.auth_failures[str(retried.status)].inc()
        return retried

    async def _relay(
        self, request: web.BaseRequest, rt: RouteRuntime, upstream: UpstreamResponse, rid: str, waited: float
    ) -> _Outcome:
        headers = downstream_response_headers(upstream.raw_headers, rid=rid)
        if upstream.complete and request.method != "HEAD" and upstream.status not in (204, 304):
            # The whole answer came with its head (most scoring answers): one buffered write, no streaming.
            body = upstream.body_now()
            return (
                web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=body),
                upstream.status,
                len(body),
                waited,
            )
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        sent = 0
        try:
            await response.prepare(request)
            while True:
                chunk = await upstream.read_chunk()
                if not chunk:
                    break
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
        except ConnectionError:
            self._client_gone(rt, rid, "response body")
            upstream.close()
            return response, 499, sent, waited
        except UpstreamError as exc:
            # The answer has started: the only honest signal left is to cut the caller's connection.
            self._count_failure(rt, rid, exc, "upstream_failed_mid_response", bytes_sent=sent)
            upstream.close()
            if request.transport is not None:
                request.transport.close()
            return response, 502, sent, waited
        return response, upstream.status, sent, waited

    def _too_large(self, rt: RouteRuntime, rid: str) -> _Outcome:
        """The body grew past the limit while streaming: the upstream request is abandoned, never completed."""
        response = self._reject(413, "request body too large", "too_large", route=rt.name, rid=rid)
        response.force_close()
        return response, 413, 0, 0.0

    def _upstream_failed(self, rt: RouteRuntime, rid: str, exc: BaseException) -> _Outcome:
        status, reason = self._count_failure(rt, rid, exc, "upstream_failed")
        return json_error(status, reason, route=rt.name, rid=rid), status, 0, 0.0

    @staticmethod
    def _count_failure(rt: RouteRuntime, rid: str, exc: BaseException, name: str, **extra: object) -> tuple[int, str]:
        """Classify an upstream failure, count it and log it once; returns (status, reason)."""
        status, kind, reason = _classify(exc)
        rt.metrics.upstream_errors[kind].inc()
        event(
            log,
            logging.WARNING,
            name,
            route=rt.name,
            request_id=rid,
            kind=kind,
            reason=reason,
            error_type=type(exc).__name__,
            **extra,
        )
        return status, reason

    @staticmethod
    def _caller_gone(request: web.BaseRequest) -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    def _client_gone(self, rt: RouteRuntime, rid: str, during: str) -> _Outcome:
        rt.metrics.disconnects.inc()
        event(log, logging.DEBUG, "client_disconnected", route=rt.name, request_id=rid, during=during)
        # 499 (client closed request) is only recorded; nothing reaches the caller.
        return web.Response(status=499), 499, 0, 0.0


class _ProxyRequestHandler(web.RequestHandler):
    over_limit = False  # accepted beyond limits.max_connections: its request gets 503 and the connection closes

    def data_received(self, data: bytes) -> None:
        """aiohttp drops every byte that arrives once shutdown began (close() or shutdown()), even the rest of the
        body of the request being handled, so an upload in flight at SIGTERM would stall until the grace period
        ends. While a request is in progress its bytes are still fed; no new request is started either way."""
        if self._request_in_progress and (self._close or self._force_close):
            closing = (self._close, self._force_close)
            self._close = self._force_close = False
            try:
                super().data_received(data)
            finally:
                self._close, self._force_close = closing
            return
        super().data_received(data)

    """aiohttp's connection handler with the proxy's answer to unparsable requests.

    aiohttp's HTTP parser refuses request smuggling and malformed messages (Content-Length with
    Transfer-Encoding, duplicate Content-Length, obsolete line folding, bare CR or LF, bad chunk sizes, NUL in a
    header, oversized headers) before any handler runs. Its default answer is plain text and an error-level log
    line with a traceback; the proxy answers with its JSON error and a request id, closes the connection, and
    logs one line with the parser's reason (never the offending bytes, which may hold a credential).
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer has started; the connection is closed instead")
        status, reason = parse_error(exc, status)
        rid = new_request_id()
        server = self._manager
        if isinstance(server, ProxyServer):
            server.metrics.rejected.labels("too_large" if status in (414, 431) else "bad_http").inc()
        event(log, logging.INFO, "bad_request", status=status, reason=reason, request_id=rid)
        response = json_error(status, f"bad request: {reason}", route=None, rid=rid)
        response.force_close()
        return response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._manager
        if isinstance(server, ProxyServer) and len(server.connections) > server.max_connections:
            self.over_limit = True


_REQUEST_LINE = re.compile(rb"^[A-Z]+ ")
# Fixed reasons: the parser's own messages quote the offending bytes, which may hold a caller's credential.
_PARSE_REASONS: tuple[tuple[type[BaseException], str, str], ...] = (
    (http_exceptions.InvalidHeader, "", "invalid header"),
    (http_exceptions.BadHttpMethod, "", "invalid method"),
    (http_exceptions.BadStatusLine, "", "invalid request line"),
    (http_exceptions.InvalidURLError, "", "invalid request target"),
    (http_exceptions.TransferEncodingError, "", "invalid chunked body"),
    (http_exceptions.ContentLengthError, "", "body shorter than its Content-Length"),
    (http_exceptions.BadHttpMessage, "Duplicate", "duplicate header"),
    (http_exceptions.BadHttpMessage, "Invalid header", "invalid header"),
    (http_exceptions.BadHttpMessage, "Bad line ending", "bad line ending, expected CRLF"),
    (http_exceptions.BadHttpMessage, "Missing 'Host'", "missing Host header"),
    (http_exceptions.BadHttpMessage, "Request has invalid `Transfer-Encoding`", "invalid Transfer-Encoding"),
    (http_exceptions.BadHttpMessage, "Data after `Connection: close`", "data after Connection: close"),
)


def parse_error(exc: BaseException | None, status: int) -> tuple[int, str]:
    """(status, reason) for a request the parser refused; the reason never quotes the request's bytes."""
    if isinstance(exc, http_exceptions.LineTooLong):
        line = exc.args[0] if exc.args else b""
        if isinstance(line, bytearray) or (isinstance(line, bytes) and _REQUEST_LINE.match(line)):
            return 414, "request line too long"  # the C parser reports the target as a bytearray
        return 431, "header field too large"
    text = str(getattr(exc, "message", "") or "")
    if text.startswith("Too many headers"):
        return 431, "too many header fields"
    for kind, prefix, reason in _PARSE_REASONS:
        if isinstance(exc, kind) and text.startswith(prefix):
            return status, reason
    return status, "malformed request"


class ProxyServer(web.Server):
    """The proxy port's low-level server: one handler, JSON answers to requests that do not parse, and the
    caller-facing limits (header size and count, idle and slow-head timeout, open connections)."""

    def __init__(self, handler: ProxyHandler, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(
            handler,
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
            keepalive_timeout=limits.client_timeout_seconds,
            **kwargs,
        )
        self.metrics = handler.metrics
        self.max_connections = limits.max_connections

    def __call__(self) -> web.RequestHandler:
        return _ProxyRequestHandler(self, loop=self._loop, **self._kwargs)
