"""A ready proxy config for a running emulator: one route per emulated service, and one for ML Server.

`aml-auth-proxy emulator --proxy-config FILE` writes it, and `make demo` runs the proxy on it. Each route is
served at `/<service>` on the proxy and uses the credential kind the service takes:

    key service            -> `key`, from the mirrored key files <secrets>/<service>/{primary,secondary}
    aml_token, v1 service  -> `aml-service-token` through the emulator's v1 control plane (MMS)
    aml_token, v2 endpoint -> `aml-endpoint-token` through its ARM control plane
    aad_token, v2 endpoint -> `aad`, an Entra ID token for https://ml.azure.com
    openai resource        -> two routes: `/<service>` with `key` sent as `api-key: <key>`, and
                              `/<service>-entra` with `aad` for https://cognitiveservices.azure.com/.default
    ML Server              -> `mlserver`, as its first user, from <secrets>/_mlserver/{username,password}

Token routes sign in to the Entra ID stand-in as the client-secret app DEV_CLIENT, whose secret (new each run)
is in <secrets>/_entra/client-secret. Names starting with `_` cannot clash with a service's key folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import yaml

from proxy.config.schema import top_default
from proxy.emulator.secretdir import write_secret_dir

if TYPE_CHECKING:
    from proxy.emulator.runner import EmulatorConfig, RunningEmulator

DEV_CLIENT = "aml-auth-proxy-dev"
ENTRA_DIR = "_entra"
MLSERVER_DIR = "_mlserver"
PROXY_PORT: int = top_default("listen.port")
ADMIN_PORT: int = top_default("admin.port")
OPENAI_SCOPE = "https://cognitiveservices.azure.com/.default"
OPENAI_ENTRA_SUFFIX = "-entra"


def route_name(service: str) -> str:
    """A proxy route name ([a-z0-9_-], at most 63) for an emulated service name."""
    name = re.sub(r"[^a-z0-9_-]+", "-", service.lower())[:63].strip("-_")
    return name or "service"


def build_proxy_config(
    emulator: RunningEmulator,
    cfg: EmulatorConfig,
    secrets_dir: Path,
    *,
    client_secret: str,
    proxy_port: int = PROXY_PORT,
    admin_port: int = ADMIN_PORT,
) -> dict[str, Any]:
    """The proxy config for `emulator` (started from `cfg`, its keys mirrored into `secrets_dir`).

    Writes the client secret (and ML Server's sign-in) under `secrets_dir`; the key files are the emulator's.
    """
    secrets_dir = secrets_dir.resolve()  # the proxy may start in another folder
    write_secret_dir(secrets_dir / ENTRA_DIR, {"client-secret": client_secret + "\n"})
    secret_file = secrets_dir / ENTRA_DIR / "client-secret"
    identity = {
        "type": "client_secret",
        "client_id": DEV_CLIENT,
        "tenant_id": emulator.tenant,
        "authority_host": emulator.entra_url,
        "client_secret_file": str(secret_file),
    }
    upstream_tls = {"ca_file": emulator.ca_file} if cfg.tls and emulator.ca_file else None
    routes: list[dict[str, Any]] = []
    for sc in cfg.services:
        extra: list[dict[str, Any]] = []
        name = route_name(sc.name)
        route: dict[str, Any] = {
            "name": name,
            "region": sc.region,
            "match": "/" + quote(name),
            "strip_prefix": True,
            "upstream": emulator.service_urls[sc.name],
        }
        if upstream_tls:
            route["tls"] = dict(upstream_tls)
        plane = {
            "subscription_id": sc.subscription,
            "resource_group": sc.resource_group,
            "workspace": sc.workspace,
            "ca_file": emulator.ca_file,
            "identity": dict(identity),
        }
        if sc.auth_mode == "key":
            keys = secrets_dir / sc.name
            route["auth"] = {
                "type": "key",
                "primary_file": str(keys / "primary"),
                "secondary_file": str(keys / "secondary"),
            }
            if sc.api == "openai":
                route["auth"].update({"header": "api-key", "template": "{key}"})
                entra_name = route_name(sc.name[: 63 - len(OPENAI_ENTRA_SUFFIX)]) + OPENAI_ENTRA_SUFFIX
                entra_route = {**route, "name": entra_name, "match": "/" + quote(entra_name)}
                if upstream_tls:
                    entra_route["tls"] = dict(upstream_tls)  # a copy: YAML would write a shared one as an alias
                entra_route["auth"] = {
                    "type": "aad",
                    "scope": OPENAI_SCOPE,
                    "ca_file": emulator.ca_file,
                    "identity": dict(identity),
                }
                extra.append(entra_route)
        elif sc.auth_mode == "aad_token":
            route["auth"] = {"type": "aad", "ca_file": emulator.ca_file, "identity": dict(identity)}
        elif sc.api == "v1":
            route["auth"] = {"type": "aml-service-token", "service": sc.name, "mms_url": emulator.control_url, **plane}
        else:
            arm = emulator.control_url
            route["auth"] = {"type": "aml-endpoint-token", "endpoint": sc.name, "arm_url": arm, **plane}
        routes.append(route)
        routes.extend(extra)
    if cfg.mlserver is not None and emulator.mlserver_url is not None:
        user, password = next(iter(cfg.mlserver.users.items()))
        ml_dir = secrets_dir / MLSERVER_DIR
        write_secret_dir(ml_dir, {"username": user + "\n", "password": password + "\n"})
        name = "mlserver" if "mlserver" not in {r["name"] for r in routes} else "mlserver-login"
        route = {
            "name": name,
            "region": "onprem",
            "match": f"/{name}",
            "strip_prefix": True,
            "upstream": emulator.mlserver_url,
            "auth": {
                "type": "mlserver",
                "username_file": str(ml_dir / "username"),
                "password_file": str(ml_dir / "password"),
                "ca_file": emulator.ca_file,
            },
        }
        if upstream_tls:
            route["tls"] = dict(upstream_tls)
        routes.append(route)
    return {
        "listen": {"host": "127.0.0.1", "port": proxy_port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "routes": routes,
    }


def with_dev_client(cfg: EmulatorConfig, client_secret: str) -> EmulatorConfig:
    """`cfg` with the proxy config's Entra app (DEV_CLIENT) registered with `client_secret`."""
    entra = dataclasses.replace(cfg.entra, clients={**cfg.entra.clients, DEV_CLIENT: client_secret})
    return dataclasses.replace(cfg, entra=entra)


def write_proxy_config(emulator: RunningEmulator, cfg: EmulatorConfig, path: Path, *, client_secret: str) -> None:
    """Write the proxy config for `emulator` to `path` (atomically; YAML with a comment saying what it is)."""
    assert cfg.keys_dir is not None, "keys are mirrored for --proxy-config"
    doc = build_proxy_config(emulator, cfg, cfg.keys_dir, client_secret=client_secret)
    header = (
        "# Written by `aml-auth-proxy emulator --proxy-config`: valid while that emulator runs (its ports, CA and\n"
        "# client secret are new each run). Start the proxy with `aml-auth-proxy run --config "
        + path.name
        + f"`, then\n# call http://127.0.0.1:{PROXY_PORT}/<route>/score. Every key is in docs/configuration.md.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(header + yaml.safe_dump(doc, sort_keys=False))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
