"""Microsoft Machine Learning Server (R Server 9.x operationalization) stand-in: login, refresh, revoke, scoring.

    POST   /login                  {"username","password"} -> {"token_type","access_token","expires_in",
                                                               "expires_on","refresh_token"}
    POST   /login/refreshToken     {"refreshToken"} -> a new pair; the old pair stops working at once
    DELETE /login/refreshToken?refreshToken=...   -> 200; ends that session
    *      anything else           needs `Authorization: Bearer <live access token>`; streamed to the backend

Sessions live in `identities.MLServerSessions`, expiry by the emulator's clock. Errors use ML Server's shape
`{"message","link","exceptionType"}`. `mlserver` faults apply to login and refresh only.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

from proxy.emulator import faults
from proxy.emulator.dates import use_clock_for_date
from proxy.emulator.identities import IssuedPair, MLServerSessions
from proxy.emulator.scoring import backend_session, forward, presented_bearer
from proxy.emulator.state import EmulatorState, Fault
from proxy.emulator.tokens import token_digest

STATE = web.AppKey("emulator_mlserver_state", EmulatorState)
SESSIONS = web.AppKey("emulator_mlserver_sessions", MLServerSessions)
BACKEND = web.AppKey("emulator_mlserver_backend", str)
CLIENT = web.AppKey("emulator_mlserver_client", aiohttp.ClientSession)

INVALID_CREDENTIALS = "Unauthorized (invalid credentials)"
INVALID_REFRESH = "Unauthorized (invalid or expired refresh token)"
INVALID_ACCESS = "Unauthorized (invalid or expired access token)"


def create_mlserver_app(state: EmulatorState, *, backend: str) -> web.Application:
    """ML Server in front of `backend` (a base URL); `state.mlserver` holds its users and sessions."""
    if state.mlserver is None:
        raise ValueError("state.mlserver is not set: the ML Server stand-in needs its users")
    app = web.Application()
    app[STATE] = state
    app[SESSIONS] = state.mlserver
    app[BACKEND] = backend
    use_clock_for_date(app, state.now)
    app.router.add_post("/login", _login)
    app.router.add_post("/login/refreshToken", _refresh)
    app.router.add_delete("/login/refreshToken", _revoke)
    app.router.add_route("*", "/{tail:.*}", _forward)
    app.cleanup_ctx.append(_client_session)
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    async with backend_session() as session:
        app[CLIENT] = session
        yield


def mlserver_error(status: int, text: str, exception_type: str = "UnauthorizedAccessException") -> web.Response:
    return web.json_response({"message": text, "link": "", "exceptionType": exception_type}, status=status)


def _fault_error(status: int, text: str) -> web.Response:
    return mlserver_error(status, text, "EmulatedFaultException")


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body: Any = json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _pair_response(pair: IssuedPair, fault: Fault | None) -> web.Response:
    payload: dict[str, Any] = {
        "token_type": "Bearer",
        "access_token": pair.access_token,
        "expires_in": pair.expires_in,
        "expires_on": pair.expires_on,
        "refresh_token": pair.refresh_token,
    }
    return web.json_response(faults.without_fields(payload, fault, ["access_token"]))


async def _issue(
    request: web.Request, call: str, pair_for: Callable[[dict[str, Any] | None], IssuedPair | web.Response]
) -> web.StreamResponse:
    """Login and refresh: count the call, play out an `mlserver` fault, then answer the token pair that
    `pair_for(JSON body)` issues (None for a body that is not a JSON object), or the error it returns."""
    state = request.app[STATE]
    state.mlserver_calls[call] += 1
    fault = state.take_fault("mlserver", None)
    early = await faults.before_handler(request, fault, _fault_error)
    if early is not None:
        return early
    pair = pair_for(await _json_object(request))
    if isinstance(pair, web.Response):
        return pair
    return await faults.finish(request, _pair_response(pair, fault), fault)


async def _login(request: web.Request) -> web.StreamResponse:
    sessions = request.app[SESSIONS]

    def login(body: dict[str, Any] | None) -> IssuedPair | web.Response:
        username = body.get("username") if body is not None else None
        password = body.get("password") if body is not None else None
        if not isinstance(username, str) or not isinstance(password, str):
            return mlserver_error(400, 'The body must be JSON {"username": ..., "password": ...}.', "ArgumentException")
        if not sessions.check_password(username, password):
            return mlserver_error(401, INVALID_CREDENTIALS)
        return sessions.login(username, now=request.app[STATE].now())

    return await _issue(request, "login", login)


async def _refresh(request: web.Request) -> web.StreamResponse:
    def refresh(body: dict[str, Any] | None) -> IssuedPair | web.Response:
        refresh_token = body.get("refreshToken") if body is not None else None
        if not isinstance(refresh_token, str) or not refresh_token:
            return mlserver_error(400, 'The body must be JSON {"refreshToken": ...}.', "ArgumentException")
        pair = request.app[SESSIONS].refresh(refresh_token, now=request.app[STATE].now())
        return mlserver_error(401, INVALID_REFRESH) if pair is None else pair

    return await _issue(request, "refresh", refresh)


async def _revoke(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.mlserver_calls["revoke"] += 1
    refresh_token = request.query.get("refreshToken")
    if not refresh_token:
        return mlserver_error(400, "The refreshToken query parameter is required.", "ArgumentException")
    if not request.app[SESSIONS].revoke(refresh_token):
        return mlserver_error(401, INVALID_REFRESH)
    state.mlserver_revoked.append(token_digest(refresh_token))
    return web.Response(status=200)


async def _forward(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.mlserver_calls["forward"] += 1
    presented = presented_bearer(request.headers)
    if presented is None:
        return mlserver_error(401, "Unauthorized (send 'Authorization: Bearer <access token>')")
    if request.app[SESSIONS].access_user(presented, now=state.now()) is None:
        return mlserver_error(401, INVALID_ACCESS)
    return await forward(
        request,
        session=request.app[CLIENT],
        backend=request.app[BACKEND],
        tail=request.rel_url.raw_path,
        what="the ML Server backend",
        fault=None,
    )
