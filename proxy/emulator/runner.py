"""Start the whole emulator from one config: control plane, scoring front ends, Entra ID and IMDS, optional ML
Server, optional echo backend, key files.

Config (YAML file or dict); only `services[].name` and `services[].deployments` are required:

    control_plane_tokens: [dev-token]        # static bearer tokens the control planes accept; one is made up if
                                             # empty (Entra stand-in tokens for ARM are accepted as well)
    latency: {eastus: 0.02}                  # seconds added to every control-plane call for that region
    clock_offset_seconds: 0                  # run the emulator's clock ahead (+) or behind (-) the real one
    entra:                                   # the Entra ID stand-in (always served, over HTTPS)
      tenant: 00000000-0000-0000-0000-0000000000aa   # this is the default; the only tenant
      token_lifetime_seconds: 3599
      clients: {<client id>: <secret>}       # client-secret apps
      federated: {<client id>: system:serviceaccount:<ns>:<sa>}   # workload identity apps
      managed_identities: [<client id>]      # IMDS; the first is the default identity
    mlserver:                                # optional; absent = no ML Server listener
      users: {admin: <password>}
      access_token_lifetime_seconds: 3600
      refresh_token_lifetime_seconds: 1209600
      backend: echo                          # or an http(s) URL
    services:
      - name: demo
        api: v1                              # v1 (AKS web service) | v2 (online endpoint) | openai (an Azure
                                             # OpenAI resource, proxy/emulator/aoai.py); default v1
        region: eastus                       # default eastus
        subscription: 00000000-0000-0000-0000-000000000000   # this is the default
        resource_group: rg                   # default rg
        workspace: ws                        # default ws
        auth_mode: key                       # key | aml_token | aad_token (v2 only); openai: none (it takes
                                             # keys and Entra tokens for https://cognitiveservices.azure.com)
        token_lifetime_seconds: 3600         # aml_token: lifetime of an issued token
        token_refresh_after_seconds: 1800    # aml_token: refreshAfter = issue time + this; default half the lifetime
        primary_key: ...                     # optional; random when absent
        secondary_key: ...                   # optional; random when absent
        deployments: {blue: "http://127.0.0.1:5001"}   # or "echo": the built-in echo backend; openai:
                                             # deployment name -> model name, default {gpt-4o-mini: gpt-4o-mini}
        default_deployment: blue             # optional when there is exactly one deployment
        scoring_port: 0                      # v2 and openai: the service's own listener (one host each)
        stream_delay_seconds: 0.05           # openai only: the pause between two events of a streamed answer
    listen: {host: 127.0.0.1, scoring_port: 0, control_port: 0, entra_port: 0, imds_port: 0, mlserver_port: 0}
    keys_dir: ./aml-keys                    # optional: mirror keys to <keys_dir>/<service>/{primary,secondary}

v1 services are scored at `<scoring_url>/api/v1/service/<name>/...`; each v2 and openai service gets its own
listener (`RunningEmulator.service_urls`; an openai one serves `/openai/v1/chat/completions`). This module is
the only one that binds sockets or reads the config file.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import secrets
import shutil
import ssl
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from yarl import URL

from proxy.config.settings import ConfigError
from proxy.emulator.aoai import create_openai_app
from proxy.emulator.control import create_control_app
from proxy.emulator.echo import create_echo_app
from proxy.emulator.entra import create_entra_app, create_imds_app
from proxy.emulator.identities import (
    DEFAULT_ENTRA_TOKEN_LIFETIME,
    DEFAULT_MLSERVER_ACCESS_LIFETIME,
    DEFAULT_MLSERVER_REFRESH_LIFETIME,
    DEFAULT_TENANT,
    EntraDirectory,
    MLServerSessions,
)
from proxy.emulator.mlserver import create_mlserver_app
from proxy.emulator.scoring import create_scoring_app
from proxy.emulator.secretdir import write_secret_dir
from proxy.emulator.state import (
    API_KINDS,
    AUTH_MODES,
    DEFAULT_STREAM_DELAY_SECONDS,
    DEFAULT_TOKEN_LIFETIME,
    MAX_CLOCK_OFFSET_SECONDS,
    MAX_STREAM_DELAY_SECONDS,
    ApiKind,
    AuthMode,
    EmulatorState,
    Service,
    new_key,
)
from proxy.emulator.tls import DEFAULT_HOSTS, make_local_tls

log = logging.getLogger(__name__)

ECHO_BACKEND = "echo"
DEFAULT_SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
SHUTDOWN_TIMEOUT = 2.0

MAX_LIFETIME_SECONDS = 366 * 24 * 3600
DEFAULT_ENTRA_CLIENT = "emulator-client"

_TOP_KEYS = frozenset(
    {
        "control_plane_tokens",
        "latency",
        "services",
        "listen",
        "keys_dir",
        "clock_offset_seconds",
        "entra",
        "mlserver",
        "tls",
    }
)
_SERVICE_KEYS = frozenset(
    {
        "name",
        "api",
        "region",
        "subscription",
        "resource_group",
        "workspace",
        "auth_mode",
        "primary_key",
        "secondary_key",
        "deployments",
        "default_deployment",
        "scoring_port",
        "token_lifetime_seconds",
        "token_refresh_after_seconds",
        "stream_delay_seconds",
    }
)
DEFAULT_OPENAI_DEPLOYMENTS = {"gpt-4o-mini": "gpt-4o-mini"}
_API_KINDS: dict[str, ApiKind] = {"v1": "v1", "v2": "v2", "openai": "openai"}
_AUTH_MODES: dict[str, AuthMode] = {"key": "key", "aml_token": "aml_token", "aad_token": "aad_token"}
_LISTEN_KEYS = frozenset({"host", "scoring_port", "control_port", "entra_port", "imds_port", "mlserver_port"})
_ENTRA_KEYS = frozenset({"tenant", "token_lifetime_seconds", "clients", "federated", "managed_identities"})
_MLSERVER_KEYS = frozenset({"users", "access_token_lifetime_seconds", "refresh_token_lifetime_seconds", "backend"})


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    name: str
    api: str = "v1"
    region: str = "eastus"
    subscription: str = DEFAULT_SUBSCRIPTION
    resource_group: str = "rg"
    workspace: str = "ws"
    auth_mode: str = "key"
    primary_key: str | None = field(default=None, repr=False)
    secondary_key: str | None = field(default=None, repr=False)
    deployments: Mapping[str, str]
    default_deployment: str
    scoring_port: int = 0
    token_lifetime_seconds: int = DEFAULT_TOKEN_LIFETIME
    token_refresh_after_seconds: int | None = None
    stream_delay_seconds: float = DEFAULT_STREAM_DELAY_SECONDS


@dataclass(frozen=True, kw_only=True)
class MLServerConfig:
    users: Mapping[str, str] = field(repr=False)
    access_token_lifetime_seconds: int = DEFAULT_MLSERVER_ACCESS_LIFETIME
    refresh_token_lifetime_seconds: int = DEFAULT_MLSERVER_REFRESH_LIFETIME
    backend: str = "echo"


@dataclass(frozen=True, kw_only=True)
class EmulatorConfig:
    services: tuple[ServiceConfig, ...]
    control_plane_tokens: tuple[str, ...] = ()
    latency: Mapping[str, float] = field(default_factory=dict)
    clock_offset_seconds: float = 0.0
    entra: EntraDirectory = field(default_factory=EntraDirectory)
    mlserver: MLServerConfig | None = None
    host: str = "127.0.0.1"
    scoring_port: int = 0
    control_port: int = 0
    entra_port: int = 0
    imds_port: int = 0
    mlserver_port: int = 0
    keys_dir: Path | None = None
    tls: bool = False  # every listener but IMDS over HTTPS with the emulator's own CA (Entra ID always is)


def default_config(*, backend: str = ECHO_BACKEND) -> dict[str, Any]:
    """One v1 service "demo" in eastus whose single deployment is `backend`."""
    return {"services": [{"name": "demo", "api": "v1", "region": "eastus", "deployments": {"blue": backend}}]}


# -- validation --------------------------------------------------------------------------------------------------


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535


def _is_backend(value: Any) -> bool:
    if value == ECHO_BACKEND:
        return True
    if not isinstance(value, str):
        return False
    try:
        url = URL(value)
    except (ValueError, TypeError):
        return False
    return url.scheme in ("http", "https") and bool(url.host)


def _text(problems: list[str], where: str, value: Any, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        problems.append(f"{where}: must be a non-empty string, got {value!r}")
        return default
    return value


def _seconds(
    problems: list[str], where: str, value: Any, default: int, *, low: int = 1, high: int = MAX_LIFETIME_SECONDS
) -> int:
    """A whole number of seconds from `low` to `high`; `default` when absent (and after a reported problem)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        problems.append(f"{where}: must be an integer number of seconds from {low} to {high}, got {value!r}")
        return default
    return value


