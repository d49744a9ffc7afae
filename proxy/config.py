"""Settings: the one place that reads the config file and the environment.

`load(path, environ)` returns frozen, keyword-only dataclasses or raises `ConfigError` carrying one line per
problem, each naming the key (and the environment variable when the value came from one), the bad value and
what is allowed. The schema below is declarative so the environment-variable names, the validation and the
documentation test all derive from one table.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from yarl import URL

ENV_PREFIX = "AML_AUTH_PROXY_"
# Variables with the prefix that are not configuration keys: the build's choice to compile (setup.py) and the
# switch that runs the compiled modules' sources instead (proxy/_pure.py). Neither is an unknown variable.
MAX_WORKERS = 256
NOT_CONFIG_ENV = frozenset({"AML_AUTH_PROXY_COMPILE", "AML_AUTH_PROXY_PURE_PYTHON"})
ROUTE_ENV_PREFIX = ENV_PREFIX + "ROUTE_"

KEY_FILE = "key"
AML_KEYS = "aml-keys"
AML_SERVICE_TOKEN = "aml-service-token"
AML_ENDPOINT_TOKEN = "aml-endpoint-token"
AAD = "aad"
MLSERVER = "mlserver"
JWT_FILE = "jwt-file"
AUTH_TYPES = (KEY_FILE, AML_KEYS, AML_SERVICE_TOKEN, AML_ENDPOINT_TOKEN, AAD, MLSERVER, JWT_FILE)
TOKEN_TYPES = (AML_SERVICE_TOKEN, AML_ENDPOINT_TOKEN, AAD, MLSERVER, JWT_FILE)
REFRESHED_TYPES = (*TOKEN_TYPES, AML_KEYS)
CONTROL_PLANE_TYPES = (AML_KEYS, AML_SERVICE_TOKEN, AML_ENDPOINT_TOKEN)
# Token kinds one replica may fetch for all (share.*): not mlserver (its fetcher revokes the token at shutdown,
# and renewal needs that replica's refresh token) and not jwt-file (nothing is fetched).
SHARED_TYPES = (AML_SERVICE_TOKEN, AML_ENDPOINT_TOKEN, AAD)
IDENTITY_TYPES = (AML_KEYS, AML_SERVICE_TOKEN, AML_ENDPOINT_TOKEN, AAD)
IDENTITY_KINDS = ("workload", "managed", "client_secret")
ARM_URL = "https://management.azure.com"
ARM_API_VERSION = "2025-12-01"
# Scopes from the protocol doc: v1 (MMS) asks for the classic ARM resource, v2 for management.azure.com.
V1_SCOPE = "https://management.core.windows.net//.default"
V2_SCOPE = "https://management.azure.com/.default"
AML_SCOPE = "https://ml.azure.com/.default"
LOG_LEVELS = ("debug", "info", "warning", "error")
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_SECRET_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_FORBIDDEN_INJECT_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "x-request-id",
        "x-ms-client-request-id",
    }
)


class ConfigError(Exception):
    """The configuration is invalid; `problems` has one human-readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, kw_only=True)
class Listen:
    host: str
    port: int


@dataclass(frozen=True, kw_only=True)
class Timeouts:
    connect: float
    read: float
    total: float | None


@dataclass(frozen=True, kw_only=True)
class Tls:
    verify: bool
    ca_file: str | None


@dataclass(frozen=True, kw_only=True)
class Pool:
    max_connections: int
    keepalive_seconds: float


@dataclass(frozen=True, kw_only=True)
class SecretRef:
    """One key of a Kubernetes Secret in `kubernetes.namespace`, read and watched through the API."""

    name: str
    key: str

    def __str__(self) -> str:
        return f"{self.name}/{self.key}"


@dataclass(frozen=True, kw_only=True)
class Identity:
    """The proxy's own Azure identity (azure-identity async credentials)."""

    type: str
    client_id: str | None
    tenant_id: str | None
    authority_host: str | None
    token_file: str | None
    client_secret_file: str | None
    client_secret_ref: SecretRef | None = None


@dataclass(frozen=True, kw_only=True)
class RefreshPolicy:
    """When to renew a token, and how to back off when renewing fails."""

    margin_seconds: float
    jitter_seconds: float
    safety_seconds: float
    fraction: float
    min_interval_seconds: float
    backoff_initial_seconds: float
    backoff_max_seconds: float
    timeout_seconds: float
    expiry_margin_seconds: float  # the defaults of all these are the schema's (auth.refresh.*), not written here


