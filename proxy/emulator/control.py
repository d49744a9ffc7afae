"""The AML control planes (v1 model management and v2 ARM) plus the emulator's own admin API, in one app.

Discovery: GET /discovery   (a workspace's discoveryUrl document: every AML service host is this origin)
v1 (MMS):  POST .../workspaces/{ws}/services/{name}/listkeys | regenerateKeys | token
           GET .../workspaces/{ws}/operations/{id}
           GET .../workspaces/{ws}/services/{name}   (the AKS service object, as azureml-core's AksWebservice
                                                       reads it: createdTime, scoringUri, authEnabled, ...)
v2 (ARM):  POST .../workspaces/{ws}/onlineEndpoints/{name}/listKeys | regenerateKeys | token ?api-version=...
           GET .../workspaces/{ws}/onlineEndpoints/{name}?api-version=...   (the endpoint resource)
           GET .../workspaces/{ws}/onlineEndpoints/{name}/deployments[/{deployment}]?api-version=...
               (its deployments, which azure-ai-ml's online_endpoints.get lists)
           GET /subscriptions/{sub}/providers/Microsoft.MachineLearningServices/locations/{region}
               /mfeOperationResults/{id}?api-version=...   (the Location of a regenerateKeys)
Azure OpenAI (ARM, Microsoft.CognitiveServices):
           POST /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.CognitiveServices/accounts/{name}
               /listKeys | regenerateKey ?api-version=...   (an openai service's key1/key2; regenerateKey takes
               {"keyName": "Key1" | "Key2"} and answers both keys, the new one live at once)
Admin:     /_emulator/faults, /_emulator/latency, /_emulator/clock, /_emulator/calls, /_emulator/services,
           /_emulator/mlserver/revoke-all (no auth: loopback dev tool)
           POST /_emulator/faults takes {target, action, service, region, status, retry_after, seconds, count};
           the token-time actions `expired_token` (the token expired `seconds` ago) and `exp_before_expiry` (the
           JWT's exp is `seconds` from now, earlier than the expiryOn reported) apply to target "token" only.

Both planes take `Authorization: Bearer <t>` where t is one of the configured static control-plane tokens or an
unexpired Entra stand-in token for Azure Resource Manager (any of the `ARM_AUDIENCES` spellings).

Key regeneration is synchronous here: the new key is live before the 202 goes out, every v1 operation reads
"Succeeded" on the first poll and every v2 Location answers 200 on the first poll. The token operation issues an
AML token (see `EmulatorState.issue_aml_token`) for services whose auth mode is aml_token. Each plane answers
errors in its own shape; a v1 path finds only v1 services and a v2 path only v2 ones.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web

from proxy.emulator import faults
from proxy.emulator.dates import use_clock_for_date
from proxy.emulator.state import EmulatorState, Fault, KeyType, Operation, Service
from proxy.emulator.tokens import ARM_AUDIENCES, TokenRejected

Plane = Literal["v1", "v2"]
BaseUrl = str | Callable[[], str] | None
ScoringUrlFor = Callable[[str], str | None]

_PROVIDER = "providers/Microsoft.MachineLearningServices"
V1_WORKSPACE = "/modelmanagement/v1.0/subscriptions/{sub}/resourceGroups/{rg}/" + _PROVIDER + "/workspaces/{ws}"
V2_WORKSPACE = "/subscriptions/{sub}/resourceGroups/{rg}/" + _PROVIDER + "/workspaces/{ws}"
V2_OPERATION = "/subscriptions/{sub}/" + _PROVIDER + "/locations/{region}/mfeOperationResults/{op}"
OPENAI_ACCOUNT = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.CognitiveServices/accounts/{name}"

STATE = web.AppKey("emulator_control_state", EmulatorState)
BASE_URL: web.AppKey[BaseUrl] = web.AppKey("emulator_control_base_url")
SCORING_URL_FOR: web.AppKey[ScoringUrlFor] = web.AppKey("emulator_control_scoring_url_for")

_FAULT_FIELDS = frozenset({"target", "service", "region", "action", "status", "retry_after", "seconds", "count"})


def create_control_app(
    state: EmulatorState, *, base_url: BaseUrl = None, scoring_url_for: ScoringUrlFor | None = None
) -> web.Application:
    """Both control planes and the admin API.

    `base_url` is the public origin put into Operation-Location and Location headers (a string, or a callable
    read per request, handy when the port is only known after binding); None means the request's own origin.
    `scoring_url_for(name)` gives a service's scoring base URL for the service objects (`scoringUri` is that
    plus `/score`); without it `scoringUri` is null.
    """
    app = web.Application()
    app[STATE] = state
    app[BASE_URL] = base_url
    app[SCORING_URL_FOR] = scoring_url_for or (lambda name: None)
    use_clock_for_date(app, state.now)
    app.router.add_get("/discovery", _discovery)
    app.router.add_get(V1_WORKSPACE + "/services/{name}", _v1_service_object)
    app.router.add_post(V1_WORKSPACE + "/services/{name}/{action}", _v1_service_action)
    app.router.add_get(V1_WORKSPACE + "/operations/{op}", _v1_operation)
    app.router.add_get(V2_WORKSPACE + "/onlineEndpoints/{name}", _v2_endpoint_object)
    app.router.add_get(V2_WORKSPACE + "/onlineEndpoints/{name}/deployments", _v2_deployment_list)
    app.router.add_get(V2_WORKSPACE + "/onlineEndpoints/{name}/deployments/{deployment}", _v2_deployment_object)
    app.router.add_post(V2_WORKSPACE + "/onlineEndpoints/{name}/{action}", _v2_endpoint_action)
    app.router.add_get(V2_OPERATION, _v2_operation)
    app.router.add_post(OPENAI_ACCOUNT + "/{action}", _openai_account_action)
    app.router.add_get("/_emulator/faults", _list_faults)
    app.router.add_post("/_emulator/faults", _add_fault)
    app.router.add_delete("/_emulator/faults", _clear_faults)
    app.router.add_get("/_emulator/latency", _get_latency)
    app.router.add_put("/_emulator/latency", _put_latency)
    app.router.add_get("/_emulator/clock", _get_clock)
    app.router.add_put("/_emulator/clock", _put_clock)
    app.router.add_get("/_emulator/calls", _get_calls)
    app.router.add_post("/_emulator/mlserver/revoke-all", _mlserver_revoke_all)
    app.router.add_get("/_emulator/services", _list_services)
    return app


# -- error shapes ------------------------------------------------------------------------------------------------


def v1_error(status: int, code: str, text: str) -> web.Response:
    """MMS `ModelErrorResponse`."""
    return web.json_response({"code": code, "statusCode": status, "message": text, "details": []}, status=status)


def v2_error(status: int, code: str, text: str) -> web.Response:
    """ARM `ErrorResponse`."""
    return web.json_response({"error": {"code": code, "message": text}}, status=status)


def _error(plane: Plane, status: int, code: str, text: str) -> web.Response:
    return v1_error(status, code, text) if plane == "v1" else v2_error(status, code, text)


def _fault_error(plane: Plane) -> faults.ErrorBody:
    return lambda status, text: _error(plane, status, "EmulatedFault", text)


# -- shared plumbing ---------------------------------------------------------------------------------------------


def _check_token(request: web.Request, plane: Plane) -> web.Response | None:
    values = request.headers.getall("Authorization", [])
    if not values:
        return _error(
            plane, 401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing."
        )
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if len(values) != 1 or scheme.lower() != "bearer" or not token:
        return _error(plane, 401, "InvalidAuthenticationToken", "The 'Authorization' header is malformed.")
    state = request.app[STATE]
    if state.accepts_control_token(token):
        return None
    if token.count(".") != 2:  # not a JWT either
        return _error(plane, 401, "InvalidAuthenticationToken", "The access token is invalid.")
    try:
        state.accepts_entra_token(token, audiences=ARM_AUDIENCES)
    except TokenRejected as exc:
        if exc.reason == "audience":
            return _error(
                plane,
                401,
                "InvalidAuthenticationTokenAudience",
                "The access token has an invalid audience; request it for https://management.azure.com/.",
            )
        if exc.reason == "expired":
            return _error(plane, 401, "ExpiredAuthenticationToken", "The access token has expired.")
        return _error(plane, 401, "InvalidAuthenticationToken", f"The access token is invalid: {exc.detail}.")
    return None


def _check_api_version(request: web.Request) -> web.Response | None:
    if not request.query.get("api-version"):
        return v2_error(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        )
    return None


def _check_call(request: web.Request, plane: Plane) -> web.Response | None:
    """The plane's refusal of an unauthorised call (and of a v2 call without its api-version), or None."""
    denied = _check_token(request, plane)
    if denied is None and plane == "v2":
        denied = _check_api_version(request)
    return denied