def _unknown_keys(problems: list[str], prefix: str, raw: Mapping[Any, Any], allowed: frozenset[str]) -> None:
    for key in sorted(set(raw) - allowed, key=str):
        problems.append(f"{prefix}{key}: unknown key; allowed: {', '.join(sorted(allowed))}")


def _is_section(problems: list[str], where: str, raw: Any, allowed: frozenset[str]) -> bool:
    """Whether `raw` is a mapping (a problem when not); each of its keys outside `allowed` is a problem."""
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a mapping, got {type(raw).__name__}")
        return False
    _unknown_keys(problems, f"{where}.", raw, allowed)
    return True


def _string_map(problems: list[str], where: str, value: Any, *, what: str, secret: bool) -> dict[str, str]:
    """A mapping of non-empty strings to non-empty strings; secret values are never quoted in a problem."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(f"{where}: must be a mapping of client id to {what}, got {type(value).__name__}")
        return {}
    clean: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            problems.append(f"{where}: keys must be non-empty strings, got {key!r}")
        elif not isinstance(item, str) or not item:
            shown = "" if secret else f", got {item!r}"
            problems.append(f"{where}.{key}: the {what} must be a non-empty string{shown}")
        else:
            clean[key] = item
    return clean


def _parse_entra(raw: Any, problems: list[str]) -> EntraDirectory:
    if raw is None:
        return EntraDirectory()
    if not _is_section(problems, "entra", raw, _ENTRA_KEYS):
        return EntraDirectory()
    tenant = _text(problems, "entra.tenant", raw.get("tenant"), DEFAULT_TENANT)
    if "/" in tenant or any(c.isspace() for c in tenant):
        problems.append(f"entra.tenant: must not contain '/' or spaces, got {tenant!r}")
        tenant = DEFAULT_TENANT
    lifetime = _seconds(
        problems, "entra.token_lifetime_seconds", raw.get("token_lifetime_seconds"), DEFAULT_ENTRA_TOKEN_LIFETIME
    )
    clients = _string_map(problems, "entra.clients", raw.get("clients"), what="client secret", secret=True)
    federated = _string_map(problems, "entra.federated", raw.get("federated"), what="subject", secret=False)
    identities_raw = raw.get("managed_identities")
    identities: list[str] = []
    if identities_raw is not None and not isinstance(identities_raw, list):
        problems.append(f"entra.managed_identities: must be a list of client ids, got {type(identities_raw).__name__}")
    else:
        for i, client_id in enumerate(identities_raw or []):
            if not isinstance(client_id, str) or not client_id:
                problems.append(f"entra.managed_identities[{i}]: must be a non-empty string, got {client_id!r}")
            elif client_id in identities:
                problems.append(f"entra.managed_identities[{i}]: duplicate client id {client_id!r}")
            else:
                identities.append(client_id)
    return EntraDirectory(
        tenant=tenant,
        token_lifetime_seconds=lifetime,
        clients=clients,
        federated=federated,
        managed_identities=tuple(identities),
    )


def _parse_mlserver(raw: Any, problems: list[str]) -> MLServerConfig | None:
    if raw is None:
        return None
    if not _is_section(problems, "mlserver", raw, _MLSERVER_KEYS):
        return None
    start = len(problems)
    users_raw = raw.get("users")
    if not isinstance(users_raw, Mapping) or not users_raw:
        problems.append("mlserver.users: required, a mapping of user name to password")
        users: dict[str, str] = {}
    else:
        users = {}
        for name, password in users_raw.items():
            if not isinstance(name, str) or not name:
                problems.append(f"mlserver.users: user names must be non-empty strings, got {name!r}")
            elif not isinstance(password, str) or not password:
                problems.append(f"mlserver.users.{name}: the password must be a non-empty string")
            else:
                users[name] = password
    access = _seconds(
        problems,
        "mlserver.access_token_lifetime_seconds",
        raw.get("access_token_lifetime_seconds"),
        DEFAULT_MLSERVER_ACCESS_LIFETIME,
    )
    refresh = _seconds(
        problems,
        "mlserver.refresh_token_lifetime_seconds",
        raw.get("refresh_token_lifetime_seconds"),
        DEFAULT_MLSERVER_REFRESH_LIFETIME,
    )
    backend = raw.get("backend", ECHO_BACKEND)
    if not _is_backend(backend):
        problems.append(f"mlserver.backend: must be an http(s) URL or 'echo', got {backend!r}")
    if len(problems) > start:
        return None
    return MLServerConfig(
        users=users, access_token_lifetime_seconds=access, refresh_token_lifetime_seconds=refresh, backend=backend
    )


def _parse_service(index: int, raw: Any, problems: list[str]) -> ServiceConfig | None:
    where = f"services[{index}]"
    if not _is_section(problems, where, raw, _SERVICE_KEYS):
        return None
    start = len(problems)
    name = raw.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        problems.append(f"{where}.name: required, a non-empty string without '/', got {name!r}")
        name = f"<{where}>"
    else:
        where = f"services[{index}] ({name})"
    api = raw.get("api", "v1")
    if api not in API_KINDS:
        problems.append(f"{where}.api: must be one of {', '.join(API_KINDS)}, got {api!r}")
    auth_mode = raw.get("auth_mode", "key")
    if auth_mode not in AUTH_MODES:
        problems.append(f"{where}.auth_mode: must be one of {', '.join(AUTH_MODES)}, got {auth_mode!r}")
    elif api == "openai" and "auth_mode" in raw:
        problems.append(f"{where}.auth_mode: an openai service takes keys and Entra tokens alike; leave it out")
    elif auth_mode == "aad_token" and api != "v2":
        problems.append(f"{where}.auth_mode: aad_token is only for v2 online endpoints (api: v2), got api {api!r}")
    stream_delay = raw.get("stream_delay_seconds", DEFAULT_STREAM_DELAY_SECONDS)
    if api != "openai" and "stream_delay_seconds" in raw:
        problems.append(f"{where}.stream_delay_seconds: only for openai services")
    elif (
        isinstance(stream_delay, bool)
        or not isinstance(stream_delay, int | float)
        or not 0 <= stream_delay <= MAX_STREAM_DELAY_SECONDS
    ):
        problems.append(
            f"{where}.stream_delay_seconds: must be a number of seconds from 0 to {MAX_STREAM_DELAY_SECONDS:.0f}, "
            f"got {stream_delay!r}"
        )
        stream_delay = DEFAULT_STREAM_DELAY_SECONDS
    lifetime = _seconds(
        problems, f"{where}.token_lifetime_seconds", raw.get("token_lifetime_seconds"), DEFAULT_TOKEN_LIFETIME
    )
    refresh_after_raw = raw.get("token_refresh_after_seconds")
    refresh_after: int | None = None
    if refresh_after_raw is not None:
        refresh_after = _seconds(
            problems, f"{where}.token_refresh_after_seconds", refresh_after_raw, 0, low=0, high=lifetime
        )
    region = _text(problems, f"{where}.region", raw.get("region"), "eastus")
    subscription = _text(problems, f"{where}.subscription", raw.get("subscription"), DEFAULT_SUBSCRIPTION)
    resource_group = _text(problems, f"{where}.resource_group", raw.get("resource_group"), "rg")
    workspace = _text(problems, f"{where}.workspace", raw.get("workspace"), "ws")
    keys: dict[str, str | None] = {}
    for key_name in ("primary_key", "secondary_key"):
        value = raw.get(key_name)
        if value is not None and (not isinstance(value, str) or not value):
            # Never echo the value: it is (meant to be) a secret.
            problems.append(f"{where}.{key_name}: must be a non-empty string when given")
            value = None
        keys[key_name] = value
    deployments = raw.get("deployments")
    if api == "openai" and deployments is None:
        deployments = DEFAULT_OPENAI_DEPLOYMENTS
    clean: dict[str, str] = {}
    if api == "openai":
        clean = _openai_deployments(problems, where, deployments)
    elif not isinstance(deployments, Mapping) or not deployments:
        problems.append(f"{where}.deployments: required, a mapping of deployment name to backend URL or 'echo'")
    else:
        for dep_name, backend in deployments.items():
            if not isinstance(dep_name, str) or not dep_name:
                problems.append(f"{where}.deployments: deployment names must be non-empty strings, got {dep_name!r}")
            elif not _is_backend(backend):
                problems.append(f"{where}.deployments.{dep_name}: must be an http(s) URL or 'echo', got {backend!r}")
            else:
                clean[dep_name] = backend
    default = raw.get("default_deployment")
    if default is None:
        if len(clean) == 1 or (api == "openai" and clean):
            default = next(iter(clean))
        elif clean:
            problems.append(f"{where}.default_deployment: required when there is more than one deployment")
    elif not isinstance(default, str) or not isinstance(deployments, Mapping) or default not in deployments:
        problems.append(f"{where}.default_deployment: {default!r} is not one of the deployments {sorted(clean)}")
    scoring_port = raw.get("scoring_port", 0)
    if not _is_port(scoring_port):
        problems.append(f"{where}.scoring_port: must be an integer port from 0 to 65535, got {scoring_port!r}")
    elif scoring_port and api == "v1":
        problems.append(f"{where}.scoring_port: only v2 and openai services have their own listener")
    if len(problems) > start:
        return None
    return ServiceConfig(
        name=name,
        api=api,
        region=region,
        subscription=subscription,
        resource_group=resource_group,
        workspace=workspace,
        auth_mode=auth_mode,
        primary_key=keys["primary_key"],
        secondary_key=keys["secondary_key"],
        deployments=clean,
        default_deployment=str(default),
        scoring_port=scoring_port,
        token_lifetime_seconds=lifetime,
        token_refresh_after_seconds=refresh_after,
        stream_delay_seconds=float(stream_delay),
    )


def _openai_deployments(problems: list[str], where: str, deployments: Any) -> dict[str, str]:
    """An openai service's deployments: deployment name -> model name (both non-empty, no '/' in the name)."""
    if not isinstance(deployments, Mapping) or not deployments:
        problems.append(f"{where}.deployments: a mapping of deployment name to model name")
        return {}
    clean: dict[str, str] = {}
    for dep_name, model in deployments.items():
        if not isinstance(dep_name, str) or not dep_name or "/" in dep_name:
            problems.append(f"{where}.deployments: deployment names must be non-empty strings without '/'")
        elif not isinstance(model, str) or not model:
            problems.append(f"{where}.deployments.{dep_name}: must be a model name, got {model!r}")
        else:
            clean[dep_name] = model
    return clean