@dataclass(frozen=True, kw_only=True)
class Auth:
    """One route's credential: the kind plus the fields that kind uses (others are None)."""

    type: str
    header: str
    template: str
    primary_file: str | None = None
    secondary_file: str | None = None
    reload_seconds: float = 1.0
    subscription_id: str | None = None
    resource_group: str | None = None
    workspace: str | None = None
    service: str | None = None
    endpoint: str | None = None
    mms_url: str | None = None
    arm_url: str = ARM_URL
    api_version: str = ARM_API_VERSION
    scope: str | None = None
    ca_file: str | None = None
    refetch_seconds: float = 3600.0
    url: str | None = None
    username_file: str | None = None
    password_file: str | None = None
    token_file: str | None = None
    primary_secret_ref: SecretRef | None = None
    secondary_secret_ref: SecretRef | None = None
    identity: Identity | None = None
    refresh: RefreshPolicy | None = None

    def secret_refs(self) -> tuple[SecretRef, ...]:
        """Every Secret key this route reads through the Kubernetes API."""
        identity_ref = self.identity.client_secret_ref if self.identity is not None else None
        refs = (self.primary_secret_ref, self.secondary_secret_ref, identity_ref)
        return tuple(r for r in refs if r is not None)


@dataclass(frozen=True, kw_only=True)
class Share:
    """One replica per route fetches the token (the Lease holder) and writes it to a Secret the others read."""

    lease: str
    secret: str
    lease_seconds: int
    renew_seconds: float


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds on what callers may make the proxy hold (see docs/security.md)."""

    max_header_bytes: int = 32768
    max_headers: int = 100
    max_body_bytes: int = 0  # 0: no limit
    max_connections: int = 1024
    client_timeout_seconds: float = 60.0


@dataclass(frozen=True, kw_only=True)
class Route:
    name: str
    region: str
    upstream: URL
    match: str
    strip_prefix: bool
    deployment: str | None
    keep_caller_credential: bool
    retry_buffer_bytes: int
    tls: Tls
    timeouts: Timeouts
    pool: Pool
    auth: Auth
    share: Share | None = None


@dataclass(frozen=True, kw_only=True)
class Kubernetes:
    """How the proxy reaches the Kubernetes API (Secret watches, Events); resolved from config and environment.

    `pod_name`/`pod_namespace` come from the downward API (POD_NAME, POD_NAMESPACE); `incluster_environ` holds
    KUBERNETES_SERVICE_HOST/PORT when the pod has them; `kubeconfig_env` is KUBECONFIG.
    """

    namespace: str | None = None
    kubeconfig: str | None = None
    service_account_dir: str = SERVICE_ACCOUNT_DIR
    events: bool = False
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    pod_name: str | None = None
    pod_namespace: str | None = None
    incluster_environ: Mapping[str, str] = field(default_factory=dict)
    kubeconfig_env: str | None = None


@dataclass(frozen=True, kw_only=True)
class Settings:
    listen: Listen
    admin: Listen
    shutdown_grace_seconds: float
    log_level: str
    access_log: bool
    workers: int = 0  # 0 = one per CPU the container may use (proxy/workers.py)
    admin_allow_remote_refresh: bool = False  # POST /refresh from beyond loopback
    limits: Limits = field(default_factory=lambda: Limits())
    routes: tuple[Route, ...] = field(default_factory=tuple)
    kubernetes: Kubernetes = field(default_factory=lambda: Kubernetes())

    def uses_kubernetes(self) -> bool:
        return self.kubernetes.events or any(r.auth.secret_refs() or r.share for r in self.routes)


# --------------------------------------------------------------------------------------------------------------
# The schema. Each leaf: (dotted key, kind, default, constraint). REQUIRED marks keys without a default.


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Leaf:
    key: str  # dotted, relative to the section (top level or one route)
    kind: str  # str | int | float | bool | enum | optfloat | optstr
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    types: tuple[str, ...] | None = None  # auth types that use this key; None = every route
    required_for: tuple[str, ...] = ()  # auth types for which the key has no default
    required_unless: str | None = None  # a sibling section whose presence makes this key optional


TOP_LEAVES: tuple[Leaf, ...] = (
    Leaf("listen.host", "str", "127.0.0.1", "Address the proxy port binds to."),
    Leaf("listen.port", "int", 8080, "Proxy port (0 picks a free port).", minimum=0, maximum=65535),
    Leaf("admin.host", "str", "0.0.0.0", "Address of the admin port (/healthz, /readyz, /metrics)."),
    Leaf("admin.port", "int", 9090, "Admin port (0 picks a free port).", minimum=0, maximum=65535),
    Leaf(
        "admin.allow_remote_refresh",
        "bool",
        False,
        "Accept POST /refresh from any address, not only from loopback (forcing refreshes from the network can get "
        "the pod's identity throttled by the control plane).",
    ),
    Leaf(
        "shutdown_grace_seconds",
        "float",
        20.0,
        "After SIGTERM, how long in-flight requests may take before the process exits.",
        minimum=0,
        maximum=3600,
    ),
    Leaf("log_level", "enum", "info", "Lowest level logged.", choices=LOG_LEVELS),
    Leaf(
        "access_log",
        "bool",
        True,
        "Write one JSON access line per request (batched: written within 0.1 s, and at shutdown).",
    ),
    Leaf(
        "workers",
        "int",
        0,
        "Proxy processes sharing the proxy port; 0 = one per CPU the container may use (cgroup quota, affinity).",
        minimum=0,
        maximum=MAX_WORKERS,
    ),
    Leaf(
        "limits.max_header_bytes",
        "int",
        32768,
        "Largest request line and largest header block a caller may send (414 / 431 beyond).",
        minimum=1024,
        maximum=1 << 20,
    ),
    Leaf("limits.max_headers", "int", 100, "Most header fields in one request (431 beyond).", minimum=8, maximum=10000),
    Leaf(
        "limits.max_body_bytes",
        "int",
        0,
        "Largest request body (413 beyond); 0 means no limit (the upstream enforces its own).",
        minimum=0,
    ),
    Leaf(
        "limits.max_connections",
        "int",
        1024,
        "Open caller connections at most; a request on a connection beyond it gets 503 and the connection closes.",
        minimum=1,
        maximum=1000000,
    ),
    Leaf(
        "limits.client_timeout_seconds",
        "float",
        60.0,
        "A caller connection that is idle, still sending its request head, stalled in a request body or not reading "
        "its answers this long is closed.",
        minimum=0.1,
        maximum=3600,
    ),
    Leaf(
        "kubernetes.namespace",
        "optstr",
        None,
        "Namespace of the Secrets named by *_secret_ref (default: the service account's namespace file, else "
        "POD_NAMESPACE, else the kubeconfig context's).",
    ),
    Leaf(
        "kubernetes.kubeconfig",
        "optstr",
        None,
        "kubeconfig file for the Kubernetes API (default: the in-cluster service account, else KUBECONFIG).",
    ),
    Leaf(
        "kubernetes.service_account_dir",
        "str",
        SERVICE_ACCOUNT_DIR,
        "Directory of the in-cluster service account token, ca.crt and namespace.",
    ),
    Leaf(
        "kubernetes.events",
        "optbool",
        None,
        "Emit Kubernetes Events about the pod (default: true when POD_NAME and POD_NAMESPACE are set).",
    ),
    Leaf(
        "kubernetes.backoff_initial_seconds",
        "float",
        0.5,
        "First reconnect delay cap of a Secret watch after an error (full jitter, doubling).",
        minimum=0.01,
        maximum=3600,
    ),
    Leaf(
        "kubernetes.backoff_max_seconds",
        "float",
        30.0,
        "Largest reconnect delay of a Secret watch; a denied (403) or missing Secret is retried at this pace.",
        minimum=0.01,
        maximum=3600,
    ),
)

ROUTE_LEAVES: tuple[Leaf, ...] = (
    Leaf("name", "str", "default", "Route name, used in metrics and logs ([a-z0-9_-], at most 63)."),
    Leaf("region", "str", "unknown", "Region label for metrics (e.g. eastus)."),
    Leaf("upstream", "str", REQUIRED, "Base URL of the AML endpoint (http or https; a path is allowed)."),
    Leaf("match", "str", "/", "Path prefix this route serves; the longest matching prefix wins."),
    Leaf("strip_prefix", "bool", False, "Remove the matched prefix before appending the path to upstream."),
    Leaf("deployment", "optstr", None, "If set, sent as azureml-model-deployment, replacing the caller's."),
    Leaf(
        "keep_caller_credential",
        "bool",
        False,
        "Forward the caller's own credential header instead of replacing it (opt-in).",
    ),
    Leaf(
        "retry_buffer_bytes",
        "int",
        1048576,
        "Request bodies up to this size are buffered so a 401 can be retried with the other key.",
        minimum=0,
        maximum=64 * 1048576,
    ),
    Leaf("tls.verify", "bool", True, "Verify the upstream TLS certificate."),
    Leaf("tls.ca_file", "optstr", None, "PEM CA bundle to trust for the upstream instead of the system store."),
    Leaf(
        "timeouts.connect",
        "float",
        10.0,
        "Seconds to get an upstream connection: waiting for a free one when the pool is full, then connecting "
        "(TLS included).",
        minimum=0.001,
    ),
    Leaf(
        "timeouts.read",
        "float",
        60.0,
        "Seconds the upstream may make no progress (no byte of its answer, no piece of the upload taken) while the "
        "proxy waits on it.",
        minimum=0.001,
    ),
    Leaf(
        "timeouts.total", "optfloat", None, "Seconds for the whole upstream exchange; null = no limit.", minimum=0.001
    ),
    Leaf("pool.max_connections", "int", 100, "Open connections to the upstream at most.", minimum=1, maximum=100000),
    Leaf("pool.keepalive_seconds", "float", 30.0, "How long an idle upstream connection is kept.", minimum=0),
    Leaf("auth.type", "enum", KEY_FILE, "Credential kind.", choices=AUTH_TYPES),
    Leaf("auth.header", "str", "Authorization", "Header that carries the credential."),
    Leaf(
        "auth.template",
        "optstr",
        None,
        "Header value; {key} (key kinds) or {token} (token kinds) is replaced. Default: Bearer {key} / Bearer {token}.",
    ),
    Leaf(
        "auth.primary_file",
        "str",
        None,
        "File holding the primary key (a mounted Secret key).",
        types=(KEY_FILE,),
        required_for=(KEY_FILE,),
        required_unless="auth.primary_secret_ref",
    ),
    Leaf("auth.secondary_file", "optstr", None, "File holding the secondary key, used after a 401.", types=(KEY_FILE,)),
    Leaf(
        "auth.primary_secret_ref.name",
        "optstr",
        None,
        "Kubernetes Secret holding the primary key, read and watched through the API (instead of primary_file).",
        types=(KEY_FILE,),
    ),
    Leaf("auth.primary_secret_ref.key", "optstr", None, "Key of the primary key in that Secret.", types=(KEY_FILE,)),
    Leaf(
        "auth.secondary_secret_ref.name",
        "optstr",
        None,
        "Kubernetes Secret holding the secondary key (instead of secondary_file).",
        types=(KEY_FILE,),
    ),
    Leaf(
        "auth.secondary_secret_ref.key", "optstr", None, "Key of the secondary key in that Secret.", types=(KEY_FILE,)
    ),
    Leaf(
        "auth.reload_seconds",
        "float",
        1.0,
        "How often the key or token files are checked for changes.",
        minimum=0.05,
        maximum=3600,
        types=(KEY_FILE, JWT_FILE),
    ),
    Leaf(
        "auth.subscription_id",
        "str",
        None,
        "Azure subscription of the workspace.",
        types=CONTROL_PLANE_TYPES,
        required_for=CONTROL_PLANE_TYPES,
    ),
    Leaf(
        "auth.resource_group",
        "str",
        None,
        "Resource group of the workspace.",
        types=CONTROL_PLANE_TYPES,
        required_for=CONTROL_PLANE_TYPES,
    ),
    Leaf(
        "auth.workspace",
        "str",
        None,
        "AML workspace name.",
        types=CONTROL_PLANE_TYPES,
        required_for=CONTROL_PLANE_TYPES,
    ),
    Leaf(
        "auth.service",
        "optstr",
        None,
        "AKS web service name (AML v1). aml-keys: set service or endpoint.",
        types=(AML_KEYS, AML_SERVICE_TOKEN),
        required_for=(AML_SERVICE_TOKEN,),
    ),
    Leaf(
        "auth.endpoint",
        "optstr",
        None,
        "Online endpoint name (AML v2). aml-keys: set service or endpoint.",
        types=(AML_KEYS, AML_ENDPOINT_TOKEN),
        required_for=(AML_ENDPOINT_TOKEN,),
    ),
    Leaf(
        "auth.mms_url",
        "optstr",
        None,
        "AML v1 model management host of the workspace's region, e.g. https://eastus.api.azureml.ms.",
        types=(AML_KEYS, AML_SERVICE_TOKEN),
    ),
    Leaf(
        "auth.arm_url",
        "str",
        ARM_URL,
        "Azure Resource Manager base URL (AML v2).",
        types=(AML_KEYS, AML_ENDPOINT_TOKEN),
    ),
    Leaf(
        "auth.api_version",
        "str",
        ARM_API_VERSION,
        "ARM api-version for online endpoint calls.",
        types=(AML_KEYS, AML_ENDPOINT_TOKEN),
    ),
    Leaf(
        "auth.scope",
        "optstr",
        None,
        f"Entra ID scope requested. Default: the ARM scope of the plane, or {AML_SCOPE} for aad.",
        types=IDENTITY_TYPES,
    ),
    Leaf(
        "auth.ca_file",
        "optstr",
        None,
        "PEM CA bundle for the control plane, Entra ID and ML Server calls.",
        types=(*IDENTITY_TYPES, MLSERVER),
    ),
    Leaf(
        "auth.refetch_seconds",
        "float",
        3600.0,
        "aml-keys: how often the keys are fetched again.",
        minimum=1,
        types=(AML_KEYS,),
    ),
    Leaf(
        "auth.url", "optstr", None, "ML Server base URL for /login. Default: the upstream's origin.", types=(MLSERVER,)
    ),
    Leaf(
        "auth.username_file",
        "str",
        None,
        "File holding the ML Server user name.",
        types=(MLSERVER,),
        required_for=(MLSERVER,),
    ),
    Leaf(
        "auth.password_file",
        "str",
        None,
        "File holding the ML Server password.",
        types=(MLSERVER,),
        required_for=(MLSERVER,),
    ),
    Leaf(
        "auth.token_file",
        "str",
        None,
        "File holding a JWT that something else keeps fresh.",
        types=(JWT_FILE,),
        required_for=(JWT_FILE,),
    ),
    Leaf(
        "auth.identity.type",
        "enum",
        "workload",
        "The proxy's Azure identity.",
        choices=IDENTITY_KINDS,
        types=IDENTITY_TYPES,
    ),
    Leaf("auth.identity.client_id", "optstr", None, "Client id (default: AZURE_CLIENT_ID).", types=IDENTITY_TYPES),
    Leaf("auth.identity.tenant_id", "optstr", None, "Tenant id (default: AZURE_TENANT_ID).", types=IDENTITY_TYPES),
    Leaf(
        "auth.identity.authority_host",
        "optstr",
        None,
        "Entra ID host, https (default: AZURE_AUTHORITY_HOST, else login.microsoftonline.com).",
        types=IDENTITY_TYPES,
    ),
    Leaf(
        "auth.identity.token_file",
        "optstr",
        None,
        "workload: the federated token file (default: AZURE_FEDERATED_TOKEN_FILE).",
        types=IDENTITY_TYPES,
    ),
    Leaf(
        "auth.identity.client_secret_file",
        "optstr",
        None,
        "client_secret: file holding the client secret.",
        types=IDENTITY_TYPES,
    ),
    Leaf(
        "auth.identity.client_secret_ref.name",
        "optstr",
        None,
        "client_secret: Kubernetes Secret holding the client secret, watched through the API (instead of the file).",
        types=IDENTITY_TYPES,
    ),
    Leaf(
        "auth.identity.client_secret_ref.key",
        "optstr",
        None,
        "client_secret: key of the client secret in that Secret.",
        types=IDENTITY_TYPES,
    ),
    Leaf(
        "auth.refresh.margin_seconds",
        "float",
        0.0,
        "Refresh this long before the server's refresh time.",
        minimum=0,
        types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.jitter_seconds",
        "float",
        5.0,
        "Up to this much earlier, at random (capped at 10% of the time left), so replicas do not refresh together.",
        minimum=0,
        types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.safety_seconds",
        "float",
        60.0,
        "Never refresh later than expiry minus this (capped at 10% of the lifetime).",
        minimum=0,
        types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.expiry_margin_seconds",
        "float",
        5.0,
        "Never send a token in its last this-many seconds (at most 10% of its lifetime): the route answers 503 "
        "with Retry-After instead, as for an expired token.",
        minimum=0,
        types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.fraction",
        "float",
        0.8,
        "Without a server refresh time, refresh at this fraction of the lifetime.",
        minimum=0.1,
        maximum=0.95,
        types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.min_interval_seconds",
        "float",
        1.0,
        "Least time between two refreshes (forced ones included).",
        minimum=0.01,
        types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.backoff_initial_seconds",
        "float",
        1.0,
        "First retry delay cap after a failure.",
        minimum=0.01,
        types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.backoff_max_seconds",
        "float",
        60.0,
        "Largest retry delay (full jitter below it).",
        minimum=0.01,
        types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.timeout_seconds",
        "float",
        10.0,
        "Timeout of one control-plane or Entra ID call.",
        minimum=0.01,
        types=REFRESHED_TYPES,
    ),
    Leaf(
        "share.lease",
        "optstr",
        None,
        "Lease that elects the one replica that fetches this route's token for all; unset: each fetches its own.",
        types=SHARED_TYPES,
    ),
    Leaf(
        "share.secret",
        "optstr",
        None,
        "Secret the elected replica writes the token to and the others watch. Default: <share.lease>-token.",
        types=SHARED_TYPES,
    ),
    Leaf(
        "share.lease_seconds",
        "int",
        15,
        "Lease duration: a leader not heard of this long is replaced.",
        minimum=1,
        maximum=3600,
        types=SHARED_TYPES,
    ),
    Leaf(
        "share.renew_seconds",
        "float",
        5.0,
        "How often the leader renews the Lease and the others try to take it.",
        minimum=0.1,
        maximum=3600,
        types=SHARED_TYPES,
    ),
)


def top_leaf(key: str) -> Leaf:
    """A top-level key's schema entry (`workers`): its default, range and doc are written there only."""
    for leaf in TOP_LEAVES:
        if leaf.key == key:
            return leaf
    raise KeyError(key)


