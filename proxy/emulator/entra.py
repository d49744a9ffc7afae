"""Entra ID (Azure AD) stand-in: the client-credentials token endpoint, discovery, and the IMDS managed identity.

Entra app (HTTPS; azure-identity insists on an https authority):
    POST /{tenant}/oauth2/v2.0/token                        client secret or federated assertion (workload identity)
    GET  /{tenant}/v2.0/.well-known/openid-configuration     token_endpoint, issuer, jwks_uri, ...
    GET  /{tenant}/discovery/v2.0/keys                       the JWKS of the access-token key
IMDS app (plain HTTP, what AZURE_POD_IDENTITY_AUTHORITY_HOST points at):
    GET  /metadata/identity/oauth2/token?api-version=...&resource=...[&client_id=...]   with `Metadata: true`

Access tokens are RS256 JWTs for `aud` = the scope minus `/.default` (or the IMDS resource as given), issued
by `EmulatorState.issue_entra_token`. Errors follow Entra's JSON shape; the AADSTS numbers are the ones Entra
uses for the same mistake where known. Neither a secret nor an assertion is ever quoted back.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from proxy.emulator import faults
from proxy.emulator.dates import use_clock_for_date
from proxy.emulator.state import EmulatorState
from proxy.emulator.tokens import TokenRejected, scope_to_audience

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_PATH = "/{tenant}/oauth2/v2.0/token"
IMDS_TOKEN_PATH = "/metadata/identity/oauth2/token"
_NO_CACHE = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}

STATE = web.AppKey("emulator_entra_state", EmulatorState)


def create_entra_app(state: EmulatorState) -> web.Application:
    """The token endpoint and discovery documents of the one configured tenant."""
    app = web.Application()
    app[STATE] = state
    use_clock_for_date(app, state.now)
    app.router.add_post(TOKEN_PATH, _token)
    app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", _openid_configuration)
    app.router.add_get("/{tenant}/discovery/v2.0/keys", _keys)
    return app


def create_imds_app(state: EmulatorState) -> web.Application:
    """The Azure Instance Metadata Service token endpoint for the configured managed identities."""
    app = web.Application()
    app[STATE] = state
    use_clock_for_date(app, state.now)
    app.router.add_get(IMDS_TOKEN_PATH, _imds_token)
    return app


# -- errors ------------------------------------------------------------------------------------------------------


def _entra_error(request: web.Request, status: int, error: str, code: int, description: str) -> web.Response:
    """Entra's error body: `error`, `error_description` starting with AADSTSnnnn, codes and tracing ids."""
    now = request.app[STATE].now()
    timestamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    trace_id = str(uuid.uuid4())
    correlation_id = request.headers.get("client-request-id") or str(uuid.uuid4())
    text = f"AADSTS{code}: {description} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}"
    body = {
        "error": error,
        "error_description": text,
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
    }
    return web.json_response(body, status=status, headers=_NO_CACHE)


def _fault_error(request: web.Request) -> faults.ErrorBody:
    def error(status: int, text: str) -> web.Response:
        kind = (
            "temporarily_unavailable"
            if status in (429, 503)
            else "server_error"
            if status >= 500
            else "invalid_request"
        )
        return _entra_error(request, status, kind, 90033, f"A transient error has occurred. {text}")

    return error


def _imds_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


# -- token endpoint ----------------------------------------------------------------------------------------------


def _origin(request: web.Request) -> str:
    configured = request.app[STATE].entra_url
    return configured.rstrip("/") if configured else f"{request.scheme}://{request.host}"


def _tenant_error(request: web.Request) -> web.Response | None:
    tenant = request.match_info["tenant"]
    if tenant.lower() == request.app[STATE].entra.tenant.lower():
        return None
    return _entra_error(
        request,
        400,
        "invalid_request",
        90002,
        f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the "
        "correct cloud.",
    )


def _missing(request: web.Request, name: str) -> web.Response:
    return _entra_error(
        request, 400, "invalid_request", 900144, f"The request body must contain the following parameter: '{name}'."
    )