def _find_service(request: web.Request, plane: Plane) -> Service | None:
    info = request.match_info
    service = request.app[STATE].services.get(info["name"])
    if service is None or service.api != plane:
        return None
    if not service.in_workspace(subscription=info["sub"], resource_group=info["rg"], workspace=info["ws"]):
        return None
    return service


def _not_found(plane: Plane, what: str) -> web.Response:
    code = "NotFound" if plane == "v1" else "ResourceNotFound"
    return _error(plane, 404, code, f"{what} was not found.")


_SERVICE_NOUN = {"v1": "Service", "v2": "Online endpoint"}


def _resolve(request: web.Request, plane: Plane) -> Service | web.Response:
    """The service the path names, once the call is authorised; else the plane's refusal or 404."""
    denied = _check_call(request, plane)
    if denied is not None:
        return denied
    service = _find_service(request, plane)
    if service is None:
        return _not_found(plane, f"{_SERVICE_NOUN[plane]} {request.match_info['name']!r}")
    return service


def _base_url(request: web.Request) -> str:
    configured = request.app[BASE_URL]
    if callable(configured):
        configured = configured()
    if isinstance(configured, str):
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}"


async def _serve(
    request: web.Request,
    plane: Plane,
    service: Service,
    work: Callable[[], Awaitable[web.Response]],
) -> web.StreamResponse:
    """Apply faults and the region's latency around the real work of an authorised, resolved call."""
    fault = request.app[STATE].take_fault("control", service.name, service.region)
    early = await _fault_then_latency(request, plane, service, fault)
    if early is not None:
        return early
    return await faults.finish(request, await work(), fault)