def top_default(key: str) -> Any:
    """The default of a top-level key (`listen.port`), from the schema above: the one place it is written."""
    return top_leaf(key).default


def env_name(key: str, *, route: bool) -> str:
    """Environment variable that sets `key` (a top-level key, or a key of the single route)."""
    stem = key.replace(".", "_").upper()
    return (ROUTE_ENV_PREFIX if route else ENV_PREFIX) + stem


# --------------------------------------------------------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.lines.append(f"{where}: {message}")


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _convert(leaf: Leaf, value: Any, where: str, problems: _Problems) -> Any:
    """Check one value against its leaf; return the converted value or REQUIRED on error."""
    bad = REQUIRED
    if leaf.kind in ("optstr", "optfloat", "optbool") and value is None:
        return None
    if leaf.kind in ("str", "optstr"):
        if not isinstance(value, str) or not value:
            problems.add(where, f"{_fmt(value)} is not allowed; expected a non-empty string")
            return bad
        if any(ch in value for ch in "\r\n\x00"):
            problems.add(where, f"{_fmt(value)} is not allowed; CR, LF and NUL are not allowed")
            return bad
        return value
    if leaf.kind == "enum":
        if value not in leaf.choices:
            problems.add(where, f"{_fmt(value)} is not allowed; allowed: {', '.join(leaf.choices)}")
            return bad
        return value
    if leaf.kind in ("bool", "optbool"):
        if not isinstance(value, bool):
            problems.add(where, f"{_fmt(value)} is not allowed; expected true or false")
            return bad
        return value
    if leaf.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(where, f"{_fmt(value)} is not allowed; expected a whole number{_range(leaf)}")
            return bad
    elif leaf.kind in ("float", "optfloat"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problems.add(where, f"{_fmt(value)} is not allowed; expected a number{_range(leaf)}")
            return bad
        value = float(value)
    if (leaf.minimum is not None and value < leaf.minimum) or (leaf.maximum is not None and value > leaf.maximum):
        problems.add(where, f"{_fmt(value)} is out of range; expected a number{_range(leaf)}")
        return bad
    return value


def _range(leaf: Leaf) -> str:
    if leaf.minimum is not None and leaf.maximum is not None:
        return f" from {leaf.minimum:g} to {leaf.maximum:g}"
    if leaf.minimum is not None:
        return f" >= {leaf.minimum:g}"
    return ""


def _check_unknown(raw: Mapping[str, Any], keys: list[str], prefix: str, problems: _Problems) -> None:
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
            problems.add(f"{prefix}{name}", f"{_fmt(section)} is not allowed; expected a mapping")
            continue
        _check_unknown(section, deeper, f"{prefix}{name}.", problems)


def _read_section(
    raw: Any,
    leaves: tuple[Leaf, ...],
    *,
    prefix: str,
    env_sources: Mapping[str, str],
    problems: _Problems,
) -> dict[str, Any]:
    """Walk `raw` against `leaves`; returns {dotted key: value}. Keys of other auth types are refused."""
    out: dict[str, Any] = {}
    if not isinstance(raw, Mapping):
        problems.add(prefix.rstrip(".") or "config", f"{_fmt(raw)} is not allowed; expected a mapping")
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
        if leaf.types is not None and auth_type not in leaf.types:
            if node is not REQUIRED and auth_type in AUTH_TYPES:
                problems.add(where, f"is not used with auth.type {auth_type!r}; used by: {', '.join(leaf.types)}")
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


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str], problems: _Problems) -> dict[str, str]:
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