def parse_config(raw: Any) -> EmulatorConfig:
    """Validate a config mapping; raises ConfigError listing every problem, each naming its key."""
    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise ConfigError([f"config: must be a mapping at the top level, got {type(raw).__name__}"])
    _unknown_keys(problems, "", raw, _TOP_KEYS)

    tokens_raw = raw.get("control_plane_tokens") or []
    tokens: list[str] = []
    if not isinstance(tokens_raw, list):
        problems.append(f"control_plane_tokens: must be a list of strings, got {type(tokens_raw).__name__}")
    else:
        for i, token in enumerate(tokens_raw):
            if not isinstance(token, str) or not token or any(c.isspace() for c in token):
                problems.append(f"control_plane_tokens[{i}]: must be a non-empty string without spaces")
            else:
                tokens.append(token)

    latency_raw = raw.get("latency") or {}
    latency: dict[str, float] = {}
    if not isinstance(latency_raw, Mapping):
        problems.append(f"latency: must be a mapping of region to seconds, got {type(latency_raw).__name__}")
    else:
        for region, seconds in latency_raw.items():
            ok_number = isinstance(seconds, int | float) and not isinstance(seconds, bool)
            if not isinstance(region, str) or not region:
                problems.append(f"latency: region names must be non-empty strings, got {region!r}")
            elif not ok_number or not 0 <= seconds <= 3600:
                problems.append(f"latency.{region}: must be a number of seconds from 0 to 3600, got {seconds!r}")
            else:
                latency[region] = float(seconds)

    services_raw = raw.get("services")
    services: list[ServiceConfig] = []
    if not isinstance(services_raw, list) or not services_raw:
        problems.append("services: required, a non-empty list of services")
    else:
        seen: set[str] = set()
        for i, item in enumerate(services_raw):
            parsed = _parse_service(i, item, problems)
            if parsed is None:
                continue
            if parsed.name in seen:
                problems.append(f"services[{i}].name: duplicate service name {parsed.name!r}")
            seen.add(parsed.name)
            services.append(parsed)

    offset = raw.get("clock_offset_seconds", 0)
    ok_offset = isinstance(offset, int | float) and not isinstance(offset, bool) and math.isfinite(offset)
    if not ok_offset or not -MAX_CLOCK_OFFSET_SECONDS <= offset <= MAX_CLOCK_OFFSET_SECONDS:
        problems.append(
            f"clock_offset_seconds: must be a number of seconds from {-MAX_CLOCK_OFFSET_SECONDS:.0f} "
            f"to {MAX_CLOCK_OFFSET_SECONDS:.0f}, got {offset!r}"
        )
        offset = 0
    entra = _parse_entra(raw.get("entra"), problems)
    mlserver = _parse_mlserver(raw.get("mlserver"), problems)

    listen = raw.get("listen") or {}
    host = "127.0.0.1"
    ports = dict.fromkeys(("scoring_port", "control_port", "entra_port", "imds_port", "mlserver_port"), 0)
    if _is_section(problems, "listen", listen, _LISTEN_KEYS):
        host = _text(problems, "listen.host", listen.get("host"), host)
        for key in ports:
            port = listen.get(key, 0)
            if not _is_port(port):
                problems.append(f"listen.{key}: must be an integer port from 0 to 65535, got {port!r}")
            else:
                ports[key] = port

    keys_dir_raw = raw.get("keys_dir")
    keys_dir: Path | None = None
    if keys_dir_raw is not None:
        if not isinstance(keys_dir_raw, str) or not keys_dir_raw:
            problems.append(f"keys_dir: must be a directory path, got {keys_dir_raw!r}")
        else:
            keys_dir = Path(keys_dir_raw)

    tls_raw = raw.get("tls", False)
    if not isinstance(tls_raw, bool):
        problems.append(f"tls: must be true or false, got {tls_raw!r}")

    if problems:
        raise ConfigError(problems)
    return EmulatorConfig(
        tls=tls_raw is True,
        services=tuple(services),
        control_plane_tokens=tuple(tokens),
        latency=latency,
        clock_offset_seconds=float(offset),
        entra=entra,
        mlserver=mlserver,
        host=host,
        scoring_port=ports["scoring_port"],
        control_port=ports["control_port"],
        entra_port=ports["entra_port"],
        imds_port=ports["imds_port"],
        mlserver_port=ports["mlserver_port"],
        keys_dir=keys_dir,
    )


