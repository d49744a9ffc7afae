"""The catch-all proxy handler: match a route, stream the request upstream with the route's credential, stream
the answer back. One retry with the other credential after a 401 when the body could be buffered.

What this module does not do: parse HTTP or hold connections (server.py for callers, upstream.py for upstreams),
load credentials (credentials/), decide readiness (health.py), wire apps (app.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote

from multidict import CIMultiDict

from proxy.config.settings import Limits, Route
from proxy.credentials.base import Credential, CredentialProvider
from proxy.headers import (
    CLIENT_REQUEST_ID,
    REQUEST_ID,
    downstream_response_headers,
    http_date,
    new_request_id,
    request_id,
    upstream_request_headers,
)
from proxy.logs import AccessLog, event
from proxy.metrics import Metrics, RouteMetrics
from proxy.server import DEFERRED, CallerGone, Deferred, Refused, Request, RequestBody
from proxy.upstream import IDEMPOTENT, UpstreamError, UpstreamPool, UpstreamResponse, pool_for

log: Final = logging.getLogger("aml_auth_proxy.forwarding")


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


# (status for metrics and logs, bytes sent, seconds waiting for the upstream's answer headers)
_Outcome = tuple[int, int, float]
HeadersAndBody = tuple[list[tuple[str, str]], bytes]


def _has_dot_segment(path: str) -> bool:
    """True when any segment is '.' or '..' raw, percent-encoded, or double-encoded."""
    for candidate in (path, unquote(path), unquote(unquote(path))):
        for seg in candidate.split("/"):
            if seg in (".", "..") or seg.startswith(("..\\", ".\\")):
                return True
    return False


def json_error(error: str, *, route: str | None, rid: str | None) -> HeadersAndBody:
    """The headers and body of the proxy's own error answers."""
    body = json.dumps({"error": error, "route": route, "request_id": rid}).encode()
    headers = [("Content-Type", "application/json"), ("Date", http_date())]
    if rid is not None:
        headers += ((REQUEST_ID, rid), (CLIENT_REQUEST_ID, rid))
    return headers, body


def _classify(exc: BaseException) -> tuple[int, str, str]:
    """(status, metric kind, reason) for an upstream failure; the reasons are fixed texts (proxy/upstream.py)."""
    if isinstance(exc, UpstreamError):
        return exc.status, exc.kind, exc.reason
    if isinstance(exc, TimeoutError):
        return 504, "timeout", "upstream timed out"
    return 502, "protocol", "upstream exchange failed"


# Bodies up to this size are sent from the caller connection's callback. Larger ones go on in a task: written from
# the callback, a 64 KiB body cost about 5% more CPU per request at saturation (interleaved runs), the upstream
# on the same core waking for each request instead of for a batch of them.
_SEND_NOW_MAX_BODY: Final = 16 * 1024


class _Unread:
    """The request body has not been read yet (the slow path reads it)."""


_UNREAD: Final = _Unread()


def _sends_callers_credential(rt: RouteRuntime, cred: Credential, request: Request) -> bool:
    """The caller's own credential went upstream (keep_caller_credential): its 401 is passed on, not retried."""
    return rt.config.keep_caller_credential and cred.header in request.headers


class _InFlight:
    """A request sent from the handler without a task, waiting for the upstream connection's callback."""

    __slots__ = ("body", "cred", "handler", "headers", "path", "request", "rid", "rt", "start", "url")

    def __init__(
        self,
        handler: ProxyHandler,
        request: Request,
        rt: RouteRuntime,
        path: str,
        rid: str,
        start: float,
        cred: Credential,
        headers: CIMultiDict[str],
        url: str,
        body: bytes | None,
    ) -> None:
        self.handler = handler
        self.request = request
        self.rt = rt
        self.path = path
        self.rid = rid
        self.start = start
        self.cred = cred
        self.headers = headers
        self.url = url
        self.body = body

    def answered(self, upstream: UpstreamResponse) -> None:
        self.handler._answered(self, upstream)


class _BodyTooLarge(Exception):
    """A body without Content-Length grew past limits.max_body_bytes."""


async def _read_body(request: Request, limit: int, max_body: int) -> bytes | _BodyStream | None:
    """The request body to send: bytes when it fits the retry buffer (so a retry can resend it), else a stream."""
    content = request.content
    if content is None:
        return None
    length = request.content_length
    if length is not None and length <= limit:
        return await content.read_exactly(length)
    prefix = b""
    if length is None:  # chunked: buffer while it stays small enough
        buf = bytearray()
        while len(buf) <= limit:
            chunk = await content.read_any()
            if not chunk:
                return bytes(buf)
            buf += chunk
            if max_body and len(buf) > max_body:
                raise _BodyTooLarge
        prefix = bytes(buf)
    return _BodyStream(prefix, content, max_body)


