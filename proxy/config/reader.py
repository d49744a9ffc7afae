"""The parser: the one place that reads the config file and the environment.

`load(path, environ)` returns the frozen dataclasses of proxy/config/settings.py or raises `ConfigError` carrying
one line per problem, each naming the key (and the environment variable when the value came from one), the bad
value and what is allowed. Every key's type, default and range come from proxy/config/schema.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import yaml
from yarl import URL

from proxy.config.checks import Problems, check_route, fmt
from proxy.config.schema import REQUIRED, ROUTE_LEAVES, TOP_LEAVES, Leaf, env_name
from proxy.config.settings import (
    AUTH_CLASSES,
    AUTH_TYPES,
    ENV_PREFIX,
    KEY_FILE,
    NOT_CONFIG_ENV,
    ROUTE_ENV_PREFIX,
    AuthConfig,
    ConfigError,
    Identity,
    Kubernetes,
    Limits,
    Listen,
    Pool,
    RefreshPolicy,
    Route,
    SecretRef,
    Settings,
    Share,
    Timeouts,
    Tls,
    placeholder_for,
)


def _convert(leaf: Leaf, value: Any, where: str, problems: Problems) -> Any:
    """Check one value against its leaf; return the converted value or REQUIRED on error."""
    bad = REQUIRED
    if leaf.value_type in ("optstr", "optfloat", "optbool") and value is None:
        return None
    if leaf.value_type in ("str", "optstr"):
        if not isinstance(value, str) or not value:
            problems.add(where, f"{fmt(value)} is not allowed; expected a non-empty string")
            return bad
        if any(ch in value for ch in "\r\n\x00"):
            problems.add(where, f"{fmt(value)} is not allowed; CR, LF and NUL are not allowed")
            return bad
        return value
    if leaf.value_type == "enum":
        if value not in leaf.choices:
            problems.add(where, f"{fmt(value)} is not allowed; allowed: {', '.join(leaf.choices)}")
            return bad
        return value
    if leaf.value_type in ("bool", "optbool"):
        if not isinstance(value, bool):
            problems.add(where, f"{fmt(value)} is not allowed; expected true or false")
            return bad
        return value
    if leaf.value_type == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(where, f"{fmt(value)} is not allowed; expected a whole number{_range(leaf)}")
            return bad
    elif leaf.value_type in ("float", "optfloat"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problems.add(where, f"{fmt(value)} is not allowed; expected a number{_range(leaf)}")
            return bad
        value = float(value)
    if (leaf.minimum is not None and value < leaf.minimum) or (leaf.maximum is not None and value > leaf.maximum):
        problems.add(where, f"{fmt(value)} is out of range; expected a number{_range(leaf)}")
        return bad
    return value


def _range(leaf: Leaf) -> str:
    if leaf.minimum is not None and leaf.maximum is not None:
        return f" from {leaf.minimum:g} to {leaf.maximum:g}"
    if leaf.minimum is not None:
        return f" >= {leaf.minimum:g}"
    return ""


def _check_unknown(raw: Mapping[str, Any], keys: list[str], prefix: str, problems: Problems) -> None:
    """Unknown keys at every level are problems: a typo never falls back to a default silently."""
    allowed = sorted({k.split(".")[0] for k in keys})
    for key in raw:
        if key not in allowed:
            problems.add(f"{prefix}{key}", f"unknown key; allowed: {', '.join(allowed)}")
    for name in allowed:
        deeper = [k.split(".", 1)[1] for k in keys if k.startswith(name + ".")]
        section = raw.get(name)
        if not deeper or section is None:
            continue
        if not isinstance(section, Mapping):
            problems.add(f"{prefix}{name}", f"{fmt(section)} is not allowed; expected a mapping")
            continue
        _check_unknown(section, deeper, f"{prefix}{name}.", problems)


def _read_section(
    raw: Any,
    leaves: tuple[Leaf, ...],
    *,
    prefix: str,
    env_sources: Mapping[str, str],
    problems: Problems,
) -> dict[str, Any]:
    """Walk `raw` against `leaves`; returns {dotted key: value}. Keys of other auth types are refused."""
    out: dict[str, Any] = {}
    if not isinstance(raw, Mapping):
        problems.add(prefix.rstrip(".") or "config", f"{fmt(raw)} is not allowed; expected a mapping")
        return out
    _check_unknown(raw, [leaf.key for leaf in leaves], prefix, problems)
    auth = raw.get("auth")
    auth_type = auth.get("type", KEY_FILE) if isinstance(auth, Mapping) else KEY_FILE
    for leaf in leaves:
        node: Any = raw
        for part in leaf.key.split("."):
            node = node.get(part, REQUIRED) if isinstance(node, Mapping) else REQUIRED
        where = prefix + leaf.key
        if where in env_sources:
            where = f"{where} (from {env_sources[where]})"
        if leaf.auth_types is not None and auth_type not in leaf.auth_types:
            if node is not REQUIRED and auth_type in AUTH_TYPES:
                problems.add(where, f"is not used with auth.type {auth_type!r}; used by: {', '.join(leaf.auth_types)}")
            out[leaf.key] = leaf.default
            continue
        if node is REQUIRED:
            if leaf.required_unless is not None and _present(raw, leaf.required_unless):
                out[leaf.key] = leaf.default
                continue
            if leaf.default is REQUIRED or auth_type in leaf.required_for:
                problems.add(where, f"is required{_for_type(leaf, auth_type)}")
                out[leaf.key] = REQUIRED
            else:
                out[leaf.key] = leaf.default
            continue
        out[leaf.key] = _convert(leaf, node, where, problems)
    return out


def _present(raw: Mapping[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            return False
        node = node[part]
    return True


def _for_type(leaf: Leaf, auth_type: str) -> str:
    return f" with auth.type {auth_type!r}" if auth_type in leaf.required_for else ""


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = target
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _env_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str], problems: Problems) -> dict[str, str]:
    """Overlay environment variables on the raw document. Returns {config key: env var} for messages."""
    sources: dict[str, str] = {}
    known = {env_name(leaf.key, route=False) for leaf in TOP_LEAVES} | {
        env_name(leaf.key, route=True) for leaf in ROUTE_LEAVES
    }
    known |= NOT_CONFIG_ENV
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            problems.add(name, "unknown environment variable; see docs/configuration.md for the names")
    for leaf in TOP_LEAVES:
        name = env_name(leaf.key, route=False)
        if name in environ:
            _set_dotted(raw, leaf.key, _env_scalar(environ[name]))
            sources[leaf.key] = name
    route_env = [(leaf, env_name(leaf.key, route=True)) for leaf in ROUTE_LEAVES]
    route_env = [(leaf, name) for leaf, name in route_env if name in environ]
    if route_env:
        routes = raw.get("routes")
        if routes is None:
            routes = [{}]
            raw["routes"] = routes
        if not isinstance(routes, list) or len(routes) != 1 or not isinstance(routes[0], dict):
            problems.add(route_env[0][1], f"{ROUTE_ENV_PREFIX}* variables need exactly one route in the config file")
            return sources
        for leaf, name in route_env:
            _set_dotted(routes[0], leaf.key, _env_scalar(environ[name]))
            sources[f"routes[0].{leaf.key}"] = name
    return sources


def parse(raw: Any, environ: Mapping[str, str]) -> Settings:
    """Validate a raw document (already parsed YAML) plus environment overrides into Settings."""
    problems = Problems()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config: {fmt(raw)} is not allowed; expected a mapping at the top level"])
    raw = dict(raw)
    env_sources = _apply_env(raw, environ, problems)
    top_raw = {k: v for k, v in raw.items() if k != "routes"}
    top = _read_section(top_raw, TOP_LEAVES, prefix="", env_sources=env_sources, problems=problems)
    routes_raw = raw.get("routes")
    routes: list[Route] = []
    if not isinstance(routes_raw, list) or not routes_raw:
        problems.add("routes", f"{fmt(routes_raw)} is not allowed; expected a list of at least one route")
        routes_raw = []
    seen_names: dict[str, int] = {}
    seen_matches: dict[str, int] = {}
    for i, route_raw in enumerate(routes_raw):
        where = f"routes[{i}]."
        values = _read_section(route_raw, ROUTE_LEAVES, prefix=where, env_sources=env_sources, problems=problems)
        if not values:
            continue
        if len(routes_raw) > 1 and isinstance(route_raw, Mapping) and "match" not in route_raw:
            problems.add(f"{where}match", "is required when there is more than one route")
        url = check_route(values, where, problems)
        for key, seen in (("name", seen_names), ("match", seen_matches)):
            value = values[key]
            if isinstance(value, str):
                if value in seen:
                    problems.add(f"{where}{key}", f"{fmt(value)} is already used by routes[{seen[value]}]")
                seen[value] = i
        if url is None or any(v is REQUIRED for v in values.values()):
            continue
        routes.append(_build_route(values, url))
    kube = _build_kubernetes(top, environ, problems)
    if any(v is REQUIRED for v in top.values()) or problems.lines:
        raise ConfigError(problems.lines)
    return Settings(
        kubernetes=kube,
        listen=Listen(host=top["listen.host"], port=top["listen.port"]),
        admin=Listen(host=top["admin.host"], port=top["admin.port"]),
        admin_allow_remote_refresh=top["admin.allow_remote_refresh"],
        shutdown_grace_seconds=top["shutdown_grace_seconds"],
        log_level=top["log_level"],
        access_log=top["access_log"],
        workers=top["workers"],
        limits=Limits(
            max_header_bytes=top["limits.max_header_bytes"],
            max_headers=top["limits.max_headers"],
            max_body_bytes=top["limits.max_body_bytes"],
            max_connections=top["limits.max_connections"],
            client_timeout_seconds=top["limits.client_timeout_seconds"],
        ),
        routes=tuple(routes),
    )


def _build_kubernetes(top: dict[str, Any], environ: Mapping[str, str], problems: Problems) -> Kubernetes:
    """The Kubernetes API settings; POD_NAME/POD_NAMESPACE (downward API) turn Events on unless set to false."""
    pod_name = environ.get("POD_NAME") or None
    pod_namespace = environ.get("POD_NAMESPACE") or None
    events = top.get("kubernetes.events")
    if events is None:
        events = pod_name is not None and pod_namespace is not None
    elif events is True and (pod_name is None or pod_namespace is None):
        problems.add("kubernetes.events", "true needs POD_NAME and POD_NAMESPACE (the downward API) to name the pod")
    incluster = {k: environ[k] for k in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT") if k in environ}
    initial, maximum = top.get("kubernetes.backoff_initial_seconds"), top.get("kubernetes.backoff_max_seconds")
    if isinstance(initial, float) and isinstance(maximum, float) and initial > maximum:
        problems.add("kubernetes.backoff_initial_seconds", f"{initial:g} is above kubernetes.backoff_max_seconds")
    if any(v is REQUIRED for k, v in top.items() if k.startswith("kubernetes.")):
        return Kubernetes()
    return Kubernetes(
        namespace=top["kubernetes.namespace"],
        kubeconfig=top["kubernetes.kubeconfig"],
        service_account_dir=top["kubernetes.service_account_dir"],
        events=bool(events),
        backoff_initial_seconds=top["kubernetes.backoff_initial_seconds"],
        backoff_max_seconds=top["kubernetes.backoff_max_seconds"],
        pod_name=pod_name,
        pod_namespace=pod_namespace,
        incluster_environ=incluster,
        kubeconfig_env=environ.get("KUBECONFIG") or None,
    )


def _secret_ref(values: dict[str, Any], ref: str) -> SecretRef | None:
    name, key = values.get(f"{ref}.name"), values.get(f"{ref}.key")
    return SecretRef(name=name, key=key) if isinstance(name, str) and isinstance(key, str) else None


def _build_route(values: dict[str, Any], url: URL) -> Route:
    return Route(
        name=values["name"],
        region=values["region"],
        upstream=url,
        match=values["match"],
        strip_prefix=values["strip_prefix"],
        deployment=values["deployment"],
        keep_caller_credential=values["keep_caller_credential"],
        retry_buffer_bytes=values["retry_buffer_bytes"],
        tls=Tls(verify=values["tls.verify"], ca_file=values["tls.ca_file"]),
        timeouts=Timeouts(
            connect=values["timeouts.connect"], read=values["timeouts.read"], total=values["timeouts.total"]
        ),
        pool=Pool(
            max_connections=values["pool.max_connections"],
            keepalive_seconds=values["pool.keepalive_seconds"],
        ),
        auth=_build_auth(values),
        share=_build_share(values),
    )


def _build_share(values: dict[str, Any]) -> Share | None:
    lease = values["share.lease"]
    if lease is None:
        return None
    return Share(
        lease=lease,
        secret=values["share.secret"] or f"{lease}-token",
        lease_seconds=values["share.lease_seconds"],
        renew_seconds=values["share.renew_seconds"],
    )


def _build_auth(values: dict[str, Any]) -> AuthConfig:
    """The auth.type's class, each field read from the auth.* key of its name."""
    cls = AUTH_CLASSES[values["auth.type"]]
    built: dict[str, Any] = {}
    for f in fields(cls):
        key = f"auth.{f.name}"
        if f.name == "template":
            built[f.name] = values[key] or f"Bearer {placeholder_for(cls.type)}"
        elif f.name == "identity":
            built[f.name] = Identity(
                type=values["auth.identity.type"],
                client_id=values["auth.identity.client_id"],
                tenant_id=values["auth.identity.tenant_id"],
                authority_host=values["auth.identity.authority_host"],
                token_file=values["auth.identity.token_file"],
                client_secret_file=values["auth.identity.client_secret_file"],
                client_secret_ref=_secret_ref(values, "auth.identity.client_secret_ref"),
                azure_proxy=values["auth.identity.azure_proxy"],
            )
        elif f.name == "refresh":
            built[f.name] = RefreshPolicy(
                **{k.removeprefix("auth.refresh."): v for k, v in values.items() if k.startswith("auth.refresh.")}
            )
        elif f.name.endswith("_secret_ref"):
            built[f.name] = _secret_ref(values, key)
        else:
            built[f.name] = values[key]
    return cls(**built)


def load(
    path: str | None,
    environ: Mapping[str, str] | None = None,
    *,
    reader: Callable[[str], str] | None = None,
) -> Settings:
    """Read the YAML file at `path` (optional when the environment defines the single route)."""
    env = os.environ if environ is None else environ
    raw: Any = None
    if path is not None:
        try:
            text = reader(path) if reader else _read_text(path)
        except OSError as exc:
            raise ConfigError([f"--config: cannot read {path!r}: {exc.strerror or exc}"]) from exc
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError([f"--config: {path!r} is not valid YAML{at}"]) from exc
    return parse(raw, env)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()