async def _describe(
    request: web.Request, plane: Plane, service: Service, body: Callable[[Service], dict[str, Any]]
) -> web.StreamResponse:
    """Serve `body` of the service as it stands once faults and latency have played out."""

    async def describe() -> web.Response:
        return web.json_response(body(request.app[STATE].services[service.name]))

    return await _serve(request, plane, service, describe)


async def _serve_operation(
    request: web.Request, plane: Plane, answer: Callable[[Operation, Service], web.Response]
) -> web.StreamResponse:
    """A poll of the operation the path names (a v1 path names its service's workspace, a v2 path only the
    subscription): `answer(op, service)`, once the call is authorised, with its service's faults and latency."""
    denied = _check_call(request, plane)
    if denied is not None:
        return denied
    state = request.app[STATE]
    info = request.match_info
    op = state.operations.get(info["op"])
    service = state.services.get(op.service) if op is not None else None
    if op is None or service is None:
        return _not_found(plane, f"Operation {info['op']!r}")
    if plane == "v1":
        here = service.in_workspace(subscription=info["sub"], resource_group=info["rg"], workspace=info["ws"])
    else:
        here = service.subscription.lower() == info["sub"].lower()
    if not here:
        return _not_found(plane, f"Operation {info['op']!r}")

    async def work() -> web.Response:
        return answer(op, service)

    return await _serve(request, plane, service, work)


async def _fault_then_latency(
    request: web.Request, plane: Plane, service: Service, fault: Fault | None
) -> web.Response | None:
    early = await faults.before_handler(request, fault, _fault_error(plane))
    if early is not None:
        return early
    latency = request.app[STATE].latency_for(service.region)
    if latency > 0:
        await asyncio.sleep(latency)
    return None


