"""Start the whole emulator from one config: control plane, scoring front ends, optional echo backend, key files.

Config (YAML file or dict); only `services[].name` and `services[].deployments` are required:

    control_plane_tokens: [dev-token]        # bearer tokens the control planes accept; one is made up if empty
    latency: {eastus: 0.02}                  # seconds added to every control-plane call for that region
    services:
      - name: demo
        api: v1                              # v1 (AKS web service) | v2 (online endpoint); default v1
        region: eastus                       # default eastus
        subscription: 00000000-0000-0000-0000-000000000000   # this is the default
        resource_group: rg                   # default rg
        workspace: ws                        # default ws
        auth_mode: key                       # only key for now
        primary_key: ...                     # optional; random when absent
        secondary_key: ...                   # optional; random when absent
        deployments: {blue: "http://127.0.0.1:5001"}   # or "echo": the built-in echo backend
        default_deployment: blue             # optional when there is exactly one deployment
        scoring_port: 0                      # v2 only: the endpoint's own listener (one host per endpoint)
    listen: {host: 127.0.0.1, scoring_port: 0, control_port: 0}
    keys_dir: /tmp/aml-keys                  # optional: mirror keys to <keys_dir>/<service>/{primary,secondary}

v1 services are scored at `<scoring_url>/api/v1/service/<name>/...`; each v2 service gets its own listener
(`RunningEmulator.service_urls`). This module is the only one that binds sockets or reads the config file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import signal
import ssl
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from aiohttp import web
from yarl import URL

from proxy.emulator.control import create_control_app
from proxy.emulator.echo import create_echo_app
from proxy.emulator.scoring import create_scoring_app
from proxy.emulator.secretdir import write_secret_dir
from proxy.emulator.state import API_KINDS, AUTH_MODES, EmulatorState, Service, new_key

log = logging.getLogger(__name__)

ECHO_BACKEND = "echo"
DEFAULT_SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
SHUTDOWN_TIMEOUT = 2.0

_TOP_KEYS = frozenset({"control_plane_tokens", "latency", "services", "listen", "keys_dir"})
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
    }
)
_LISTEN_KEYS = frozenset({"host", "scoring_port", "control_port"})


class ConfigError(ValueError):
    """The emulator config is unusable; `problems` has one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


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


@dataclass(frozen=True, kw_only=True)
class EmulatorConfig:
    services: tuple[ServiceConfig, ...]
    control_plane_tokens: tuple[str, ...] = ()
    latency: Mapping[str, float] = field(default_factory=dict)
    host: str = "127.0.0.1"
    scoring_port: int = 0
    control_port: int = 0
    keys_dir: Path | None = None


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


def _parse_service(index: int, raw: Any, problems: list[str]) -> ServiceConfig | None:
    where = f"services[{index}]"
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a mapping, got {type(raw).__name__}")
        return None
    for key in sorted(set(raw) - _SERVICE_KEYS, key=str):
        problems.append(f"{where}.{key}: unknown key; allowed: {', '.join(sorted(_SERVICE_KEYS))}")
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
    clean: dict[str, str] = {}
    if not isinstance(deployments, Mapping) or not deployments:
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
        if len(clean) == 1:
            default = next(iter(clean))
        elif clean:
            problems.append(f"{where}.default_deployment: required when there is more than one deployment")
    elif not isinstance(default, str) or not isinstance(deployments, Mapping) or default not in deployments:
        problems.append(f"{where}.default_deployment: {default!r} is not one of the deployments {sorted(clean)}")
    scoring_port = raw.get("scoring_port", 0)
    if not _is_port(scoring_port):
        problems.append(f"{where}.scoring_port: must be an integer port from 0 to 65535, got {scoring_port!r}")
    elif scoring_port and api != "v2":
        problems.append(f"{where}.scoring_port: only v2 services have their own listener")
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
    )