def _check_route(values: dict[str, Any], where: str, problems: _Problems) -> URL | None:
    """Cross-field checks of one route; returns the parsed upstream URL."""
    name = values["name"]
    if isinstance(name, str) and not _NAME_RE.match(name):
        problems.add(f"{where}name", f"{_fmt(name)} is not allowed; use a-z, 0-9, '_' and '-', at most 63")
    url: URL | None = None
    upstream = values["upstream"]
    if isinstance(upstream, str):
        try:
            url = URL(upstream)
        except (ValueError, TypeError):
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            problems.add(f"{where}upstream", f"{_fmt(upstream)} is not allowed; expected an http(s) URL")
            url = None
        elif url.user or url.password or url.query_string or url.fragment:
            problems.add(
                f"{where}upstream",
                f"{_fmt(upstream)} is not allowed; no credentials, query or fragment in the URL",
            )
            url = None
    match = values["match"]
    if isinstance(match, str) and (not match.startswith("/") or "?" in match or "/../" in match + "/"):
        problems.add(f"{where}match", f"{_fmt(match)} is not allowed; expected a path prefix starting with /")
    header = values["auth.header"]
    if isinstance(header, str):
        if not _TOKEN_RE.match(header):
            problems.add(f"{where}auth.header", f"{_fmt(header)} is not allowed; expected an HTTP header name")
        elif header.lower() in _FORBIDDEN_INJECT_HEADERS or header.lower().startswith("proxy-"):
            problems.add(f"{where}auth.header", f"{_fmt(header)} is not allowed; it is a framing or reserved header")
    auth_type = values["auth.type"]
    placeholder = placeholder_for(auth_type if isinstance(auth_type, str) else KEY_FILE)
    template = values["auth.template"]
    if isinstance(template, str):
        rest = template.replace(placeholder, "", 1)
        if placeholder not in template or "{" in rest or "}" in rest:
            problems.add(
                f"{where}auth.template",
                f"{_fmt(template)} is not allowed; it must contain {placeholder} exactly once and no other braces",
            )
        elif not template.isprintable():
            problems.add(f"{where}auth.template", f"{_fmt(template)} is not allowed; control characters")
    if auth_type == AML_KEYS and (values["auth.service"] is None) == (values["auth.endpoint"] is None):
        problems.add(f"{where}auth.service", "aml-keys needs exactly one of auth.service (v1) or auth.endpoint (v2)")
    if auth_type in (AML_KEYS, AML_SERVICE_TOKEN) and values["auth.service"] and not values["auth.mms_url"]:
        problems.add(f"{where}auth.mms_url", f"is required with auth.type {auth_type!r} and auth.service (v1)")
    for key in ("auth.mms_url", "auth.arm_url", "auth.identity.authority_host"):
        _check_https(values.get(key), f"{where}{key}", problems)
    if isinstance(values.get("auth.url"), str):
        _check_http_url(values["auth.url"], f"{where}auth.url", problems)
    _check_secret_refs(values, where, problems)
    identity_type = values.get("auth.identity.type")
    if auth_type in IDENTITY_TYPES and identity_type == "client_secret":
        secret_ref = values.get("auth.identity.client_secret_ref.name")
        for key in ("auth.identity.client_secret_file", "auth.identity.tenant_id", "auth.identity.client_id"):
            if values.get(key) is None and not (key.endswith("_file") and secret_ref is not None):
                problems.add(f"{where}{key}", "is required with auth.identity.type 'client_secret'")
    if auth_type in SHARED_TYPES:
        _check_share(values, where, problems)
    return url