async def _serve_token(request: web.Request, plane: Plane, service: Service) -> web.StreamResponse:
    """The AML token operation of either plane, with `token` and `control` faults and the region's latency."""
    state = request.app[STATE]
    state.token_calls[service.name] += 1
    if service.auth_mode != "aml_token":
        text = f"Token authentication is not enabled for {service.name!r}; its auth mode is {service.auth_mode!r}."
        return _error(plane, 400, "BadRequest" if plane == "v1" else "BadArgument", text)
    fault = state.take_fault(("token", "control"), service.name, service.region)
    early = await _fault_then_latency(request, plane, service, fault)
    if early is not None:
        return early
    action = None if fault is None else fault.action
    seconds = 0.0 if fault is None else fault.seconds
    token = state.issue_aml_token(
        service.name,
        expired_seconds_ago=seconds if action == "expired_token" else None,
        jwt_exp_in=seconds if action == "exp_before_expiry" else None,
    )
    payload: dict[str, Any]
    if plane == "v1":
        payload = {
            "accessToken": token.access_token,
            "tokenType": "Bearer",
            "refreshAfter": token.refresh_after,
            "expiryOn": token.expiry_on,
        }
    else:
        payload = {
            "accessToken": token.access_token,
            "expiryTimeUtc": token.expiry_on,
            "refreshAfterTimeUtc": token.refresh_after,
            "tokenType": "Bearer",
        }
    response = web.json_response(faults.without_fields(payload, fault, ["accessToken"]))
    return await faults.finish(request, response, fault)


async def _service_action(request: web.Request, plane: Plane) -> web.StreamResponse:
    """listKeys, regenerateKeys and token (case-insensitive) on a v1 service or a v2 online endpoint."""
    found = _resolve(request, plane)
    if isinstance(found, web.Response):
        return found
    service = found
    action = request.match_info["action"].lower()
    state = request.app[STATE]

    async def list_keys() -> web.Response:
        return web.json_response(_keys_body(state.services[service.name]))

    async def regenerate() -> web.Response:
        parsed = await _read_regenerate_body(request)
        if isinstance(parsed, str):
            return _error(plane, 400, "BadRequest", parsed)
        key_type, key_value = parsed
        return _regenerate_accepted(request, plane, state.regenerate_key(service.name, key_type, key_value))

    if action == "listkeys":
        return await _serve(request, plane, service, list_keys)
    if action == "regeneratekeys":
        return await _serve(request, plane, service, regenerate)
    if action == "token":
        return await _serve_token(request, plane, service)
    return _not_found(plane, f"{'Operation' if plane == 'v1' else 'Action'} {request.match_info['action']!r}")


def _regenerate_accepted(request: web.Request, plane: Plane, service: Service) -> web.Response:
    """The 202 of a regenerateKeys, pointing at where to poll: an MMS operation (v1) or an ARM operation result
    (v2, Location polling, with the call's api-version)."""
    state = request.app[STATE]
    if plane == "v1":
        op = state.record_operation(service=service.name, operation_type="Service")
        location = (
            _base_url(request)
            + V1_WORKSPACE.format(sub=service.subscription, rg=service.resource_group, ws=service.workspace)
            + f"/operations/{op.id}"
        )
        return web.Response(status=202, headers={"Operation-Location": location})
    op = state.record_operation(service=service.name, operation_type="RegenerateKeys")
    location = (
        _base_url(request)
        + V2_OPERATION.format(sub=service.subscription, region=service.region, op=op.id)
        + f"?api-version={request.query['api-version']}"
    )
    return web.Response(status=202, headers={"Location": location, "Retry-After": "1"})