class _BodyStream:
    """A request body passed on as it arrives; one without Content-Length is cut off past `max_body`."""

    def __init__(self, prefix: bytes, content: RequestBody, max_body: int) -> None:
        self._prefix = prefix
        self._content = content
        self._max_body = max_body

        self._total = 0
        self._started = False

    # An iterator class, not an async generator: mypyc does not compile async generators.
    def __aiter__(self) -> _BodyStream:
        return self

    async def __anext__(self) -> bytes:
        if not self._started:
            self._started = True
            self._total = len(self._prefix)
            if self._prefix:
                return self._prefix
        chunk = await self._content.read_any()
        if not chunk:
            raise StopAsyncIteration
        self._total += len(chunk)
        if self._max_body and self._total > self._max_body:
            raise _BodyTooLarge
        return chunk


def _count_auth_failure(rt: RouteRuntime, upstream: UpstreamResponse) -> UpstreamResponse:
    """Every upstream answer passes here once as it arrives (the first, and the retry after a 401): its 401 or 403
    is counted, whatever the proxy then does with it."""
    status = upstream.status
    if status == 401 or status == 403:
        rt.metrics.auth_failures[str(status)].inc()
    return upstream


def _is_whole(request: Request, upstream: UpstreamResponse) -> bool:
    """The whole answer came with its head and has a body to send (most scoring answers)."""
    return upstream.complete and request.method != "HEAD" and upstream.status not in (204, 304)


def _answer_whole(request: Request, upstream: UpstreamResponse, rid: str, waited: float) -> _Outcome:
    """Relay a whole answer in one buffered write, no streaming."""
    body = upstream.body_now()
    headers = downstream_response_headers(upstream.raw_headers, rid=rid)
    request.answer(upstream.status, headers, body, reason=upstream.reason, length=not upstream.has_length)
    return upstream.status, len(body), waited


