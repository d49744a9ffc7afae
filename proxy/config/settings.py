"""What a valid configuration holds: frozen, keyword-only dataclasses, one per auth type for a route's credential.

Nothing here has a default of its own: proxy/config/reader.py fills every field from the schema
(proxy/config/schema.py), and tests/test_config_schema.py holds each auth type's fields to the schema's keys for
that type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import ClassVar

from yarl import URL

ENV_PREFIX = "AML_AUTH_PROXY_"
ROUTE_ENV_PREFIX = ENV_PREFIX + "ROUTE_"
# Variables with the prefix that are not configuration keys: the build's choice to compile (setup.py) and the
# switch that runs the compiled modules' sources instead (proxy/_pure.py). Neither is an unknown variable.
NOT_CONFIG_ENV = frozenset({"AML_AUTH_PROXY_COMPILE", "AML_AUTH_PROXY_PURE_PYTHON"})
MAX_WORKERS = 256

# auth.type values
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
# Token types one replica may fetch for all (share.*): not mlserver (its fetcher revokes the token at shutdown,
# and renewal needs that replica's refresh token) and not jwt-file (nothing is fetched).
SHARED_TYPES = (AML_SERVICE_TOKEN, AML_ENDPOINT_TOKEN, AAD)
IDENTITY_TYPES = (AML_KEYS, AML_SERVICE_TOKEN, AML_ENDPOINT_TOKEN, AAD)
IDENTITY_KINDS = ("workload", "managed", "client_secret")  # auth.identity.type values
ARM_URL = "https://management.azure.com"
ARM_API_VERSION = "2025-12-01"
# Scopes from the protocol doc: v1 (MMS) asks for the classic ARM resource, v2 for management.azure.com.
V1_SCOPE = "https://management.core.windows.net//.default"
V2_SCOPE = "https://management.azure.com/.default"
AML_SCOPE = "https://ml.azure.com/.default"
# AKS identity bindings: azure-identity's WorkloadIdentityCredential(enable_azure_proxy=True) came in 1.27.0.
AZURE_PROXY_MIN_IDENTITY = (1, 27, 0)
LOG_LEVELS = ("debug", "info", "warning", "error")
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class ConfigError(Exception):
    """The configuration is invalid; `problems` has one human-readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def placeholder_for(auth_type: str) -> str:
    """`{key}` in key templates, `{token}` in token templates."""
    return "{token}" if auth_type in TOKEN_TYPES else "{key}"


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
    """The proxy's own Azure identity (azure-identity async credentials); `type` is one of IDENTITY_KINDS."""

    type: str
    client_id: str | None
    tenant_id: str | None
    authority_host: str | None
    token_file: str | None
    client_secret_file: str | None
    client_secret_ref: SecretRef | None
    azure_proxy: bool  # workload: AKS identity bindings (azure-identity's enable_azure_proxy)


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
    expiry_margin_seconds: float


# --------------------------------------------------------------------------------------------------------------
# A route's credential: one class per auth.type, holding exactly the auth.* keys the schema gives that type.


@dataclass(frozen=True, kw_only=True)
class _Auth:
    type: ClassVar[str]
    header: str
    template: str  # the header's value, with placeholder_for(type) where the secret goes

    def secret_refs(self) -> tuple[SecretRef, ...]:
        """Every Secret key this route reads through the Kubernetes API."""
        refs: list[SecretRef] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Identity):
                value = value.client_secret_ref
            if isinstance(value, SecretRef):
                refs.append(value)
        return tuple(refs)


@dataclass(frozen=True, kw_only=True)
class KeyAuth(_Auth):
    """Keys from files or Secrets; the secondary is sent after a 401 with the primary."""

    type: ClassVar[str] = KEY_FILE
    primary_file: str | None
    secondary_file: str | None
    primary_secret_ref: SecretRef | None
    secondary_secret_ref: SecretRef | None
    reload_seconds: float


@dataclass(frozen=True, kw_only=True)
class _Renewed(_Auth):
    """A credential fetched, and fetched again on a schedule (proxy/refresher.py)."""

    refresh: RefreshPolicy


@dataclass(frozen=True, kw_only=True)
class _WithIdentity(_Renewed):
    """Fetched with the proxy's own Azure identity; `scope` None means the type's default scope."""

    identity: Identity
    scope: str | None
    ca_file: str | None


@dataclass(frozen=True, kw_only=True)
class _AmlWorkspace(_WithIdentity):
    subscription_id: str
    resource_group: str
    workspace: str


@dataclass(frozen=True, kw_only=True)
class AmlKeysAuth(_AmlWorkspace):
    """Keys listed from a v1 service (`service`, `mms_url`) or a v2 online endpoint (`endpoint`): exactly one."""

    type: ClassVar[str] = AML_KEYS
    service: str | None
    endpoint: str | None
    mms_url: str | None
    arm_url: str
    api_version: str
    refetch_seconds: float


@dataclass(frozen=True, kw_only=True)
class AmlServiceTokenAuth(_AmlWorkspace):
    """An AML v1 AKS web service token (legacy)."""

    type: ClassVar[str] = AML_SERVICE_TOKEN
    service: str
    mms_url: str


@dataclass(frozen=True, kw_only=True)
class AmlEndpointTokenAuth(_AmlWorkspace):
    """An AML v2 online endpoint's aml_token."""

    type: ClassVar[str] = AML_ENDPOINT_TOKEN
    endpoint: str
    arm_url: str
    api_version: str


@dataclass(frozen=True, kw_only=True)
class AadAuth(_WithIdentity):
    """An Entra ID token for `scope`."""

    type: ClassVar[str] = AAD


@dataclass(frozen=True, kw_only=True)
class MlServerAuth(_Renewed):
    """Machine Learning Server's /login; `url` None means the upstream's origin."""

    type: ClassVar[str] = MLSERVER
    url: str | None
    username_file: str
    password_file: str
    ca_file: str | None


@dataclass(frozen=True, kw_only=True)
class JwtFileAuth(_Renewed):
    """A JWT another process keeps in a file."""

    type: ClassVar[str] = JWT_FILE
    token_file: str
    reload_seconds: float


AuthConfig = KeyAuth | AmlKeysAuth | AmlServiceTokenAuth | AmlEndpointTokenAuth | AadAuth | MlServerAuth | JwtFileAuth
AmlAuth = AmlKeysAuth | AmlServiceTokenAuth | AmlEndpointTokenAuth
IdentityAuth = AmlKeysAuth | AmlServiceTokenAuth | AmlEndpointTokenAuth | AadAuth
RenewedAuth = AmlKeysAuth | AmlServiceTokenAuth | AmlEndpointTokenAuth | AadAuth | MlServerAuth | JwtFileAuth
AUTH_CLASSES: Mapping[str, type[AuthConfig]] = {
    cls.type: cls
    for cls in (KeyAuth, AmlKeysAuth, AmlServiceTokenAuth, AmlEndpointTokenAuth, AadAuth, MlServerAuth, JwtFileAuth)
}

# --------------------------------------------------------------------------------------------------------------


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
    auth: AuthConfig
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