async def _read_regenerate_body(request: web.Request) -> tuple[KeyType, str | None] | str:
    """(keyType, keyValue) from a regenerateKeys body, or the reason it is unusable."""
    body = await _read_object(
        request,
        invalid="The request body is not valid JSON.",
        not_object="The request body must be a JSON object with keyType and keyValue.",
    )
    if isinstance(body, str):
        return body
    key_type = body.get("keyType")
    canonical: KeyType
    if isinstance(key_type, str) and key_type.lower() == "primary":
        canonical = "Primary"
    elif isinstance(key_type, str) and key_type.lower() == "secondary":
        canonical = "Secondary"
    else:
        return "keyType must be 'Primary' or 'Secondary'."
    key_value = body.get("keyValue")
    if key_value is not None and (not isinstance(key_value, str) or not key_value):
        return "keyValue must be a non-empty string or null."
    return canonical, key_value


async def _read_object(
    request: web.Request,
    *,
    invalid: str = "the request body is not valid JSON",
    not_object: str = "the request body must be a JSON object",
) -> dict[str, Any] | str:
    """The JSON object in the body (no body reads as null), or the reason it is unusable."""
    try:
        body: Any = json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError):
        return invalid
    if not isinstance(body, dict):
        return not_object
    return body


def _keys_body(service: Service) -> dict[str, str]:
    return {"primaryKey": service.primary_key, "secondaryKey": service.secondary_key}


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _scoring_uri(request: web.Request, service: Service) -> str | None:
    base = request.app[SCORING_URL_FOR](service.name)
    return None if base is None else base.rstrip("/") + "/score"


# -- workspace discovery -----------------------------------------------------------------------------------------

# The services a discovery document names: the ones in Microsoft's example (how-to-manage-rest.md) plus `studio`,
# which azureml-core 1.61 requires (`_ServiceKeys`: api, experimentation, history, hyperdrive, modelmanagement,
# studio; `ServiceContext._fetch_endpoints` looks every one of them up).
DISCOVERY_SERVICES = (
    "api",
    "catalog",
    "experimentation",
    "gallery",
    "history",
    "hyperdrive",
    "labeling",
    "modelmanagement",
    "pipelines",
    "studio",
    "studiocoreservices",
)


async def _discovery(request: web.Request) -> web.Response:
    """A workspace's discovery document (the workspace's `properties.discoveryUrl`, in AML
    `https://<region>.api.azureml.ms/discovery`): each service's host. AML serves it without authentication.
    Here every service is this origin; model management (v1) is the one the emulator implements."""
    origin = _base_url(request)
    return web.json_response(dict.fromkeys(DISCOVERY_SERVICES, origin))


# -- v1 model management -----------------------------------------------------------------------------------------


async def _v1_service_object(request: web.Request) -> web.StreamResponse:
    found = _resolve(request, "v1")
    if isinstance(found, web.Response):
        return found
    return await _describe(request, "v1", found, lambda current: _v1_service_body(request, current))