def _check_share(values: dict[str, Any], where: str, problems: _Problems) -> None:
    """share.*: Kubernetes names, and the timing rule that lets a new leader refresh before the refresh time."""
    lease, secret = values["share.lease"], values["share.secret"]
    lease_seconds, renew = values["share.lease_seconds"], values["share.renew_seconds"]
    if lease is None:
        if secret is not None:
            problems.add(f"{where}share.secret", "is only used with share.lease")
        return
    for key, name in (("share.lease", lease), ("share.secret", secret)):
        if isinstance(name, str) and not _DNS_SUBDOMAIN_RE.match(name):
            problems.add(
                f"{where}{key}", f"{_fmt(name)} is not allowed; a Kubernetes name: a-z, 0-9, '-' and '.', at most 253"
            )
    if isinstance(lease, str) and secret is None and len(lease) > 247:
        problems.add(f"{where}share.lease", "is too long for the default share.secret <lease>-token; set share.secret")
    if not isinstance(lease_seconds, int) or not isinstance(renew, float):
        return
    if renew >= lease_seconds:
        problems.add(
            f"{where}share.renew_seconds",
            f"{renew:g} is not allowed; expected less than share.lease_seconds ({lease_seconds})",
        )
    margin = values["auth.refresh.margin_seconds"]
    if isinstance(margin, float) and lease_seconds + renew > margin:
        problems.add(
            f"{where}share.lease_seconds",
            f"{lease_seconds} + share.renew_seconds {renew:g} is more than auth.refresh.margin_seconds ({margin:g}): "
            "a replica taking over from a dead leader would refresh after the token's refresh time; "
            "raise auth.refresh.margin_seconds to at least lease_seconds + renew_seconds",
        )