def parse_config(raw: Any) -> EmulatorConfig:
    """Validate a config mapping; raises ConfigError listing every problem, each naming its key."""
    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise ConfigError([f"config: must be a mapping at the top level, got {type(raw).__name__}"])
    for key in sorted(set(raw) - _TOP_KEYS, key=str):
        problems.append(f"{key}: unknown key; allowed: {', '.join(sorted(_TOP_KEYS))}")

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

    listen = raw.get("listen") or {}
    host, scoring_port, control_port = "127.0.0.1", 0, 0
    if not isinstance(listen, Mapping):
        problems.append(f"listen: must be a mapping, got {type(listen).__name__}")
    else:
        for key in sorted(set(listen) - _LISTEN_KEYS, key=str):
            problems.append(f"listen.{key}: unknown key; allowed: {', '.join(sorted(_LISTEN_KEYS))}")
        host = _text(problems, "listen.host", listen.get("host"), host)
        scoring_port = listen.get("scoring_port", 0)
        control_port = listen.get("control_port", 0)
        for key, port in (("scoring_port", scoring_port), ("control_port", control_port)):
            if not _is_port(port):
                problems.append(f"listen.{key}: must be an integer port from 0 to 65535, got {port!r}")

    keys_dir_raw = raw.get("keys_dir")
    keys_dir: Path | None = None
    if keys_dir_raw is not None:
        if not isinstance(keys_dir_raw, str) or not keys_dir_raw:
            problems.append(f"keys_dir: must be a directory path, got {keys_dir_raw!r}")
        else:
            keys_dir = Path(keys_dir_raw)

    if problems:
        raise ConfigError(problems)
    return EmulatorConfig(
        services=tuple(services),
        control_plane_tokens=tuple(tokens),
        latency=latency,
        host=host,
        scoring_port=scoring_port,
        control_port=control_port,
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


async def _serve_app(
    app: web.Application, *, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT)
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


class RunningEmulator:
    """A started emulator. `service_urls[name]` is where that service scores (append `/score`)."""

    def __init__(self) -> None:
        self.state = EmulatorState()
        self.scoring_url = ""
        self.control_url = ""
        self.echo_url: str | None = None
        self.service_urls: dict[str, str] = {}
        self.control_plane_token = ""
        self.keys_dir: Path | None = None
        self._runners: list[web.AppRunner] = []

    async def close(self) -> None:
        """Stop every listener, front ends first; safe to call twice."""
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()

    async def __aenter__(self) -> RunningEmulator:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def mirror_keys(self, service: Service) -> None:
        """Write one service's current keys to keys_dir/<service>/ (no-op without keys_dir)."""
        if self.keys_dir is None:
            return
        write_secret_dir(
            self.keys_dir / service.name, {"primary": service.primary_key, "secondary": service.secondary_key}
        )


async def start_emulator(
    config: EmulatorConfig | Mapping[str, Any], *, ssl_context: ssl.SSLContext | None = None
) -> RunningEmulator:
    """Start everything `config` describes; ports 0 are replaced by the bound ones in the returned URLs.

    With `ssl_context` the control plane and every scoring front end serve HTTPS; the echo backend stays plain
    HTTP on 127.0.0.1 (it sits behind the front end, like azmlinfsrv).
    """
    cfg = config if isinstance(config, EmulatorConfig) else parse_config(config)
    emulator = RunningEmulator()
    try:
        await _start(emulator, cfg, ssl_context)
    except BaseException:
        await emulator.close()
        raise
    return emulator


async def _start(emulator: RunningEmulator, cfg: EmulatorConfig, ssl_context: ssl.SSLContext | None) -> None:
    needs_echo = any(backend == ECHO_BACKEND for s in cfg.services for backend in s.deployments.values())
    if needs_echo:
        runner, emulator.echo_url = await _serve_app(create_echo_app(), host="127.0.0.1", port=0, ssl_context=None)
        emulator._runners.append(runner)

    services = []
    for sc in cfg.services:
        deployments = {
            name: (emulator.echo_url or "") if backend == ECHO_BACKEND else backend
            for name, backend in sc.deployments.items()
        }
        services.append(
            Service(
                name=sc.name,
                api="v2" if sc.api == "v2" else "v1",
                region=sc.region,
                subscription=sc.subscription,
                resource_group=sc.resource_group,
                workspace=sc.workspace,
                deployments=deployments,
                default_deployment=sc.default_deployment,
                primary_key=sc.primary_key if sc.primary_key is not None else new_key(),
                secondary_key=sc.secondary_key if sc.secondary_key is not None else new_key(),
            )
        )
    tokens = cfg.control_plane_tokens or (f"dev-control-plane-{secrets.token_urlsafe(16)}",)
    state = EmulatorState(services=services, control_plane_tokens=tokens, latency=cfg.latency)
    emulator.state = state
    emulator.control_plane_token = tokens[0]

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
        runner, url = await _serve_app(
            create_scoring_app(state, default_service=sc.name),
            host=cfg.host,
            port=sc.scoring_port,
            ssl_context=ssl_context,
        )
        emulator._runners.append(runner)
        emulator.service_urls[sc.name] = url


# -- CLI ---------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aml-auth-proxy emulator",
        description="Local stand-ins for the AML scoring front end and control planes.",
    )
    parser.add_argument("--config", help="YAML config file (default: one v1 service 'demo' in eastus)")
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--scoring-port", type=int, help="scoring front end port (0: any free port)")
    parser.add_argument("--control-port", type=int, help="control plane port (0: any free port)")
    parser.add_argument("--backend", help="backend URL for the default service (default: built-in echo)")
    parser.add_argument("--keys-dir", help="mirror every service's keys into DIR/<service>/{primary,secondary}")
    return parser


def _build_config(args: argparse.Namespace) -> EmulatorConfig:
    raw: dict[str, Any]
    if args.config:
        if args.backend:
            raise ConfigError(["--backend: only used without --config; set deployments in the config file"])
        loaded = _read_yaml(args.config)
        if not isinstance(loaded, Mapping):
            raise ConfigError([f"{args.config}: must hold a mapping at the top level"])
        raw = dict(loaded)
    else:
        raw = default_config(backend=args.backend or ECHO_BACKEND)
    listen = raw.get("listen") or {}
    if isinstance(listen, Mapping):  # otherwise parse_config reports it
        overrides = {"host": args.host, "scoring_port": args.scoring_port, "control_port": args.control_port}
        raw["listen"] = {**listen, **{k: v for k, v in overrides.items() if v is not None}}
    if args.keys_dir is not None:
        raw["keys_dir"] = args.keys_dir
    return parse_config(raw)


async def _run_until_signalled(cfg: EmulatorConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        try:
            emulator = await start_emulator(cfg)
        except OSError as exc:
            print(f"emulator: cannot listen: {exc}", file=sys.stderr)
            return 1
        try:
            ready = {
                "event": "emulator_ready",
                "scoring_url": emulator.scoring_url,
                "control_url": emulator.control_url,
                "services": sorted(emulator.state.services),
                "service_urls": emulator.service_urls,
                "control_plane_token": emulator.control_plane_token,  # a made-up dev token, not a key
            }
            print(json.dumps(ready), flush=True)
            await stop.wait()
        finally:
            await emulator.close()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


def main(argv: list[str]) -> int:
    """`aml-auth-proxy emulator ...`: run until SIGTERM/SIGINT. Exit 0 when stopped, 2 on a bad config."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        cfg = _build_config(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"emulator config: {problem}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run_until_signalled(cfg))
    return 0
