"""azureml-core (the AML v1 SDK) reading the emulator's v1 control plane and scoring front end, and the proxy.

Run by tests/test_sdk_clients.py with the azureml-core venv's Python (AZUREML_CORE_PYTHON); JSON in on stdin,
one JSON line out (tests/sdk/sdk_io.py). Everything the SDK does here is its own code path:

- the workspace is built the way a run inside AML builds it (`Workspace._from_service_context`): a ServiceContext
  whose service URLs come from the workspace discovery URL, here the emulator's `/discovery`. That is how the
  SDK finds the model management (MMS) host; nothing is patched and no ARM call is made;
- `TokenAuthentication` is the SDK's public class for a bearer token obtained outside it (here an ARM token the
  emulator's Entra ID stand-in signed); it records the audiences the SDK asks for;
- `Webservice(ws, name)` / `AksWebservice(ws, name)`, `get_keys`, `regen_key`, `get_token`, `get_access_token`
  and `run` are called as a user would.

The proxy check: `run()` always fetches the service's keys first and sends `Authorization: Bearer <primary>`.
The script swaps the instance's `get_keys` for one that hands out the primary key as it was before `regen_key`,
i.e. a revoked key, as a client with a stale cached key would have. Sent straight to the scoring front end that
key gets a 401 (the SDK retries once with the same stale key and raises); sent to the proxy the call succeeds,
because the proxy replaced the Authorization header with its own key.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sdk_io import attributes, expect_failure, sdk_run


def epoch(moment: datetime) -> int:
    """The SDK turns epoch seconds into naive local datetimes (`datetime.fromtimestamp`); turn them back."""
    return round(moment.timestamp())


# What a Webservice says of itself, read as they are (swagger_uri and the times are read below).
SERVICE_ATTRIBUTES = (
    "name",
    "compute_type",
    "state",
    "scoring_uri",
    "auth_enabled",
    "token_auth_enabled",
    "tags",
    "properties",
    "description",
)


def describe(service: Any) -> dict[str, Any]:
    return {
        "class": type(service).__name__,
        **attributes(service, *SERVICE_ATTRIBUTES),
        "swagger_uri": getattr(service, "swagger_uri", None),
        "created_time": service.created_time.isoformat() if service.created_time else None,
        "updated_time": service.updated_time.isoformat() if service.updated_time else None,
    }


def describe_aks(service: Any) -> dict[str, Any]:
    scaler = service.autoscaler
    resources = service.container_resource_requirements
    probe = service.liveness_probe_requirements
    collection = service.data_collection
    return {
        **describe(service),
        **attributes(service, "compute_name", "num_replicas", "scoring_timeout_ms", "namespace"),
        "autoscale_enabled": scaler.autoscale_enabled,
        "cpu": resources.cpu,
        "memory_in_gb": resources.memory_in_gb,
        "liveness_period_seconds": probe.period_seconds,
        "data_collection_storage_enabled": collection.storage_enabled,
    }


def main() -> None:
    with sdk_run("azureml-core") as run:
        p = run.params
        from azureml._restclient.service_context import ServiceContext
        from azureml.core import Workspace
        from azureml.core.authentication import TokenAuthentication
        from azureml.core.webservice import AksWebservice, Webservice

        audiences: list[str] = []

        def arm_token(audience: str) -> str:
            audiences.append(str(audience))
            return str(p["arm_token"])

        auth = TokenAuthentication(arm_token, cloud="AzureCloud")

        def workspace() -> Any:
            context = ServiceContext(
                p["subscription"], p["resource_group"], p["workspace"], p["workspace_id"], p["discovery_url"], auth
            )
            return Workspace._from_service_context(context, _location=p["location"])

        ws = run.step("workspace", workspace, record=False)
        run.step("mms_url", lambda: ws.service_context._get_assets_url())
        body = json.dumps({"data": p["data"]})

        # v1 key service: get by name both ways, keys, regeneration, scoring.
        run.step("get_webservice", lambda: describe(Webservice(ws, p["key_service"])))
        aks = run.step("aks_webservice", lambda: AksWebservice(ws, p["key_service"]), record=False)
        run.step("get_aks_webservice", lambda: describe_aks(aks))
        before = run.step("keys_before", lambda: list(aks.get_keys()))
        run.step("regen_key", lambda: aks.regen_key("Primary"))
        run.step("keys_after", lambda: list(aks.get_keys()))
        run.step("run_direct", lambda: aks.run(body))
        aks.get_keys = lambda: (before[0], before[1])  # a client holding the key from before regen_key
        run.step("run_direct_stale", lambda: expect_failure(lambda: aks.run(body)))
        aks.scoring_uri = p["proxy_url"].rstrip("/") + "/score"
        run.step("run_proxy_stale", lambda: aks.run(body))

        # v1 token service: the token operation and scoring with the token.
        tokened = run.step("token_webservice", lambda: AksWebservice(ws, p["token_service"]), record=False)
        run.step("get_token_service", lambda: describe_aks(tokened))
        run.step("get_token", lambda: dict(zip(("access_token", "refresh_after"), tokened.get_token(), strict=True)))
        run.out["get_token"]["refresh_after"] = epoch(run.out["get_token"]["refresh_after"])

        def access_token() -> dict[str, Any]:
            token = tokened.get_access_token()
            return {
                "class": type(token).__name__,
                "access_token": token.access_token,
                "token_type": token.token_type,
                "refresh_after": epoch(token.refresh_after),
                "expiry_on": epoch(token.expiry_on),
            }

        run.step("get_access_token", access_token)
        run.step("run_token_direct", lambda: tokened.run(body))

        # A service that does not exist: the SDK's own 404 handling.
        run.step("get_missing", lambda: expect_failure(lambda: Webservice(ws, p["missing_service"])))
        run.out["audiences"] = sorted(set(audiences))


if __name__ == "__main__":
    main()