def _field(form: Any, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


async def _token(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    form = await request.post()  # empty unless the body is a form
    client_id = _field(form, "client_id")
    if client_id:
        state.entra_token_calls[client_id] += 1
    fault = state.take_fault("entra", None)
    early = await faults.before_handler(request, fault, _fault_error(request))
    if early is not None:
        return early

    denied = _tenant_error(request)
    if denied is not None:
        return denied
    grant_type = _field(form, "grant_type")
    if not grant_type:
        return _missing(request, "grant_type")
    if grant_type != "client_credentials":
        return _entra_error(
            request,
            400,
            "unsupported_grant_type",
            70003,
            f"The app requested an unsupported grant type '{grant_type}'.",
        )
    if not client_id:
        return _missing(request, "client_id")
    scope = _field(form, "scope")
    if not scope:
        return _missing(request, "scope")
    audience = scope_to_audience(scope.strip())
    if audience is None or " " in scope.strip():
        return _entra_error(
            request,
            400,
            "invalid_scope",
            1002012,
            f"The provided value for scope {scope} is not valid. Client credential flows must have a scope value "
            "with /.default suffixed to the resource identifier (application ID URI).",
        )
    directory = state.entra
    if client_id not in directory.clients and client_id not in directory.federated:
        return _entra_error(
            request,
            400,
            "unauthorized_client",
            700016,
            f"Application with identifier '{client_id}' was not found in the directory '{directory.tenant}'.",
        )

    secret = _field(form, "client_secret")
    assertion = _field(form, "client_assertion")
    if (secret is None) == (assertion is None):
        return _entra_error(
            request,
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        )
    if secret is not None:
        if not directory.secret_matches(client_id, secret):
            return _entra_error(
                request,
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret "
                f"value, not the client secret ID, for a secret added to app '{client_id}'.",
            )
    else:
        denied = _assertion_error(request, client_id, assertion or "", _field(form, "client_assertion_type"))
        if denied is not None:
            return denied

    token = state.issue_entra_token(client_id=client_id, audience=audience)
    payload: dict[str, Any] = {
        "token_type": "Bearer",
        "expires_in": token.expires_in,
        "ext_expires_in": token.expires_in,
        "access_token": token.access_token,
    }
    response = web.json_response(faults.without_fields(payload, fault, ["access_token"]), headers=_NO_CACHE)
    return await faults.finish(request, response, fault)


def _assertion_error(
    request: web.Request, client_id: str, assertion: str, assertion_type: str | None
) -> web.Response | None:
    if assertion_type != JWT_BEARER:
        return _entra_error(request, 400, "invalid_request", 700010, f"client_assertion_type must be '{JWT_BEARER}'.")
    # azure-identity sends the projected token file verbatim, trailing newline and all.
    presented = assertion.strip()
    try:
        request.app[STATE].check_client_assertion(client_id, presented)
    except TokenRejected as exc:
        if exc.reason in ("expired", "not_yet_valid"):
            return _entra_error(
                request, 401, "invalid_client", 700024, "Client assertion is not within its valid time range."
            )
        if exc.reason == "audience":
            return _entra_error(
                request,
                401,
                "invalid_client",
                700212,
                "No matching federated identity record found for presented assertion audience; "
                "expected 'api://AzureADTokenExchange'.",
            )
        if presented.count(".") != 2:
            return _entra_error(request, 400, "invalid_request", 50027, "JWT token is invalid or malformed.")
        return _entra_error(
            request,
            401,
            "invalid_client",
            70021,
            f"No matching federated identity record found for presented assertion of app '{client_id}' ({exc.detail}).",
        )
    return None


# -- discovery ---------------------------------------------------------------------------------------------------


async def _openid_configuration(request: web.Request) -> web.Response:
    denied = _tenant_error(request)
    if denied is not None:
        return denied
    origin = _origin(request)
    tenant = request.app[STATE].entra.tenant
    return web.json_response(
        {
            "issuer": f"{origin}/{tenant}/v2.0",
            "token_endpoint": f"{origin}/{tenant}/oauth2/v2.0/token",
            "authorization_endpoint": f"{origin}/{tenant}/oauth2/v2.0/authorize",
            "jwks_uri": f"{origin}/{tenant}/discovery/v2.0/keys",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
            "grant_types_supported": ["client_credentials"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "tenant_region_scope": "NA",
        }
    )


async def _keys(request: web.Request) -> web.Response:
    denied = _tenant_error(request)
    if denied is not None:
        return denied
    return web.json_response({"keys": [request.app[STATE].signing_keys.entra.jwk()]})


# -- IMDS --------------------------------------------------------------------------------------------------------


async def _imds_token(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    client_id = request.query.get("client_id") or state.entra.default_managed_identity
    if client_id:
        state.entra_token_calls[client_id] += 1
    fault = state.take_fault("entra", None)
    early = await faults.before_handler(request, fault, lambda status, text: _imds_error(status, "server_error", text))
    if early is not None:
        return early

    if request.headers.get("Metadata", "").lower() != "true":
        return _imds_error(400, "invalid_request", "Required metadata header not specified")
    if not request.query.get("api-version"):
        return _imds_error(400, "invalid_request", "Required query variable 'api-version' is missing")
    resource = request.query.get("resource")
    if not resource:
        return _imds_error(400, "invalid_request", "Required audience parameter not specified")
    other_ids = ("object_id", "msi_res_id", "mi_res_id", "principal_id")
    known = client_id is not None and client_id in state.entra.managed_identities
    if client_id is None or not known or any(name in request.query for name in other_ids):
        return _imds_error(400, "invalid_request", "Identity not found")

    token = state.issue_entra_token(client_id=client_id, audience=resource)
    # IMDS sends every number as a string.
    payload: dict[str, Any] = {
        "access_token": token.access_token,
        "client_id": client_id,
        "expires_in": str(token.expires_in),
        "expires_on": str(token.expires_on),
        "ext_expires_in": str(token.expires_in),
        "not_before": str(token.not_before),
        "resource": resource,
        "token_type": "Bearer",
    }
    response = web.json_response(faults.without_fields(payload, fault, ["access_token"]))
    return await faults.finish(request, response, fault)