def _read_yaml(path: str | Path) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror or exc}"]) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {str(exc).splitlines()[0]}"]) from exc


def load_config_file(path: str | Path) -> EmulatorConfig:
    """Read and validate a YAML (or JSON) config file."""
    return parse_config(_read_yaml(path))


# -- running -----------------------------------------------------------------------------------------------------


def _url_host(host: str) -> str:
    """The host to put in URLs for a listen address; wildcard binds are reached on loopback."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Access log lines without the query string: ML Server takes a refresh token there (`?refreshToken=`)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %.3fs', request.remote, request.method, request.rel_url.raw_path, response.status, time
        )


async def _serve_app(
    app: web.Application, *, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT, access_log_class=PathOnlyAccessLogger)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    scheme = "https" if ssl_context is not None else "http"
    return runner, f"{scheme}://{_url_host(host)}:{bound_port}"


def _tls_hosts(host: str) -> tuple[str, ...]:
    """Names for the self-made server certificate: loopback, plus the listen address when it is a specific one."""
    url_host = _url_host(host).strip("[]")
    return DEFAULT_HOSTS if url_host in DEFAULT_HOSTS else (*DEFAULT_HOSTS, url_host)


class RunningEmulator:
    """A started emulator. `service_urls[name]` is where that service scores (append `/score`).

    `entra_url` is the Entra ID authority host (HTTPS; trust `ca_file`), `imds_url` what
    AZURE_POD_IDENTITY_AUTHORITY_HOST should be, `mlserver_url` None when no ML Server is configured.
    """

    def __init__(self) -> None:
        self.state = EmulatorState()
        self.scoring_url = ""
        self.control_url = ""
        self.entra_url = ""
        self.imds_url = ""
        self.mlserver_url: str | None = None
        self.ca_file: str | None = None
        self.tenant = ""
        self.echo_url: str | None = None
        self.service_urls: dict[str, str] = {}
        self.control_plane_token = ""
        self.keys_dir: Path | None = None
        self._runners: list[web.AppRunner] = []
        self._tls_dir: Path | None = None

    async def close(self) -> None:
        """Stop every listener, front ends first, and remove the self-made TLS files; safe to call twice."""
        runners, self._runners = self._runners, []
        try:
            for runner in reversed(runners):
                server = runner.server
                transports = [h.transport for h in server.connections] if server is not None else []
                await runner.cleanup()
                # A TLS connection whose client left without close_notify (urllib3 does) would wait out asyncio's
                # 30 s TLS shutdown, outliving the loop: cut what is left now that the emulator is closed.
                for transport in transports:
                    if transport is not None:
                        transport.abort()
        finally:
            tls_dir, self._tls_dir = self._tls_dir, None
            if tls_dir is not None:
                shutil.rmtree(tls_dir, ignore_errors=True)

    async def __aenter__(self) -> RunningEmulator:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def service_account_token(self, client_id: str) -> str:
        """A Kubernetes service-account token (1 h) that the Entra stand-in accepts for federated app `client_id`."""
        return self.state.service_account_token(client_id)

    def write_service_account_token(self, client_id: str, path: str | Path) -> Path:
        """Write a fresh service-account token to `path` with a trailing newline, as kubelet does; atomically."""
        target = Path(path)
        token = self.service_account_token(client_id)
        fd, tmp = tempfile.mkstemp(prefix=".sa-token-", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(token + "\n")
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return target

    def entra_token(self, audience: str, *, client_id: str = DEFAULT_ENTRA_CLIENT) -> str:
        """An Entra stand-in access token for `audience` (e.g. https://management.azure.com), without HTTP."""
        return self.state.issue_entra_token(client_id=client_id, audience=audience).access_token

    def mirror_keys(self, service: Service) -> None:
        """Write one service's current keys to keys_dir/<service>/ (no-op without keys_dir)."""
        if self.keys_dir is None:
            return
        write_secret_dir(
            self.keys_dir / service.name, {"primary": service.primary_key, "secondary": service.secondary_key}
        )


async def start_emulator(
    config: EmulatorConfig | Mapping[str, Any],
    *,
    ssl_context: ssl.SSLContext | None = None,
    ca_file: str | Path | None = None,
    clock: Callable[[], float] = time.time,
    entra_ssl_context: ssl.SSLContext | None = None,
) -> RunningEmulator:
    """Start everything `config` describes; ports 0 are replaced by the bound ones in the returned URLs.

    With `ssl_context` the control plane, every scoring front end, ML Server and Entra ID serve HTTPS with it
    (`ca_file`, if given, is passed on as `RunningEmulator.ca_file`). Without it, Entra ID still serves HTTPS
    with a self-made certificate whose CA is `RunningEmulator.ca_file`, and the others plain HTTP. IMDS and the
    echo backend are always plain HTTP (IMDS is, and the echo backend sits behind the front end, like
    azmlinfsrv). `clock` is the emulator's time source before `clock_offset_seconds`. `entra_ssl_context`, when
    given, serves Entra ID with its own certificate instead (e.g. a trusted one while the control plane's is not,
    or the other way round, to put a TLS fault on one of the two).
    """
    cfg = config if isinstance(config, EmulatorConfig) else parse_config(config)
    emulator = RunningEmulator()
    try:
        await _start(
            emulator, cfg, ssl_context=ssl_context, ca_file=ca_file, clock=clock, entra_ssl_context=entra_ssl_context
        )
    except BaseException:
        await emulator.close()
        raise
    return emulator


async def _start(
    emulator: RunningEmulator,
    cfg: EmulatorConfig,
    *,
    ssl_context: ssl.SSLContext | None,
    ca_file: str | Path | None,
    clock: Callable[[], float],
    entra_ssl_context: ssl.SSLContext | None = None,
) -> None:
    if ssl_context is not None:
        entra_context = ssl_context
        emulator.ca_file = None if ca_file is None else str(ca_file)
    else:
        emulator._tls_dir = Path(tempfile.mkdtemp(prefix="aml-emulator-tls-"))
        tls = make_local_tls(emulator._tls_dir, hosts=_tls_hosts(cfg.host))
        entra_context = tls.server_context()
        emulator.ca_file = str(tls.ca_file)
        if cfg.tls:
            ssl_context = entra_context

    needs_echo = any(
        backend == ECHO_BACKEND for s in cfg.services if s.api != "openai" for backend in s.deployments.values()
    )
    needs_echo = needs_echo or (cfg.mlserver is not None and cfg.mlserver.backend == ECHO_BACKEND)
    if needs_echo:
        runner, emulator.echo_url = await _serve_app(create_echo_app(), host="127.0.0.1", port=0, ssl_context=None)
        emulator._runners.append(runner)

    services = []
    for sc in cfg.services:
        deployments = {
            name: (emulator.echo_url or "") if backend == ECHO_BACKEND and sc.api != "openai" else backend
            for name, backend in sc.deployments.items()
        }
        services.append(
            Service(
                name=sc.name,
                api=_API_KINDS[sc.api],
                region=sc.region,
                subscription=sc.subscription,
                resource_group=sc.resource_group,
                workspace=sc.workspace,
                deployments=deployments,
                default_deployment=sc.default_deployment,
                auth_mode=_AUTH_MODES[sc.auth_mode],
                primary_key=sc.primary_key if sc.primary_key is not None else new_key(),
                secondary_key=sc.secondary_key if sc.secondary_key is not None else new_key(),
                token_lifetime_seconds=sc.token_lifetime_seconds,
                token_refresh_after_seconds=sc.token_refresh_after_seconds,
                stream_delay_seconds=sc.stream_delay_seconds,
            )
        )
    tokens = cfg.control_plane_tokens or (f"dev-control-plane-{secrets.token_urlsafe(16)}",)
    mlserver = None
    if cfg.mlserver is not None:
        mlserver = MLServerSessions(
            users=cfg.mlserver.users,
            access_token_lifetime_seconds=cfg.mlserver.access_token_lifetime_seconds,
            refresh_token_lifetime_seconds=cfg.mlserver.refresh_token_lifetime_seconds,
        )
    state = EmulatorState(
        services=services,
        control_plane_tokens=tokens,
        latency=cfg.latency,
        entra=cfg.entra,
        mlserver=mlserver,
        clock=clock,
        clock_offset_seconds=cfg.clock_offset_seconds,
    )
    emulator.state = state
    emulator.control_plane_token = tokens[0]
    emulator.tenant = cfg.entra.tenant

    runner, emulator.entra_url = await _serve_app(
        create_entra_app(state), host=cfg.host, port=cfg.entra_port, ssl_context=entra_ssl_context or entra_context
    )
    emulator._runners.append(runner)
    state.entra_url = emulator.entra_url
    runner, emulator.imds_url = await _serve_app(
        create_imds_app(state), host=cfg.host, port=cfg.imds_port, ssl_context=None
    )
    emulator._runners.append(runner)

    emulator.keys_dir = cfg.keys_dir
    if cfg.keys_dir is not None:
        for service in state.services.values():
            emulator.mirror_keys(service)
        state.keys_listeners.append(emulator.mirror_keys)

    control_app = create_control_app(
        state, base_url=lambda: emulator.control_url, scoring_url_for=emulator.service_urls.get
    )
    runner, emulator.control_url = await _serve_app(
        control_app, host=cfg.host, port=cfg.control_port, ssl_context=ssl_context
    )
    emulator._runners.append(runner)

    runner, emulator.scoring_url = await _serve_app(
        create_scoring_app(state), host=cfg.host, port=cfg.scoring_port, ssl_context=ssl_context
    )
    emulator._runners.append(runner)
    for sc in cfg.services:
        if sc.api == "v1":
            emulator.service_urls[sc.name] = f"{emulator.scoring_url}/api/v1/service/{sc.name}"
            continue
        app = (
            create_openai_app(state, service=sc.name)
            if sc.api == "openai"
            else create_scoring_app(state, default_service=sc.name)
        )
        runner, url = await _serve_app(
            app,
            host=cfg.host,
            port=sc.scoring_port,
            ssl_context=ssl_context,
        )
        emulator._runners.append(runner)
        emulator.service_urls[sc.name] = url

    if cfg.mlserver is not None:
        backend = cfg.mlserver.backend
        app = create_mlserver_app(state, backend=(emulator.echo_url or "") if backend == ECHO_BACKEND else backend)
        runner, emulator.mlserver_url = await _serve_app(
            app, host=cfg.host, port=cfg.mlserver_port, ssl_context=ssl_context
        )
        emulator._runners.append(runner)


# -- CLI ---------------------------------------------------------------------------------------------------------