class ProxyHandler:
    """The single handler of the proxy port (proxy/server.py calls it once per request)."""

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
        self._tasks: set[asyncio.Task[None]] = set()  # requests that went on in a task after a callback

    def _reject(
        self,
        request: Request,
        status: int,
        error: str,
        reason: str,
        *,
        route: str | None,
        rid: str | None,
        close: bool = False,
    ) -> None:
        self.metrics.rejected.labels(reason).inc()
        rid = rid or new_request_id()
        # One line per request the proxy refuses itself: the fixed reason and the request id, never the request.
        event(log, logging.INFO, "request_refused", status=status, reason=reason, route=route, request_id=rid)
        headers, body = json_error(error, route=route, rid=rid)
        if status == 503:
            headers.append(("Retry-After", "1"))
        request.answer(status, headers, body, close=close)

    def refusal(self, status: int, reason: str, rid: str | None = None) -> HeadersAndBody:
        """The answer to a request the server's parser refused: counted, logged once with its fixed reason (never
        the offending bytes, which may hold a credential), a JSON error with the request's id (a fresh one when
        the head itself was refused)."""
        rid = rid or new_request_id()
        self.metrics.rejected.labels("too_large" if status in (414, 431) else "bad_http").inc()
        event(log, logging.INFO, "bad_request", status=status, reason=reason, request_id=rid)
        return json_error(f"bad request: {reason}", route=None, rid=rid)

    def __call__(self, request: Request) -> Awaitable[None] | Deferred | None:
        """Answer at once (a refusal, a 503 without credential), send at once and answer from a callback
        (DEFERRED), or return the coroutine that reads the body and forwards it."""
        limits = self.limits
        if request.protocol.over_limit:
            self._reject(
                request, 503, "too many open connections to the proxy", "connections", route=None, rid=None, close=True
            )
            return None
        if limits.max_body_bytes and (request.content_length or 0) > limits.max_body_bytes:
            # The body will not be forwarded, so it is not read: the connection closes after the answer.
            self._reject(request, 413, "request body too large", "too_large", route=None, rid=None, close=True)
            return None
        raw = request.raw_path
        method = request.method
        if method == "CONNECT" or method == "TRACE":
            # CONNECT would make an open proxy; TRACE echoes the request upstream, with the injected credential.
            reason = "connect" if method == "CONNECT" else "trace"
            self._reject(
                request, 405, f"{method} is not supported; this is not an open proxy", reason, route=None, rid=None
            )
            return None
        if not raw.startswith("/"):
            self._reject(
                request,
                400,
                "only origin-form request targets are served; this is not an open proxy",
                "absolute_form",
                route=None,
                rid=None,
            )
            return None
        path, mark, query = raw.partition("?")
        query = mark + query
        rid = request_id(request.headers)
        if rid is None:
            self._reject(
                request,
                400,
                "invalid x-ms-client-request-id or x-request-id header",
                "request_id",
                route=None,
                rid=None,
            )
            return None
        if ("." in path or "%" in path) and _has_dot_segment(path):
            self._reject(request, 400, "dot segments are not allowed in the path", "dot_segment", route=None, rid=rid)
            return None
        rt = self.router.match(path)
        if rt is None:
            self._reject(request, 404, "no route matches this path", "no_route", route=None, rid=rid)
            return None
        start = time.perf_counter()
        rt.metrics.active += 1
        self.in_flight += 1
        try:
            fast = self._start(request, rt, path, query, rid, start)
        except BaseException:
            self._done(request, rt, path, rid, start, (0, 0, 0.0))
            raise
        if isinstance(fast, tuple):  # answered at once
            self._done(request, rt, path, rid, start, fast)
            return None
        return fast

    def _done(self, request: Request, rt: RouteRuntime, path: str, rid: str, start: float, outcome: _Outcome) -> None:
        """A proxied request has ended: metrics and the access log line."""
        rt.metrics.active -= 1
        self.in_flight -= 1
        status, sent, upstream_s = outcome
        elapsed = time.perf_counter() - start
        # Time to first byte: a streamed answer's head was written at head_at; a whole answer in one write just
        # now (its ttfb is the total); no answer at all (the caller went away first): none (-1).
        head_at = request.head_at
        if head_at:
            ttfb = head_at - start
        elif request.answered and status != 499:
            ttfb = elapsed
        else:
            ttfb = -1.0
        rt.metrics.request_done(request.method, status, elapsed, ttfb)
        if self.access_log is not None:
            content = request.content  # a chunked upload has no Content-Length: its bytes as received
            self.access_log.request(
                route=rt.name,
                method=request.method,
                path=path,
                status=status,
                seconds=elapsed,
                request_id=rid,
                bytes_in=request.content_length
                if request.content_length is not None or content is None
                else content.received,
                bytes_out=sent,
                upstream_seconds=upstream_s,
                ttfb_seconds=ttfb,
            )

    def _start(
        self, request: Request, rt: RouteRuntime, path: str, query: str, rid: str, start: float
    ) -> _Outcome | Awaitable[None] | Deferred:
        """The request path without a task: a request whose body (if any) has all arrived and is at most 16 KiB
        (and within the retry buffer) is sent at once on an idle keep-alive connection, and answered from the
        upstream connection's callback when the whole answer has come (`_answered`). Everything else, and every
        answer that is not simple (a 401, a streamed body, a stale connection to resend on), goes on in a task."""
        cfg = rt.config
        cred = rt.provider.current
        if cred is None:
            return self._no_credential(request, rt, rid)
        content = request.content
        body: bytes | None = None
        if content is not None:
            length = request.content_length
            if length is None or length > min(cfg.retry_buffer_bytes, _SEND_NOW_MAX_BODY):
                return self._proxied(request, rt, path, query, rid, start, _UNREAD)
            body = content.take_whole(length)
            if body is None:  # still arriving
                return self._proxied(request, rt, path, query, rid, start, _UNREAD)
        url = rt.target(path, query)
        headers = self._upstream_headers(request, cfg, cred, rid, body)
        x = _InFlight(self, request, rt, path, rid, start, cred, headers, url, body)
        pool = rt.pool
        assert pool is not None
        try:
            upstream = pool.send_now(request.method, url, headers, body, x.answered)
        except UpstreamError as exc:
            return self._upstream_failed(request, rt, rid, exc)
        if upstream is None:  # no idle connection: connect (or wait for one) in a task
            return self._proxied(request, rt, path, query, rid, start, body)
        return DEFERRED

    def _no_credential(self, request: Request, rt: RouteRuntime, rid: str) -> _Outcome:
        _ready, why = rt.provider.readiness()
        refused, text = json_error(f"route has no usable credential: {why}", route=rt.name, rid=rid)
        refused.append(("Retry-After", str(rt.provider.retry_after())))
        request.answer(503, refused, text)
        return 503, 0, 0.0

    @staticmethod
    def _upstream_headers(
        request: Request, cfg: Route, cred: Credential, rid: str, body: bytes | _BodyStream | None
    ) -> CIMultiDict[str]:
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
        return headers

    def _answered(self, x: _InFlight, upstream: UpstreamResponse) -> None:
        """The upstream's head arrived (maybe with the whole answer) or the exchange failed: answer now when the
        answer is whole and simple, else go on in a task."""
        request = x.request
        outcome: _Outcome | None = (0, 0, 0.0)
        try:
            outcome = self._answer_now(x, upstream)
        except Exception:
            upstream.close()
            request.internal_error()
        if outcome is not None:
            self._done(request, x.rt, x.path, x.rid, x.start, outcome)
            request.done()

    def _answer_now(self, x: _InFlight, upstream: UpstreamResponse) -> _Outcome | None:
        request, rt = x.request, x.rt
        if not upstream.head_done:
            error = upstream.error
            assert error is not None
            upstream.close()
            if error.before_answer and request.method in IDEMPOTENT:
                # The idle connection was stale: resend once, as UpstreamPool.request does.
                self._go_on(x, self._exchange(request, rt, x.rid, x.cred, x.headers, x.url, x.body, resend=False))
                return None
            return self._upstream_failed(request, rt, x.rid, error)
        _count_auth_failure(rt, upstream)
        if _is_whole(request, upstream) and (upstream.status != 401 or _sends_callers_credential(rt, x.cred, request)):
            outcome = _answer_whole(request, upstream, x.rid, time.perf_counter() - x.start)
            upstream.release()
            return outcome
        exchange = self._exchange(request, rt, x.rid, x.cred, x.headers, x.url, x.body, first=upstream, started=x.start)
        self._go_on(x, exchange)
        return None

    def _go_on(self, x: _InFlight, exchange: Coroutine[None, None, _Outcome]) -> None:
        task = asyncio.get_running_loop().create_task(self._finish(x, exchange))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, x: _InFlight, exchange: Coroutine[None, None, _Outcome]) -> None:
        request = x.request
        outcome: _Outcome = (0, 0, 0.0)
        try:
            outcome = await exchange
        except Exception:
            request.internal_error()
        finally:
            self._done(request, x.rt, x.path, x.rid, x.start, outcome)
            request.done()

    async def _proxied(
        self,
        request: Request,
        rt: RouteRuntime,
        path: str,
        query: str,
        rid: str,
        start: float,
        body: bytes | _Unread | None,
    ) -> None:
        outcome: _Outcome = (0, 0, 0.0)
        try:
            outcome = await self._forward(request, rt, path, query, rid, body)
        finally:
            self._done(request, rt, path, rid, start, outcome)

    async def _forward(
        self, request: Request, rt: RouteRuntime, path: str, query: str, rid: str, read: bytes | _Unread | None
    ) -> _Outcome:
        """Read the body (unless `read` holds it), do the exchange and answer; returns (status for metrics and
        logs, bytes sent, seconds waited)."""
        cfg = rt.config
        cred = rt.provider.current
        if cred is None:
            return self._no_credential(request, rt, rid)
        body: bytes | _BodyStream | None
        if isinstance(read, _Unread):
            try:
                body = await _read_body(request, cfg.retry_buffer_bytes, self.limits.max_body_bytes)
            except ConnectionError:
                return self._client_gone(rt, rid, "request body")
            except Refused as refused:
                return self._refused(request, refused, rid)
            except _BodyTooLarge:
                return self._too_large(request, rt, rid)
        else:
            body = read
        url = rt.target(path, query)
        headers = self._upstream_headers(request, cfg, cred, rid, body)
        return await self._exchange(request, rt, rid, cred, headers, url, body)

    async def _exchange(
        self,
        request: Request,
        rt: RouteRuntime,
        rid: str,
        cred: Credential,
        headers: CIMultiDict[str],
        url: str,
        body: bytes | _BodyStream | None,
        *,
        resend: bool = True,
        first: UpstreamResponse | None = None,
        started: float = 0.0,
    ) -> _Outcome:
        """Send (unless `first` is the answer already received), retry once with the other credential after a
        401, and relay the answer. `resend`: a stale keep-alive connection may be resent on once."""
        caller_credential = _sends_callers_credential(rt, cred, request)
        pool = rt.pool
        assert pool is not None
        try:
            if first is None:
                started = time.perf_counter()
                upstream = _count_auth_failure(
                    rt, await pool.request(request.method, url, headers, body, resend_if_stale=resend)
                )
            else:
                upstream = first  # counted when it arrived
            if upstream.status == 401 and not caller_credential:
                upstream = await self._after_401(request, rt, upstream, cred, headers, url, body)
        except _BodyTooLarge:
            return self._too_large(request, rt, rid)
        except Refused as refused:
            return self._refused(request, refused, rid)
        except (UpstreamError, ConnectionError) as exc:
            if isinstance(exc, CallerGone) or (self._caller_gone(request) and not isinstance(exc, UpstreamError)):
                return self._client_gone(rt, rid, "request body")
            return self._upstream_failed(request, rt, rid, exc)
        try:
            return await self._relay(request, rt, upstream, rid, time.perf_counter() - started)
        finally:
            upstream.release()

    async def _after_401(
        self,
        request: Request,
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
        if upstream.complete:
            upstream.body_now()  # the 401's body came whole with its head: the connection can be reused
            upstream.release()
        else:
            upstream.close()  # never read a 401 body of unknown size before the retry: drop the connection
        headers[other.header] = other.value
        rt.metrics.retries.inc()
        pool = rt.pool
        assert pool is not None
        retried = await pool.request(request.method, url, headers, body)
        return _count_auth_failure(rt, retried)

    async def _relay(
        self, request: Request, rt: RouteRuntime, upstream: UpstreamResponse, rid: str, waited: float
    ) -> _Outcome:
        if _is_whole(request, upstream):
            return _answer_whole(request, upstream, rid, waited)
        headers = downstream_response_headers(upstream.raw_headers, rid=rid)
        status = upstream.status
        has_body = request.method != "HEAD" and status not in (204, 304)
        # A caller that hangs up while the relay waits for the upstream's next piece (an event stream's pause) is
        # noticed at once: the hang-up cancels this task, and the upstream request is closed below.
        conn = request.protocol
        task = asyncio.current_task()
        assert task is not None
        if not conn.watch_hang_up(task.cancel, endless=has_body and not upstream.has_length):
            upstream.close()
            return self._client_gone(rt, rid, "response head")
        sent = 0
        try:
            try:
                await request.start(status, headers, reason=upstream.reason, body=has_body, length=upstream.has_length)
            except ConnectionError:
                upstream.close()
                return self._client_gone(rt, rid, "response body")
            # Each piece goes to the caller as it arrives: read_chunk returns what came, write does not wait for more.
            while True:
                chunk = await upstream.read_chunk()
                if not chunk:
                    break
                await request.write(chunk)
                sent += len(chunk)
            await request.end()
        except ConnectionError:
            self._client_gone(rt, rid, "response body")
            upstream.close()
            return 499, sent, waited
        except UpstreamError as exc:
            # The answer has started: the only honest signal left is to cut the caller's connection.
            self._count_failure(rt, rid, exc, "upstream_failed_mid_response", bytes_sent=sent)
            upstream.close()
            request.abort()
            return 502, sent, waited
        except asyncio.CancelledError:
            if not conn.hung_up:
                raise  # not the caller's hang-up
            task.uncancel()
            self._client_gone(rt, rid, "response body")
            upstream.close()
            return 499, sent, waited
        finally:
            conn.unwatch_hang_up()
        return status, sent, waited

    def _refused(self, request: Request, refused: Refused, rid: str) -> _Outcome:
        """The caller's body broke its framing while it was read: the upstream exchange is abandoned."""
        if not request.answered:
            headers, body = self.refusal(refused.status, refused.reason, rid)
            request.answer(refused.status, headers, body, close=True)
        return refused.status, 0, 0.0

    def _too_large(self, request: Request, rt: RouteRuntime, rid: str) -> _Outcome:
        """The body grew past the limit while streaming: the upstream request is abandoned, never completed."""
        self._reject(request, 413, "request body too large", "too_large", route=rt.name, rid=rid, close=True)
        return 413, 0, 0.0

    def _upstream_failed(self, request: Request, rt: RouteRuntime, rid: str, exc: BaseException) -> _Outcome:
        status, reason = self._count_failure(rt, rid, exc, "upstream_failed")
        headers, body = json_error(reason, route=rt.name, rid=rid)
        request.answer(status, headers, body)
        return status, 0, 0.0

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
    def _caller_gone(request: Request) -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    def _client_gone(self, rt: RouteRuntime, rid: str, during: str) -> _Outcome:
        rt.metrics.disconnects.inc()
        event(log, logging.DEBUG, "client_disconnected", route=rt.name, request_id=rid, during=during)
        # 499 (client closed request) is only recorded; nothing reaches the caller.
        return 499, 0, 0.0
