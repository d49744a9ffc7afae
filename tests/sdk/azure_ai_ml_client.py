"""azure-ai-ml (the AML v2 SDK) reading the emulator's v2 (ARM) control plane and scoring front ends.

Run by tests/test_sdk_clients.py with the azure-ai-ml venv's Python (AZURE_AI_ML_PYTHON); JSON in on stdin, one
JSON line out (tests/sdk/sdk_io.py).

How MLClient reaches the emulator, with nothing patched:

- `AZUREML_DEV_URL_MFE` (set by the caller) is azure-ai-ml's own override of the ARM / management front end base
  URL (`azure/ai/ml/_utils/utils.py` `_get_mfe_url_override`, read by `_get_base_url_from_metadata(...,
  is_local_mfe=True)` in `MLClient.__init__`). The cloud stays AzureCloud, so the credential is asked for
  `https://management.azure.com/.default`, the audience the emulator's control plane wants. (A custom cloud via
  `cloud=` + `cloud_metadata=` would work too, but then the scope is the emulator's own URL + `/.default`.)
- The base URL is https (the emulator serves TLS with its own CA; the caller sets REQUESTS_CA_BUNDLE), so
  azure-core's bearer token policy, which refuses plain http, is satisfied.
- The credential is azure-identity's own `ClientSecretCredential` against the emulator's Entra ID stand-in
  (`authority=`, `disable_instance_discovery=True`: MSAL then reads the stand-in's OpenID configuration instead of
  asking login.microsoftonline.com).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdk_io import attributes, sdk_run


def main() -> None:
    with sdk_run("azure-ai-ml") as run:
        p = run.params
        from azure.ai.ml import MLClient
        from azure.identity import ClientSecretCredential

        scopes: list[str] = []

        class RecordingCredential(ClientSecretCredential):
            def get_token(self, *wanted: str, **kwargs: Any) -> Any:
                scopes.extend(wanted)
                return super().get_token(*wanted, **kwargs)

            def get_token_info(self, *wanted: str, **kwargs: Any) -> Any:  # what azure-core's policy calls
                scopes.extend(wanted)
                return super().get_token_info(*wanted, **kwargs)

        credential = RecordingCredential(
            p["tenant"],
            p["client_id"],
            p["client_secret"],
            authority=p["authority"],
            disable_instance_discovery=True,
        )

        def client() -> Any:
            return MLClient(credential, p["subscription"], p["resource_group"], p["workspace"], enable_telemetry=False)

        ml = run.step("client", client, record=False)
        run.step("base_url", lambda: ml._base_url)

        def describe(name: str) -> dict[str, Any]:
            endpoint = ml.online_endpoints.get(name)
            read = ("id", "name", "auth_mode", "scoring_uri", "openapi_uri", "location", "provisioning_state")
            return {
                "class": type(endpoint).__name__,
                **attributes(endpoint, *read),
                "traffic": dict(endpoint.traffic or {}),
                "properties": dict(endpoint.properties or {}),
            }

        def keys(name: str) -> dict[str, Any]:
            found = ml.online_endpoints.get_keys(name)
            return {"class": type(found).__name__, **{k: v for k, v in vars(found).items() if not k.startswith("_")}}

        request_file = Path(p["work_dir"]) / "request.json"
        request_file.write_text(json.dumps({"data": p["data"]}))

        # A key endpoint: the resource, its keys, a key regeneration (an ARM long-running operation), scoring.
        run.step("get_key_endpoint", lambda: describe(p["key_endpoint"]))
        run.step("keys", lambda: keys(p["key_endpoint"]))

        def regenerate() -> dict[str, Any]:
            poller = ml.online_endpoints.begin_regenerate_keys(p["key_endpoint"], key_type="secondary")
            poller.result(timeout=30)
            return {"status": poller.status(), "done": poller.done()}

        run.step("regenerate_secondary", regenerate)
        run.step("keys_after_regenerate", lambda: keys(p["key_endpoint"]))
        run.step(
            "invoke_key_endpoint",
            lambda: json.loads(ml.online_endpoints.invoke(p["key_endpoint"], request_file=str(request_file))),
        )

        # An aml_token endpoint: the token operation and scoring with the token.
        run.step("get_token_endpoint", lambda: describe(p["token_endpoint"]))
        run.step("token", lambda: keys(p["token_endpoint"]))
        run.step(
            "invoke_token_endpoint",
            lambda: json.loads(ml.online_endpoints.invoke(p["token_endpoint"], request_file=str(request_file))),
        )
        run.out["scopes"] = sorted(set(scopes))


if __name__ == "__main__":
    main()