def _v1_service_body(request: web.Request, service: Service) -> dict[str, Any]:
    """MMS `AKSServiceResponse` (swagger 2019-09-30) with every key azureml-core 1.61 requires.

    `AksWebservice._initialize` raises unless the payload has all of `Webservice._expected_payload_keys`
    (computeType, createdTime, description, kvTags, name, properties) and `AksWebservice._expected_payload_keys`
    (appInsightsEnabled, authEnabled, autoScaler, computeName, containerResourceRequirements, dataCollection,
    maxConcurrentRequestsPerContainer, maxQueueWaitMs, numReplicas, scoringTimeoutMs, scoringUri,
    livenessProbeRequirements, aadAuthEnabled); autoScaler, containerResourceRequirements, dataCollection and
    livenessProbeRequirements must carry all of their own keys too. The values are the SDK's deployment defaults
    (`AksWebservice.deploy_configuration`) for a service with one replica.
    """
    created = _iso(request.app[STATE].created_time(service.name))
    base = request.app[SCORING_URL_FOR](service.name)
    return {
        "id": service.name,
        "name": service.name,
        "description": None,
        "kvTags": {},
        "properties": {},
        "state": "Healthy",
        "createdTime": created,
        "updatedTime": created,
        "computeType": "AKS",
        "deploymentType": "HttpRealtimeEndpoint",
        "computeName": f"aks-{service.region}",
        "namespace": f"azureml-{service.workspace}",
        "location": service.region,
        "numReplicas": 1,
        "autoScaler": {
            "autoscaleEnabled": False,
            "minReplicas": 1,
            "maxReplicas": 10,
            "targetUtilization": 70,
            "refreshPeriodInSeconds": 1,
        },
        "containerResourceRequirements": {
            "cpu": 0.1,
            "cpuLimit": None,
            "memoryInGB": 0.5,
            "memoryInGBLimit": None,
            "gpu": 0,
        },
        "livenessProbeRequirements": {
            "failureThreshold": 3,
            "successThreshold": 1,
            "timeoutSeconds": 2,
            "periodSeconds": 10,
            "initialDelaySeconds": 310,
        },
        "dataCollection": {"eventHubEnabled": False, "storageEnabled": False},
        "appInsightsEnabled": False,
        "maxConcurrentRequestsPerContainer": 1,
        "maxQueueWaitMs": 500,
        "scoringTimeoutMs": 60000,
        "deploymentStatus": {"desiredReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1},
        "scoringUri": _scoring_uri(request, service),
        "swaggerUri": None if base is None else base.rstrip("/") + "/swagger.json",
        "authEnabled": service.auth_mode == "key",
        "aadAuthEnabled": service.auth_mode == "aml_token",  # AML's name for token auth
        "models": [],
    }


async def _v1_service_action(request: web.Request) -> web.StreamResponse:
    return await _service_action(request, "v1")


async def _v1_operation(request: web.Request) -> web.StreamResponse:
    def status(op: Operation, service: Service) -> web.Response:
        return web.json_response(
            {
                "id": op.id,
                "operationType": op.operation_type,
                "state": "Succeeded",
                "createdTime": _iso(op.created),
                "endTime": _iso(op.ended),
                "resourceLocation": f"/services/{service.name}",
            }
        )

    return await _serve_operation(request, "v1", status)


# -- v2 ARM ------------------------------------------------------------------------------------------------------

_V2_AUTH_MODES = {"key": "Key", "aml_token": "AMLToken", "aad_token": "AADToken"}
# Who created the emulator's resources, in ARM systemData.
SYSTEM_CREATOR = "aml-emulator"


def _v2_endpoint_id(service: Service) -> str:
    workspace = V2_WORKSPACE.format(sub=service.subscription, rg=service.resource_group, ws=service.workspace)
    return f"{workspace}/onlineEndpoints/{service.name}"


def _system_data(request: web.Request, service: Service) -> dict[str, str]:
    """ARM `systemData`; azure-ai-ml reads createdAt and lastModifiedAt as date-times (OnlineEndpoint
    `_from_rest_object` formats both when systemData is present)."""
    created = _iso(request.app[STATE].created_time(service.name))
    return {
        "createdBy": SYSTEM_CREATOR,
        "createdByType": "Application",
        "createdAt": created,
        "lastModifiedBy": SYSTEM_CREATOR,
        "lastModifiedByType": "Application",
        "lastModifiedAt": created,
    }


def _v2_endpoint_body(request: web.Request, service: Service) -> dict[str, Any]:
    """ARM `OnlineEndpoint` of a managed online endpoint (no `compute`), as azure-ai-ml 1.35 reads it
    (`arm_ml_service` models, `OnlineEndpoint._from_rest_object`)."""
    base = request.app[SCORING_URL_FOR](service.name)
    return {
        "id": _v2_endpoint_id(service),
        "name": service.name,
        "type": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints",
        "location": service.region,
        "tags": {},
        "identity": {
            "type": "SystemAssigned",
            "principalId": str(uuid.uuid5(uuid.NAMESPACE_URL, _v2_endpoint_id(service).lower())),
            "tenantId": request.app[STATE].entra.tenant,
        },
        "systemData": _system_data(request, service),
        "properties": {
            "authMode": _V2_AUTH_MODES[service.auth_mode],
            "description": None,
            "properties": {},
            "scoringUri": _scoring_uri(request, service),
            "swaggerUri": None if base is None else base.rstrip("/") + "/swagger.json",
            "provisioningState": "Succeeded",
            "publicNetworkAccess": "Enabled",
            "traffic": {service.default_deployment: 100},
            "mirrorTraffic": {},
        },
    }


def _v2_deployment_body(request: web.Request, service: Service, deployment: str) -> dict[str, Any]:
    """ARM `OnlineDeployment` of a managed deployment with azure-ai-ml's defaults (one instance, default scale
    settings, 5 s request timeout, the documented probe defaults). `sku.capacity` is required:
    `ManagedOnlineDeployment._from_rest_object` reads it unguarded."""
    probe = {
        "failureThreshold": 30,
        "successThreshold": 1,
        "timeout": "PT2S",
        "period": "PT10S",
        "initialDelay": "PT10S",
    }
    return {
        "id": f"{_v2_endpoint_id(service)}/deployments/{deployment}",
        "name": deployment,
        "type": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/deployments",
        "location": service.region,
        "tags": {},
        "sku": {"name": "Default", "tier": "Standard", "capacity": 1},
        "systemData": _system_data(request, service),
        "properties": {
            "endpointComputeType": "Managed",
            "provisioningState": "Succeeded",
            "instanceType": "Standard_DS3_v2",
            "description": None,
            "properties": {},
            "environmentVariables": {},
            "appInsightsEnabled": False,
            "egressPublicNetworkAccess": "Enabled",
            "scaleSettings": {"scaleType": "Default"},
            "requestSettings": {
                "maxConcurrentRequestsPerInstance": 1,
                "requestTimeout": "PT5S",
                "maxQueueWait": "PT0.5S",
            },
            "livenessProbe": dict(probe),
            "readinessProbe": dict(probe),
        },
    }


async def _v2_endpoint_object(request: web.Request) -> web.StreamResponse:
    found = _resolve(request, "v2")
    if isinstance(found, web.Response):
        return found
    return await _describe(request, "v2", found, lambda current: _v2_endpoint_body(request, current))


async def _v2_deployment_list(request: web.Request) -> web.StreamResponse:
    found = _resolve(request, "v2")
    if isinstance(found, web.Response):
        return found

    def listing(current: Service) -> dict[str, Any]:
        return {"value": [_v2_deployment_body(request, current, d) for d in current.deployments]}

    return await _describe(request, "v2", found, listing)


async def _v2_deployment_object(request: web.Request) -> web.StreamResponse:
    found = _resolve(request, "v2")
    if isinstance(found, web.Response):
        return found
    deployment = request.match_info["deployment"]
    if deployment not in found.deployments:
        return _not_found("v2", f"Deployment {deployment!r} of online endpoint {found.name!r}")
    return await _describe(request, "v2", found, lambda current: _v2_deployment_body(request, current, deployment))


async def _v2_endpoint_action(request: web.Request) -> web.StreamResponse:
    return await _service_action(request, "v2")


async def _v2_operation(request: web.Request) -> web.StreamResponse:
    def done(op: Operation, service: Service) -> web.Response:
        # ARM's Location polling: 202 means running, 200 means finished; regenerateKeys has no result body.
        return web.Response(status=200)

    return await _serve_operation(request, "v2", done)


# -- Azure OpenAI accounts (Microsoft.CognitiveServices) ---------------------------------------------------------

_OPENAI_KEY_NAMES: dict[str, KeyType] = {"key1": "Primary", "key2": "Secondary"}


async def _openai_account_action(request: web.Request) -> web.StreamResponse:
    """listKeys and regenerateKey of an openai service, as ARM answers them for a Cognitive Services account."""
    denied = _check_call(request, "v2")
    if denied is not None:
        return denied
    info = request.match_info
    state = request.app[STATE]
    service = state.services.get(info["name"])
    if (
        service is None
        or service.api != "openai"
        or service.subscription.lower() != info["sub"].lower()
        or service.resource_group.lower() != info["rg"].lower()
    ):
        return _not_found("v2", f"Account {info['name']!r}")
    action = info["action"].lower()
    if action not in ("listkeys", "regeneratekey"):
        return _not_found("v2", f"Action {info['action']!r}")

    async def work() -> web.Response:
        current = state.services[service.name]
        if action == "regeneratekey":
            body = await _read_object(request)
            key_name = body.get("keyName") if isinstance(body, dict) else None
            key_type = _OPENAI_KEY_NAMES.get(key_name.lower()) if isinstance(key_name, str) else None
            if key_type is None:
                return v2_error(400, "InvalidRequestContent", "keyName must be 'Key1' or 'Key2'.")
            current = state.regenerate_key(service.name, key_type)
        return web.json_response({"key1": current.primary_key, "key2": current.secondary_key})

    return await _serve(request, "v2", service, work)


# -- admin API ---------------------------------------------------------------------------------------------------


def _admin_error(status: int, text: str) -> web.Response:
    return web.json_response({"message": text}, status=status)


async def _add_fault(request: web.Request) -> web.Response:
    body = await _read_object(request)
    if isinstance(body, str):
        return _admin_error(400, body)
    unknown = sorted(set(body) - _FAULT_FIELDS)
    if unknown:
        return _admin_error(400, f"unknown field(s) {unknown}; allowed: {sorted(_FAULT_FIELDS)}")
    if "target" not in body or "action" not in body:
        return _admin_error(400, "target and action are required")
    try:
        fault = request.app[STATE].add_fault(
            target=body["target"],
            action=body["action"],
            service=body.get("service"),
            region=body.get("region"),
            status=body.get("status"),
            retry_after=body.get("retry_after"),
            seconds=body.get("seconds", 0.0),
            count=body.get("count"),
        )
    except ValueError as exc:
        return _admin_error(400, str(exc))
    return web.json_response(fault.as_json(), status=201)


async def _list_faults(request: web.Request) -> web.Response:
    return web.json_response({"faults": [f.as_json() for f in request.app[STATE].faults]})


async def _clear_faults(request: web.Request) -> web.Response:
    state = request.app[STATE]
    cleared = len(state.faults)
    state.clear_faults()
    return web.json_response({"cleared": cleared})


async def _get_latency(request: web.Request) -> web.Response:
    return web.json_response({"latency": dict(request.app[STATE].latency)})


async def _put_latency(request: web.Request) -> web.Response:
    body = await _read_object(request)
    if isinstance(body, str):
        return _admin_error(400, body)
    try:
        region: Any = body.get("region")
        seconds: Any = body.get("seconds")
        request.app[STATE].set_latency(region, seconds)
    except ValueError as exc:
        return _admin_error(400, str(exc))
    return web.json_response({"latency": dict(request.app[STATE].latency)})


def _clock_view(state: EmulatorState) -> dict[str, float]:
    return {"offset_seconds": state.clock_offset_seconds, "now": state.now()}


async def _get_clock(request: web.Request) -> web.Response:
    return web.json_response(_clock_view(request.app[STATE]))


async def _put_clock(request: web.Request) -> web.Response:
    body = await _read_object(request)
    if isinstance(body, str):
        return _admin_error(400, body)
    unknown = sorted(set(body) - {"offset_seconds"})
    if unknown or "offset_seconds" not in body:
        return _admin_error(400, 'the body must be {"offset_seconds": <number>}')
    try:
        request.app[STATE].set_clock_offset(body["offset_seconds"])
    except ValueError as exc:
        return _admin_error(400, str(exc))
    return web.json_response(_clock_view(request.app[STATE]))


async def _get_calls(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {
            "token": dict(state.token_calls),
            "entra_token": dict(state.entra_token_calls),
            "mlserver": dict(state.mlserver_calls),
            "mlserver_revoked": len(state.mlserver_revoked),
        }
    )


async def _mlserver_revoke_all(request: web.Request) -> web.Response:
    return web.json_response({"revoked": request.app[STATE].mlserver_revoke_all()})


async def _list_services(request: web.Request) -> web.Response:
    services = request.app[STATE].services.values()
    return web.json_response({"services": [s.public_view() for s in services]})
