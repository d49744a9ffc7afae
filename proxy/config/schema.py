"""The config schema: every key, its type, default, range and doc, written once.

The parser (proxy/config/reader.py), the environment-variable names, the chart's values.schema.json
(scripts/chart_schema.py), the CLI's ranges and docs/configuration.md's key table all derive from this table or
are tested against it. Each leaf: (dotted key, value type, default, doc, constraints). REQUIRED marks keys without
a default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config.settings import (
    AML_ENDPOINT_TOKEN,
    AML_KEYS,
    AML_SCOPE,
    AML_SERVICE_TOKEN,
    ARM_API_VERSION,
    ARM_URL,
    AUTH_TYPES,
    CONTROL_PLANE_TYPES,
    ENV_PREFIX,
    IDENTITY_KINDS,
    IDENTITY_TYPES,
    JWT_FILE,
    KEY_FILE,
    LOG_LEVELS,
    MAX_WORKERS,
    MLSERVER,
    REFRESHED_TYPES,
    ROUTE_ENV_PREFIX,
    SERVICE_ACCOUNT_DIR,
    SHARED_TYPES,
)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Leaf:
    key: str  # dotted, relative to the section (top level or one route)
    value_type: str  # str | int | float | bool | enum | optstr | optfloat | optbool
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    auth_types: tuple[str, ...] | None = None  # auth types that use this key; None = every route
    required_for: tuple[str, ...] = ()  # auth types for which the key has no default
    required_unless: str | None = None  # a sibling section whose presence makes this key optional
    doc_default: str | None = None  # the default as docs/configuration.md says it, where the parser decides it
    see: str | None = None  # a link to the section of docs/configuration.md that says more


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
        see="[Workers](#workers)",
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
        "Namespace of the Secrets named by `*_secret_ref` (default: the service account's namespace file, else "
        "POD_NAMESPACE, else the kubeconfig context's, else `default`).",
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
        "Emit Kubernetes Events about the pod (auto: true when POD_NAME and POD_NAMESPACE are set).",
        doc_default="auto",
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
        auth_types=(KEY_FILE,),
        required_for=(KEY_FILE,),
        required_unless="auth.primary_secret_ref",
    ),
    Leaf(
        "auth.secondary_file",
        "optstr",
        None,
        "File holding the secondary key, used after a 401.",
        auth_types=(KEY_FILE,),
    ),
    Leaf(
        "auth.primary_secret_ref.name",
        "optstr",
        None,
        "Kubernetes Secret holding the primary key, read and watched through the API (instead of `primary_file`).",
        auth_types=(KEY_FILE,),
        see="[Kubernetes](#kubernetes)",
    ),
    Leaf(
        "auth.primary_secret_ref.key", "optstr", None, "Key of the primary key in that Secret.", auth_types=(KEY_FILE,)
    ),
    Leaf(
        "auth.secondary_secret_ref.name",
        "optstr",
        None,
        "Kubernetes Secret holding the secondary key (instead of `secondary_file`).",
        auth_types=(KEY_FILE,),
    ),
    Leaf(
        "auth.secondary_secret_ref.key",
        "optstr",
        None,
        "Key of the secondary key in that Secret.",
        auth_types=(KEY_FILE,),
    ),
    Leaf(
        "auth.reload_seconds",
        "float",
        1.0,
        "How often the key or token files are checked for changes.",
        minimum=0.05,
        maximum=3600,
        auth_types=(KEY_FILE, JWT_FILE),
    ),
    Leaf(
        "auth.subscription_id",
        "str",
        None,
        "Azure subscription of the workspace.",
        auth_types=CONTROL_PLANE_TYPES,
        required_for=CONTROL_PLANE_TYPES,
    ),
    Leaf(
        "auth.resource_group",
        "str",
        None,
        "Resource group of the workspace.",
        auth_types=CONTROL_PLANE_TYPES,
        required_for=CONTROL_PLANE_TYPES,
    ),
    Leaf(
        "auth.workspace",
        "str",
        None,
        "AML workspace name.",
        auth_types=CONTROL_PLANE_TYPES,
        required_for=CONTROL_PLANE_TYPES,
    ),
    Leaf(
        "auth.service",
        "optstr",
        None,
        "AKS web service name (AML v1). aml-keys: set service or endpoint.",
        auth_types=(AML_KEYS, AML_SERVICE_TOKEN),
        required_for=(AML_SERVICE_TOKEN,),
    ),
    Leaf(
        "auth.endpoint",
        "optstr",
        None,
        "Online endpoint name (AML v2). aml-keys: set service or endpoint.",
        auth_types=(AML_KEYS, AML_ENDPOINT_TOKEN),
        required_for=(AML_ENDPOINT_TOKEN,),
    ),
    Leaf(
        "auth.mms_url",
        "optstr",
        None,
        "AML v1 model management host of the workspace's region, e.g. https://eastus.api.azureml.ms.",
        auth_types=(AML_KEYS, AML_SERVICE_TOKEN),
        required_for=(AML_SERVICE_TOKEN,),  # aml-keys needs it with auth.service (proxy/config/checks.py)
    ),
    Leaf(
        "auth.arm_url",
        "str",
        ARM_URL,
        "Azure Resource Manager base URL (AML v2).",
        auth_types=(AML_KEYS, AML_ENDPOINT_TOKEN),
    ),
    Leaf(
        "auth.api_version",
        "str",
        ARM_API_VERSION,
        "ARM api-version for online endpoint calls.",
        auth_types=(AML_KEYS, AML_ENDPOINT_TOKEN),
    ),
    Leaf(
        "auth.scope",
        "optstr",
        None,
        f"Entra ID scope requested. Default: the ARM scope of the plane, or {AML_SCOPE} for aad.",
        auth_types=IDENTITY_TYPES,
    ),
    Leaf(
        "auth.ca_file",
        "optstr",
        None,
        "PEM CA bundle for the control plane, Entra ID and ML Server calls.",
        auth_types=(*IDENTITY_TYPES, MLSERVER),
    ),
    Leaf(
        "auth.refetch_seconds",
        "float",
        3600.0,
        "aml-keys: how often the keys are fetched again.",
        minimum=1,
        auth_types=(AML_KEYS,),
    ),
    Leaf(
        "auth.url",
        "optstr",
        None,
        "ML Server base URL for /login. Default: the upstream's origin.",
        auth_types=(MLSERVER,),
    ),
    Leaf(
        "auth.username_file",
        "str",
        None,
        "File holding the ML Server user name.",
        auth_types=(MLSERVER,),
        required_for=(MLSERVER,),
    ),
    Leaf(
        "auth.password_file",
        "str",
        None,
        "File holding the ML Server password.",
        auth_types=(MLSERVER,),
        required_for=(MLSERVER,),
    ),
    Leaf(
        "auth.token_file",
        "str",
        None,
        "File holding a JWT that something else keeps fresh.",
        auth_types=(JWT_FILE,),
        required_for=(JWT_FILE,),
    ),
    Leaf(
        "auth.identity.type",
        "enum",
        "workload",
        "The proxy's Azure identity.",
        choices=IDENTITY_KINDS,
        auth_types=IDENTITY_TYPES,
    ),
    Leaf("auth.identity.client_id", "optstr", None, "Client id (default: AZURE_CLIENT_ID).", auth_types=IDENTITY_TYPES),
    Leaf("auth.identity.tenant_id", "optstr", None, "Tenant id (default: AZURE_TENANT_ID).", auth_types=IDENTITY_TYPES),
    Leaf(
        "auth.identity.authority_host",
        "optstr",
        None,
        "Entra ID host, https (default: AZURE_AUTHORITY_HOST, else login.microsoftonline.com).",
        auth_types=IDENTITY_TYPES,
    ),
    Leaf(
        "auth.identity.token_file",
        "optstr",
        None,
        "workload: the federated token file (default: AZURE_FEDERATED_TOKEN_FILE).",
        auth_types=IDENTITY_TYPES,
    ),
    Leaf(
        "auth.identity.client_secret_file",
        "optstr",
        None,
        "client_secret: file holding the client secret.",
        auth_types=IDENTITY_TYPES,
    ),
    Leaf(
        "auth.identity.client_secret_ref.name",
        "optstr",
        None,
        "client_secret: Kubernetes Secret holding the client secret, watched through the API (instead of "
        "`client_secret_file`).",
        auth_types=IDENTITY_TYPES,
    ),
    Leaf(
        "auth.identity.client_secret_ref.key",
        "optstr",
        None,
        "client_secret: key of the client secret in that Secret.",
        auth_types=IDENTITY_TYPES,
    ),
    Leaf(
        "auth.identity.azure_proxy",
        "bool",
        False,
        "workload: get Entra tokens through the AKS identity-binding token proxy that the workload identity webhook "
        "names in AZURE_KUBERNETES_TOKEN_PROXY, AZURE_KUBERNETES_SNI_NAME and AZURE_KUBERNETES_CA_FILE "
        "(azure-identity's `enable_azure_proxy`; needs azure-identity >= 1.27.0 and loads aiohttp, about 10 MiB).",
        see="[AKS identity bindings](#aks-identity-bindings)",
        auth_types=IDENTITY_TYPES,
    ),
    Leaf(
        "auth.refresh.margin_seconds",
        "float",
        0.0,
        "Refresh this long before the server's refresh time.",
        minimum=0,
        auth_types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.jitter_seconds",
        "float",
        5.0,
        "Up to this much earlier, at random (capped at 10% of the time left), so replicas do not refresh together.",
        minimum=0,
        auth_types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.safety_seconds",
        "float",
        60.0,
        "Never refresh later than expiry minus this (capped at 10% of the lifetime).",
        minimum=0,
        auth_types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.expiry_margin_seconds",
        "float",
        5.0,
        "Never send a token in its last this-many seconds (at most 10% of its lifetime): the route answers 503 "
        "with `Retry-After` instead, as for an expired token.",
        minimum=0,
        see="[the refresh schedule](#token-and-fetched-key-kinds)",
        auth_types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.fraction",
        "float",
        0.8,
        "Without a server refresh time, refresh at this fraction of the lifetime.",
        minimum=0.1,
        maximum=0.95,
        auth_types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.min_interval_seconds",
        "float",
        1.0,
        "Least time between two refreshes (forced ones included).",
        minimum=0.01,
        auth_types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.backoff_initial_seconds",
        "float",
        1.0,
        "First retry delay cap after a failure.",
        minimum=0.01,
        auth_types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.backoff_max_seconds",
        "float",
        60.0,
        "Largest retry delay (full jitter below it).",
        minimum=0.01,
        auth_types=REFRESHED_TYPES,
    ),
    Leaf(
        "auth.refresh.timeout_seconds",
        "float",
        10.0,
        "Timeout of one control-plane or Entra ID call.",
        minimum=0.01,
        auth_types=REFRESHED_TYPES,
    ),
    Leaf(
        "share.lease",
        "optstr",
        None,
        "Lease that elects the one replica that fetches this route's token for all; unset: each replica fetches "
        "its own.",
        see="[Sharing a token across replicas](#sharing-a-token-across-replicas)",
        auth_types=SHARED_TYPES,
    ),
    Leaf(
        "share.secret",
        "optstr",
        None,
        "Secret the elected replica writes the token to and the others watch.",
        doc_default="`<share.lease>-token`",
        auth_types=SHARED_TYPES,
    ),
    Leaf(
        "share.lease_seconds",
        "int",
        15,
        "Lease duration (whole seconds): a leader not heard of this long is replaced.",
        minimum=1,
        maximum=3600,
        auth_types=SHARED_TYPES,
    ),
    Leaf(
        "share.renew_seconds",
        "float",
        5.0,
        "How often the leader renews the Lease and the others try to take it; below `lease_seconds`.",
        minimum=0.1,
        maximum=3600,
        auth_types=SHARED_TYPES,
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
