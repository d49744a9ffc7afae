"""What the emulator is told, and what a proxy route needs to reach it: plain dicts.

Standard library only, with nothing of pytest or of the test session: bench/run.py imports this module too (run
as `python -m bench.run` from the checkout), so that the bench and the tests reach the emulator the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
WORKSPACE = {"subscription_id": SUBSCRIPTION, "resource_group": "rg", "workspace": "ws"}  # the emulated workspace
PROVIDER = "providers/Microsoft.MachineLearningServices"
V2_WS = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg/{PROVIDER}/workspaces/ws"  # its path at ARM (v2)
V1_WS = "/modelmanagement/v1.0" + V2_WS  # and at the model management service (v1)
API = "api-version=2025-12-01"  # what the v2 control plane's calls carry


def emulated_service(name: str, api: str, region: str, **extra: Any) -> dict[str, Any]:
    """An emulated online endpoint (api v2) or service (v1) with one deployment, blue, on the echo backend;
    `extra` adds or replaces keys (auth_mode, token times, deployments)."""
    return {"name": name, "api": api, "region": region, "deployments": {"blue": "echo"}, **extra}


def short_token_service(name: str, api: str, region: str) -> dict[str, Any]:
    """An emulated endpoint or service with 3 s aml_token tokens to be renewed after 2 s: a soak in seconds."""
    return emulated_service(
        name, api, region, auth_mode="aml_token", token_lifetime_seconds=3, token_refresh_after_seconds=2
    )


def control_plane_auth(ready: Mapping[str, Any], client_id: str, secret_file: Path | str) -> dict[str, Any]:
    """The part of a token route's `auth` that reaches a running emulator's control plane and Entra ID (its ready
    line, or `ready_of` an emulator running in-process), signing in as `client_id` with the secret in
    `secret_file`."""
    return {
        **WORKSPACE,
        "ca_file": ready["ca_file"],
        "identity": {
            "type": "client_secret",
            "client_id": client_id,
            "tenant_id": ready["tenant"],
            "authority_host": ready["entra_url"],
            "client_secret_file": str(secret_file),
        },
    }


def token_route(
    ready: Mapping[str, Any], name: str, region: str, auth_type: str, common: Mapping[str, Any]
) -> dict[str, Any]:
    """A route under /`name` to the emulated endpoint (auth_type aml-endpoint-token) or service (aml-service-token)
    `name` of a running emulator (its ready line), over TLS with the emulator's CA; `common` is control_plane_auth."""
    what, url = {"aml-endpoint-token": ("endpoint", "arm_url"), "aml-service-token": ("service", "mms_url")}[auth_type]
    return {
        "name": name,
        "region": region,
        "match": f"/{name}",
        "strip_prefix": True,
        "tls": {"ca_file": ready["ca_file"]},
        "upstream": ready["service_urls"][name],
        "auth": {"type": auth_type, what: name, url: ready["control_url"], **common},
    }


class Listening(Protocol):
    """What control_plane_auth reads of an emulator running in-process (proxy/emulator/runner.py RunningEmulator)."""

    ca_file: str | None
    tenant: str
    entra_url: str


def ready_of(emulator: Listening) -> dict[str, Any]:
    """The emulator's ready line, as far as control_plane_auth reads it, for an emulator running in-process."""
    return {"ca_file": emulator.ca_file, "tenant": emulator.tenant, "entra_url": emulator.entra_url}