def _check_secret_refs(values: dict[str, Any], where: str, problems: _Problems) -> None:
    """*_secret_ref: name and key together, valid Kubernetes names, and never beside the file they replace."""
    for ref in ("auth.primary_secret_ref", "auth.secondary_secret_ref", "auth.identity.client_secret_ref"):
        name, key = values.get(f"{ref}.name"), values.get(f"{ref}.key")
        if (name is None) != (key is None):
            missing, given = ("key", "name") if key is None else ("name", "key")
            problems.add(f"{where}{ref}.{missing}", f"is required with {ref}.{given}")
        if isinstance(name, str) and not _DNS_SUBDOMAIN_RE.match(name):
            problems.add(f"{where}{ref}.name", f"{_fmt(name)} is not allowed; expected a Secret name (a-z 0-9 - .)")
        if isinstance(key, str) and not _SECRET_KEY_RE.match(key):
            problems.add(f"{where}{ref}.key", f"{_fmt(key)} is not allowed; expected a Secret key (a-z A-Z 0-9 - . _)")
    pairs = (
        ("auth.primary_file", "auth.primary_secret_ref"),
        ("auth.secondary_file", "auth.secondary_secret_ref"),
        ("auth.identity.client_secret_file", "auth.identity.client_secret_ref"),
    )
    for file_key, ref in pairs:
        if values.get(file_key) is not None and values.get(f"{ref}.name") is not None:
            problems.add(f"{where}{ref}", f"set {file_key} or {ref}, not both")
    files = values.get("auth.primary_file") is not None or values.get("auth.secondary_file") is not None
    refs = any(values.get(f"auth.{slot}_secret_ref.name") is not None for slot in ("primary", "secondary"))
    if files and refs and not (values.get("auth.primary_file") and values.get("auth.primary_secret_ref.name")):
        problems.add(f"{where}auth", "a route reads its keys from files or from Secrets, not both")
    if values.get("auth.identity.client_secret_ref.name") is not None and values.get("auth.identity.type") not in (
        None,
        "client_secret",
    ):
        problems.add(f"{where}auth.identity.client_secret_ref", "is used only with auth.identity.type 'client_secret'")


