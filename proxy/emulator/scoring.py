"""The scoring front end: checks the caller's credential, picks a deployment, streams the exchange to its backend.

It plays azureml-fe (v1 AKS) and the managed online endpoint gateway (v2). The credential depends on the
service's auth mode: one of its keys (`key`), an AML token issued by the control plane for this service
(`aml_token`), or an Entra ID token for `https://ml.azure.com` (`aad_token`); tokens are checked against the
emulator's clock. The backend behind it (azmlinfsrv or the echo app) does no authentication of its own, exactly
as in AML. This module does not know about key regeneration: it reads the current `Service` from the state on
every request. `forward` is shared with the ML Server stand-in.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.emulator import faults
from proxy.emulator.dates import use_clock_for_date
from proxy.emulator.state import EmulatorState, Fault, Service
from proxy.emulator.tokens import TokenRejected

log = logging.getLogger(__name__)

DEPLOYMENT_HEADER = "azureml-model-deployment"
CHUNK_SIZE = 64 * 1024
V1_PREFIX = "/api/v1/service/"

# Headers that describe one hop, never the message; plus the ones the front end owns (Host, Authorization).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROP = _HOP_BY_HOP | {"host", "authorization", "expect"}
_RESPONSE_DROP = _HOP_BY_HOP

STATE = web.AppKey("emulator_scoring_state", EmulatorState)
DEFAULT_SERVICE = web.AppKey("emulator_scoring_default_service", str)
CLIENT = web.AppKey("emulator_scoring_client", aiohttp.ClientSession)


def create_scoring_app(state: EmulatorState, *, default_service: str | None = None) -> web.Application:
    """The front end: `/api/v1/service/{name}/...` for v1 services, and every other path for `default_service`."""
    app = web.Application()
    app[STATE] = state
    use_clock_for_date(app, state.now)
    app.router.add_route("*", "/api/v1/service/{name}", _handle_v1)
    app.router.add_route("*", "/api/v1/service/{name}/{tail:.*}", _handle_v1)
    if default_service is not None:
        app[DEFAULT_SERVICE] = default_service
        app.router.add_route("*", "/{tail:.*}", _handle_default)
    app.cleanup_ctx.append(_client_session)
    return app


def backend_session() -> aiohttp.ClientSession:
    """A client session fit for forwarding: no decompression, no cookies, no headers of its own."""
    return aiohttp.ClientSession(
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        cookie_jar=aiohttp.DummyCookieJar(),  # a shared jar would leak one caller's cookies to the next
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
    )


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    async with backend_session() as session:
        app[CLIENT] = session
        yield


def message(status: int, text: str) -> web.Response:
    """The front end's error shape."""
    return web.json_response({"message": text}, status=status)


async def _handle_v1(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    service = request.app[STATE].services.get(name)
    if service is None or service.api != "v1":
        return message(404, f"Service {name!r} was not found.")
    # The raw path keeps the caller's percent-encoding; split off /api/v1/service/<name>.
    parts = request.rel_url.raw_path.split("/", 5)
    tail = "/" + parts[5] if len(parts) > 5 else "/"
    return await _handle(request, service, tail)


async def _handle_default(request: web.Request) -> web.StreamResponse:
    name = request.app[DEFAULT_SERVICE]
    service = request.app[STATE].services.get(name)
    if service is None:
        return message(404, f"Service {name!r} was not found.")
    return await _handle(request, service, request.rel_url.raw_path)


def presented_bearer(headers: CIMultiDictProxy[str]) -> str | None:
    """The credential of the one `Authorization: Bearer <credential>` header; None when absent or malformed."""
    values = headers.getall("Authorization", [])
    if len(values) != 1:
        return None
    scheme, _, key = values[0].strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    return key


async def _handle(request: web.Request, service: Service, tail: str) -> web.StreamResponse:
    state = request.app[STATE]
    fault = state.take_fault("scoring", service.name, service.region)
    early = await faults.before_handler(request, fault, message)
    if early is not None:
        return early

    # Read the service again: a regeneration may have happened while a delay fault slept.
    current = state.services.get(service.name, service)
    denied = _check_credential(state, current, request.headers)
    if denied is not None:
        return denied

    deployment = request.headers.get(DEPLOYMENT_HEADER)
    if deployment is None:
        deployment = current.default_deployment
    backend = current.deployments.get(deployment)
    if backend is None:
        return message(404, f"Deployment {deployment!r} was not found for service {current.name!r}.")
    return await forward(
        request,
        session=request.app[CLIENT],
        backend=backend,
        tail=tail,
        what=f"deployment {deployment!r}",
        fault=fault,
        response_headers={DEPLOYMENT_HEADER: deployment},
    )


_TOKEN_REJECTIONS = {
    "expired": "The token has expired.",
    "not_yet_valid": "The token is not valid yet.",
}


def _check_credential(state: EmulatorState, service: Service, headers: CIMultiDictProxy[str]) -> web.Response | None:
    """None when the request carries this service's credential; else the 401 to send (never quoting it)."""
    kind = "key" if service.auth_mode == "key" else "token"
    if "Authorization" not in headers:
        return message(401, f"Authorization header is missing; send 'Authorization: Bearer <{kind}>'.")
    presented = presented_bearer(headers)
    if presented is None:
        return message(401, f"Authorization header is malformed; send 'Authorization: Bearer <{kind}>'.")
    if service.auth_mode == "key":
        if not service.accepts_key(presented):
            return message(401, "The key is not valid for this service.")
        return None
    try:
        state.check_scoring_token(service, presented)
    except TokenRejected as exc:
        return message(401, _TOKEN_REJECTIONS.get(exc.reason, "The token is invalid for this service."))
    return None


def _request_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = _REQUEST_DROP | _connection_tokens(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    return {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }


async def forward(
    request: web.Request,
    *,
    session: aiohttp.ClientSession,
    backend: str,
    tail: str,
    what: str,
    fault: Fault | None,
    response_headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Stream `request` to `backend` + `tail` (query kept) and the answer back; `what` names the backend in errors.

    Authorization, Host and hop-by-hop headers stay here; `response_headers` are added to the answer.
    """
    query = request.rel_url.raw_query_string
    url = URL(backend.rstrip("/") + tail + (f"?{query}" if query else ""), encoded=True)
    body = request.content if request.body_exists else None
    try:
        upstream = await session.request(
            request.method,
            url,
            headers=_request_headers(request.headers),
            data=body,
            allow_redirects=False,
        )
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        log.info("backend %s for %s unreachable: %s", url.origin(), what, type(exc).__name__)
        return message(502, f"The backend of {what} could not be reached.")

    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        drop = _RESPONSE_DROP | _connection_tokens(upstream.headers)
        for name, value in upstream.headers.items():
            if name.lower() not in drop:
                response.headers.add(name, value)
        for name, value in (response_headers or {}).items():
            response.headers[name] = value
        await response.prepare(request)
        try:
            await faults.write_body(response, upstream.content.iter_chunked(CHUNK_SIZE), fault)
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            # Headers are gone already, so a truncated body must look truncated: drop the connection.
            log.info("stream for %s broke: %s", what, type(exc).__name__)
            if request.transport is not None:
                request.transport.abort()
        return response
    finally:
        upstream.release()