def placeholder_for(auth_type: str) -> str:
    """`{key}` in key templates, `{token}` in token templates."""
    return "{token}" if auth_type in TOKEN_TYPES else "{key}"


def _check_https(value: Any, where: str, problems: _Problems) -> None:
    if not isinstance(value, str):
        return
    url = _check_http_url(value, where, problems)
    if url is not None and url.scheme != "https":
        problems.add(where, f"{_fmt(value)} is not allowed; expected an https URL (credentials travel on it)")


def _check_http_url(value: str, where: str, problems: _Problems) -> URL | None:
    try:
        url = URL(value)
    except (ValueError, TypeError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
        problems.add(where, f"{_fmt(value)} is not allowed; expected an http(s) URL without query")
        return None
    return url


def parse(raw: Any, environ: Mapping[str, str]) -> Settings:
    """Validate a raw document (already parsed YAML) plus environment overrides into Settings."""
    problems = _Problems()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config: {_fmt(raw)} is not allowed; expected a mapping at the top level"])
    raw = dict(raw)
    env_sources = _apply_env(raw, environ, problems)
    top_raw = {k: v for k, v in raw.items() if k != "routes"}
    top = _read_section(top_raw, TOP_LEAVES, prefix="", env_sources=env_sources, problems=problems)
    routes_raw = raw.get("routes")
    routes: list[Route] = []
    if not isinstance(routes_raw, list) or not routes_raw:
        problems.add("routes", f"{_fmt(routes_raw)} is not allowed; expected a list of at least one route")
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
        url = _check_route(values, where, problems)
        for key, seen in (("name", seen_names), ("match", seen_matches)):
            value = values[key]
            if isinstance(value, str):
                if value in seen:
                    problems.add(f"{where}{key}", f"{_fmt(value)} is already used by routes[{seen[value]}]")
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


def _build_kubernetes(top: dict[str, Any], environ: Mapping[str, str], problems: _Problems) -> Kubernetes:
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


def _build_auth(values: dict[str, Any]) -> Auth:
    auth_type = values["auth.type"]
    template = values["auth.template"] or f"Bearer {placeholder_for(auth_type)}"
    names = (
        "primary_file",
        "secondary_file",
        "reload_seconds",
        "subscription_id",
        "resource_group",
        "workspace",
        "service",
        "endpoint",
        "mms_url",
        "arm_url",
        "api_version",
        "scope",
        "ca_file",
        "refetch_seconds",
        "url",
        "username_file",
        "password_file",
        "token_file",
    )
    fields = {name: values[f"auth.{name}"] for name in names if values[f"auth.{name}"] is not None}
    identity = None
    if auth_type in IDENTITY_TYPES:
        identity = Identity(
            type=values["auth.identity.type"],
            client_id=values["auth.identity.client_id"],
            tenant_id=values["auth.identity.tenant_id"],
            authority_host=values["auth.identity.authority_host"],
            token_file=values["auth.identity.token_file"],
            client_secret_file=values["auth.identity.client_secret_file"],
            client_secret_ref=_secret_ref(values, "auth.identity.client_secret_ref"),
        )
    refresh = None
    if auth_type in REFRESHED_TYPES:
        refresh = RefreshPolicy(**{k.split(".")[-1]: v for k, v in values.items() if k.startswith("auth.refresh.")})
    return Auth(
        type=auth_type,
        header=values["auth.header"],
        template=template,
        identity=identity,
        refresh=refresh,
        primary_secret_ref=_secret_ref(values, "auth.primary_secret_ref"),
        secondary_secret_ref=_secret_ref(values, "auth.secondary_secret_ref"),
        **fields,
    )


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
