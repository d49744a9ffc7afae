"""What the emulator knows: services, their keys, accepted control-plane tokens, faults, latency and its clock.

Service descriptions are frozen; a key regeneration swaps the whole `Service` object in `EmulatorState.services`
in one assignment, so a request that has read a service sees one consistent pair of keys. Everything here runs on
the event loop, so no locks are needed. This module owns no HTTP: the apps in `scoring.py`, `control.py`,
`entra.py` and `mlserver.py` read and change the state, `faults.py` says how a fault is played out.

Time: everything the emulator issues or checks (iat/nbf/exp, refreshAfter, expiryOn, expires_on, Date headers)
uses `EmulatorState.now()`, the injected clock plus `clock_offset_seconds`, so a test can run the emulator's clock
ahead of or behind the client's without sleeping.
"""

from __future__ import annotations

import dataclasses
import hmac
import itertools
import math
import secrets
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, get_args

from proxy.emulator.identities import EntraDirectory, MLServerSessions
from proxy.emulator.tokens import (
    ML_AUDIENCES,
    OPENAI_AUDIENCES,
    WORKLOAD_IDENTITY_AUDIENCE,
    SigningKeys,
    TokenRejected,
    aml_audience,
)

# openai: an Azure OpenAI / Foundry resource (proxy/emulator/aoai.py), its deployments naming models.
ApiKind = Literal["v1", "v2", "openai"]
# key: the service's keys; aml_token: tokens from the AML token operation; aad_token: Entra ID tokens (v2 only).
AuthMode = Literal["key", "aml_token", "aad_token"]
KeyType = Literal["Primary", "Secondary"]
# control: every control-plane call, token calls included; token: only the AML token operations (both planes);
# entra: the Entra ID token endpoint and IMDS; mlserver: ML Server login and refresh.
FaultTarget = Literal["scoring", "control", "token", "entra", "mlserver"]
# expired_token and exp_before_expiry are only for target "token": the AML token operation answers a well-formed
# 200 whose token is already `seconds` past its expiry (expiryOn and the JWT's exp alike), or whose JWT exp is
# `seconds` from now while expiryOn/expiryTimeUtc and refreshAfter say the service's usual lifetime.
FaultAction = Literal[
    "status",
    "reset",
    "delay",
    "stall_after_headers",
    "trickle",
    "invalid_json",
    "missing_fields",
    "expired_token",
    "exp_before_expiry",
]

API_KINDS: tuple[str, ...] = get_args(ApiKind)
AUTH_MODES: tuple[str, ...] = get_args(AuthMode)
FAULT_TARGETS: tuple[str, ...] = get_args(FaultTarget)
FAULT_ACTIONS: tuple[str, ...] = get_args(FaultAction)

MAX_OPERATIONS = 1000  # finished operations kept for polling; older ones are forgotten
MAX_FAULT_SECONDS = 3600.0
MAX_CLOCK_OFFSET_SECONDS = 366 * 24 * 3600.0
DEFAULT_TOKEN_LIFETIME = 3600
DEFAULT_STREAM_DELAY_SECONDS = 0.05  # openai: the pause between two server-sent events of a streamed answer
MAX_STREAM_DELAY_SECONDS = 10.0
SERVICE_ACCOUNT_TOKEN_LIFETIME = 3600
# The issuer of the emulator's service-account tokens, in the place of an AKS cluster's OIDC issuer URL.
SERVICE_ACCOUNT_ISSUER = "https://oidc.emulator.invalid/aml-auth-proxy/"
# Faults that replace a token response by a malformed one; only token-issuing targets have such a response.
MALFORMED_ACTIONS = frozenset({"invalid_json", "missing_fields"})
TOKEN_FAULT_TARGETS = frozenset({"token", "entra", "mlserver"})
# Faults that change the times of an issued AML token; only the AML token operation (target "token") plays them.
TOKEN_TIME_ACTIONS = frozenset({"expired_token", "exp_before_expiry"})


def new_key() -> str:
    """A fresh random key, the same strength as the ones AML hands out."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True, kw_only=True)
class Service:
    """One AML scoring service (a v1 AKS web service or a v2 online endpoint) or an Azure OpenAI resource (api
    openai: `deployments` maps each deployment name to its model name, and it takes keys and Entra tokens alike)."""

    name: str
    api: ApiKind
    region: str
    subscription: str
    resource_group: str
    workspace: str
    deployments: Mapping[str, str]  # deployment name -> backend base URL
    default_deployment: str
    auth_mode: AuthMode = "key"
    primary_key: str = field(default_factory=new_key, repr=False)
    secondary_key: str = field(default_factory=new_key, repr=False)
    token_lifetime_seconds: int = DEFAULT_TOKEN_LIFETIME
    token_refresh_after_seconds: int | None = None  # None: half the lifetime
    stream_delay_seconds: float = DEFAULT_STREAM_DELAY_SECONDS  # openai only

    def __post_init__(self) -> None:
        if self.api not in API_KINDS:
            raise ValueError(f"service {self.name!r}: api must be one of {API_KINDS}, not {self.api!r}")
        if self.auth_mode not in AUTH_MODES:
            raise ValueError(f"service {self.name!r}: auth_mode must be one of {AUTH_MODES}, not {self.auth_mode!r}")
        if self.auth_mode == "aad_token" and self.api != "v2":
            raise ValueError(f"service {self.name!r}: auth_mode 'aad_token' is only for v2 online endpoints")
        lifetime = self.token_lifetime_seconds
        if isinstance(lifetime, bool) or not isinstance(lifetime, int) or lifetime < 1:
            raise ValueError(f"service {self.name!r}: token_lifetime_seconds must be a positive integer")
        refresh_after = self.token_refresh_after_seconds
        if refresh_after is not None and (
            isinstance(refresh_after, bool) or not isinstance(refresh_after, int) or not 0 <= refresh_after <= lifetime
        ):
            raise ValueError(
                f"service {self.name!r}: token_refresh_after_seconds must be an integer from 0 to "
                f"token_lifetime_seconds ({lifetime})"
            )
        if self.api == "openai" and self.auth_mode != "key":
            raise ValueError(f"service {self.name!r}: an openai service takes keys and Entra tokens; no auth_mode")
        delay = self.stream_delay_seconds
        if isinstance(delay, bool) or not _finite_between(delay, 0.0, MAX_STREAM_DELAY_SECONDS):
            raise ValueError(
                f"service {self.name!r}: stream_delay_seconds must be a number from 0 to {MAX_STREAM_DELAY_SECONDS}"
            )
        if not self.deployments:
            raise ValueError(f"service {self.name!r}: needs at least one deployment")
        if self.default_deployment not in self.deployments:
            raise ValueError(
                f"service {self.name!r}: default_deployment {self.default_deployment!r} "
                f"is not one of {sorted(self.deployments)}"
            )
        if not self.primary_key or not self.secondary_key:
            raise ValueError(f"service {self.name!r}: keys must not be empty")
        # A read-only copy, so nobody changes routing behind the state's back.
        object.__setattr__(self, "deployments", MappingProxyType(dict(self.deployments)))

    @property
    def refresh_after_seconds(self) -> int:
        if self.token_refresh_after_seconds is None:
            return self.token_lifetime_seconds // 2
        return self.token_refresh_after_seconds

    @property
    def audience(self) -> str:
        """The `aud` of this service's AML tokens."""
        return aml_audience(self.api, self.name)

    def accepts_key(self, presented: str) -> bool:
        """Whether `presented` is the current primary or secondary key (constant-time for each)."""
        given = presented.encode()
        primary_ok = hmac.compare_digest(given, self.primary_key.encode())
        secondary_ok = hmac.compare_digest(given, self.secondary_key.encode())
        return primary_ok or secondary_ok

    def in_workspace(self, *, subscription: str, resource_group: str, workspace: str) -> bool:
        """ARM names are case-insensitive."""
        return (
            self.subscription.lower() == subscription.lower()
            and self.resource_group.lower() == resource_group.lower()
            and self.workspace.lower() == workspace.lower()
        )

    def public_view(self) -> dict[str, object]:
        """Everything but the keys."""
        return {
            "name": self.name,
            "api": self.api,
            "region": self.region,
            "subscription": self.subscription,
            "resource_group": self.resource_group,
            "workspace": self.workspace,
            "auth_mode": self.auth_mode,
            "deployments": dict(self.deployments),
            "default_deployment": self.default_deployment,
            "token_lifetime_seconds": self.token_lifetime_seconds,
            "token_refresh_after_seconds": self.refresh_after_seconds,
            **({"stream_delay_seconds": self.stream_delay_seconds} if self.api == "openai" else {}),
        }


@dataclass(kw_only=True)
class Fault:
    """One injected misbehaviour. `remaining` None means until cleared."""

    id: str
    target: FaultTarget
    action: FaultAction
    service: str | None = None
    region: str | None = None
    status: int | None = None
    retry_after: int | None = None
    seconds: float = 0.0
    remaining: int | None = None

    def matches(self, targets: str | Iterable[str], service: str | None, region: str | None = None) -> bool:
        """A region-scoped fault never matches a call that has no region (Entra ID, ML Server)."""
        wanted = {targets} if isinstance(targets, str) else set(targets)
        return (
            self.target in wanted
            and (self.service is None or self.service == service)
            and (self.region is None or self.region == region)
        )

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "target": self.target,
            "action": self.action,
            "service": self.service,
            "region": self.region,
            "status": self.status,
            "retry_after": self.retry_after,
            "seconds": self.seconds,
            "count": self.remaining,
        }


@dataclass(frozen=True, kw_only=True)
class AmlToken:
    """One issued AML scoring token with its times in epoch seconds of the emulator's clock."""

    access_token: str = field(repr=False)
    refresh_after: int
    expiry_on: int


@dataclass(frozen=True, kw_only=True)
class EntraToken:
    access_token: str = field(repr=False)
    expires_in: int
    expires_on: int
    not_before: int


@dataclass(frozen=True, kw_only=True)
class Operation:
    """A finished asynchronous control-plane operation that clients may poll."""

    id: str
    service: str
    operation_type: str
    created: float
    ended: float


KeysListener = Callable[[Service], None]


class EmulatorState:
    """The mutable heart of the emulator. All methods are synchronous and meant for the event loop thread."""

    def __init__(
        self,
        *,
        services: Iterable[Service] = (),
        control_plane_tokens: Iterable[str] = (),
        latency: Mapping[str, float] | None = None,
        entra: EntraDirectory | None = None,
        mlserver: MLServerSessions | None = None,
        clock: Callable[[], float] = time.time,
        clock_offset_seconds: float = 0.0,
    ) -> None:
        self.services: dict[str, Service] = {}
        for service in services:
            if service.name in self.services:
                raise ValueError(f"duplicate service name {service.name!r}")
            self.services[service.name] = service
        self.control_plane_tokens: set[str] = set(control_plane_tokens)
        self.latency: dict[str, float] = {}
        for region, seconds in (latency or {}).items():
            self.set_latency(region, seconds)
        self.faults: list[Fault] = []
        self.operations: OrderedDict[str, Operation] = OrderedDict()
        self.keys_listeners: list[KeysListener] = []
        self._fault_ids = itertools.count(1)
        self.entra = entra if entra is not None else EntraDirectory()
        self.entra_url = ""  # the Entra stand-in's origin, for `iss`; set once its listener is bound
        self.mlserver = mlserver
        self.signing_keys = SigningKeys()
        self._clock = clock
        self.clock_offset_seconds = 0.0
        self.set_clock_offset(clock_offset_seconds)
        # When each service came to be (epoch seconds of the emulator's clock): the createdTime of a v1 service
        # object and the systemData.createdAt of a v2 resource. A key regeneration does not change it.
        self._created: dict[str, float] = {name: self.now() for name in self.services}
        # Call counters, for tests that assert how often a client asked (faulted calls count too).
        self.token_calls: Counter[str] = Counter()  # AML token operation, per service name
        self.entra_token_calls: Counter[str] = Counter()  # Entra token endpoint and IMDS, per client id
        self.mlserver_calls: Counter[str] = Counter()  # per operation: login, refresh, revoke, forward
        self.mlserver_revoked: list[str] = []  # SHA-256 hex of each revoked refresh token, never the token
        # openai: the credential headers (lower-case names, never values) of the last call per service, so a test
        # can tell which one a client or the proxy sent.
        self.openai_credential_headers: dict[str, tuple[str, ...]] = {}

    # -- clock -----------------------------------------------------------------------------------------------

    def now(self) -> float:
        """The emulator's idea of the current epoch time."""
        return self._clock() + self.clock_offset_seconds

    def set_clock_offset(self, seconds: float) -> None:
        """Run the emulator's clock `seconds` ahead of the real one (negative: behind)."""
        limit = MAX_CLOCK_OFFSET_SECONDS
        if isinstance(seconds, bool) or not _finite_between(seconds, -limit, limit):
            raise ValueError(f"offset_seconds must be a number from {-limit} to {limit}, not {seconds!r}")
        self.clock_offset_seconds = float(seconds)

    def created_time(self, name: str) -> float:
        """When service `name` was created: when the state was built, or first asked for one added later."""
        return self._created.setdefault(name, self.now())

    # -- control-plane identity ------------------------------------------------------------------------------

    def accepts_control_token(self, presented: str) -> bool:
        given = presented.encode()
        ok = False
        for token in self.control_plane_tokens:
            # No early exit: the time taken does not tell which token was close.
            ok = hmac.compare_digest(given, token.encode()) or ok
        return ok

    def accepts_entra_token(self, presented: str, *, audiences: Iterable[str]) -> dict[str, Any]:
        """The claims of an Entra stand-in token for one of `audiences` from this tenant; raises TokenRejected."""
        claims = self.signing_keys.entra.decode(presented, audiences=frozenset(audiences), now=self.now())
        if claims.get("tid") != self.entra.tenant:
            raise TokenRejected("invalid", "the token is from another tenant")
        return claims

    # -- tokens the emulator issues --------------------------------------------------------------------------

    def issue_aml_token(
        self, name: str, *, expired_seconds_ago: float | None = None, jwt_exp_in: float | None = None
    ) -> AmlToken:
        """An AML scoring token for service `name`, valid for the service's token lifetime from now.

        For faults: `expired_seconds_ago` issues a token whose expiry (expiryOn and the JWT's exp) and refresh
        time already passed that long ago; `jwt_exp_in` makes the JWT's exp that many seconds from now while the
        reported expiry stays the usual one (a token whose exp contradicts expiryOn).
        """
        service = self.services[name]
        now = int(self.now())
        expiry_on = now + service.token_lifetime_seconds
        refresh_after = now + service.refresh_after_seconds
        iat = now
        if expired_seconds_ago is not None:
            expiry_on = now - math.ceil(expired_seconds_ago)
            refresh_after = expiry_on
            iat = expiry_on - service.token_lifetime_seconds
        exp = expiry_on if jwt_exp_in is None else now + math.ceil(jwt_exp_in)
        claims = {"aud": service.audience, "iat": iat, "nbf": iat, "exp": exp, "jti": str(uuid.uuid4())}
        return AmlToken(
            access_token=self.signing_keys.aml.sign(claims),
            refresh_after=refresh_after,
            expiry_on=expiry_on,
        )

    def check_openai_token(self, presented: str) -> None:
        """Raise TokenRejected unless `presented` is an Entra stand-in token for Azure OpenAI (or Foundry)."""
        self.accepts_entra_token(presented, audiences=OPENAI_AUDIENCES)

    def check_scoring_token(self, service: Service, presented: str) -> None:
        """Raise TokenRejected unless `presented` opens `service` (an aml_token or aad_token service)."""
        if service.auth_mode == "aml_token":
            self.signing_keys.aml.decode(presented, audiences=[service.audience], now=self.now())
        elif service.auth_mode == "aad_token":
            self.accepts_entra_token(presented, audiences=ML_AUDIENCES)
        else:
            raise TokenRejected("invalid", "this service takes keys, not tokens")

    def issue_entra_token(self, *, client_id: str, audience: str) -> EntraToken:
        """An Entra stand-in access token for an app or managed identity (no check that the client exists)."""
        now = int(self.now())
        lifetime = self.entra.token_lifetime_seconds
        tenant = self.entra.tenant
        oid = self.entra.object_id(client_id)
        claims = {
            "aud": audience,
            "iss": f"{self.entra_url}/{tenant}/v2.0",
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "tid": tenant,
            "appid": client_id,
            "azp": client_id,
            "oid": oid,
            "sub": oid,
            "idtyp": "app",
            "ver": "2.0",
        }
        return EntraToken(
            access_token=self.signing_keys.entra.sign(claims),
            expires_in=lifetime,
            expires_on=now + lifetime,
            not_before=now,
        )

    def service_account_token(self, client_id: str, *, lifetime_seconds: int = SERVICE_ACCOUNT_TOKEN_LIFETIME) -> str:
        """A projected service-account token that the Entra stand-in accepts as `client_id`'s assertion."""
        subject = self.entra.federated.get(client_id)
        if subject is None:
            raise KeyError(f"client id {client_id!r} has no federated credential (entra.federated)")
        now = int(self.now())
        claims: dict[str, Any] = {
            "aud": [WORKLOAD_IDENTITY_AUDIENCE],
            "iss": SERVICE_ACCOUNT_ISSUER,
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime_seconds,
        }
        parts = subject.split(":")
        if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
            claims["kubernetes.io"] = {"namespace": parts[2], "serviceaccount": {"name": parts[3]}}
        return self.signing_keys.service_account.sign(claims)

    def check_client_assertion(self, client_id: str, assertion: str) -> None:
        """Raise TokenRejected unless `assertion` is a federated credential of `client_id`."""
        claims = self.signing_keys.service_account.decode(
            assertion, audiences=[WORKLOAD_IDENTITY_AUDIENCE], now=self.now()
        )
        expected = self.entra.federated.get(client_id)
        if claims.get("iss") != SERVICE_ACCOUNT_ISSUER or expected is None or claims.get("sub") != expected:
            raise TokenRejected("invalid", "no federated credential matches the assertion's issuer and subject")

    def mlserver_revoke_all(self) -> int:
        """End every ML Server session, like an administrator would; returns how many there were."""
        if self.mlserver is None:
            return 0
        return self.mlserver.revoke_all()

    # -- keys ------------------------------------------------------------------------------------------------

    def regenerate_key(self, name: str, key_type: KeyType, value: str | None = None) -> Service:
        """Replace one key of service `name` (a fresh random one when `value` is None); effective at once."""
        service = self.services[name]
        new_value = new_key() if value is None else value
        if not new_value:
            raise ValueError("a key must not be empty")
        if key_type == "Primary":
            updated = dataclasses.replace(service, primary_key=new_value)
        elif key_type == "Secondary":
            updated = dataclasses.replace(service, secondary_key=new_value)
        else:
            raise ValueError(f"keyType must be 'Primary' or 'Secondary', not {key_type!r}")
        self.services[name] = updated
        for listener in list(self.keys_listeners):
            listener(updated)
        return updated

    # -- operations ------------------------------------------------------------------------------------------

    def record_operation(self, *, service: str, operation_type: str) -> Operation:
        now = time.time()
        op = Operation(id=str(uuid.uuid4()), service=service, operation_type=operation_type, created=now, ended=now)
        self.operations[op.id] = op
        while len(self.operations) > MAX_OPERATIONS:
            self.operations.popitem(last=False)
        return op

    # -- latency ---------------------------------------------------------------------------------------------

    def set_latency(self, region: str, seconds: float) -> None:
        """Delay every control-plane call for a service in `region` by `seconds` (0 removes the delay)."""
        if not isinstance(region, str) or not region:
            raise ValueError(f"region must be a non-empty string, not {region!r}")
        if isinstance(seconds, bool) or not _finite_between(seconds, 0.0, MAX_FAULT_SECONDS):
            raise ValueError(f"latency seconds must be between 0 and {MAX_FAULT_SECONDS}, not {seconds!r}")
        if seconds == 0:
            self.latency.pop(region, None)
        else:
            self.latency[region] = float(seconds)

    def latency_for(self, region: str) -> float:
        return self.latency.get(region, 0.0)

    # -- faults ----------------------------------------------------------------------------------------------

    def add_fault(
        self,
        *,
        target: FaultTarget,
        action: FaultAction,
        service: str | None = None,
        region: str | None = None,
        status: int | None = None,
        retry_after: int | None = None,
        seconds: float = 0.0,
        count: int | None = None,
    ) -> Fault:
        """Queue a fault; it applies to the next `count` matching requests (all of them when count is None).

        `seconds` is the delay, stall or trickle interval; for `expired_token` how long ago the issued token
        expired, for `exp_before_expiry` when (from now) its JWT exp falls.

        `service` and `region` narrow it down; a fault with a region never applies to Entra ID or ML Server
        calls, which have none. `retry_after` (seconds) adds a Retry-After header to a `status` fault.
        """
        if target not in FAULT_TARGETS:
            raise ValueError(f"target must be one of {FAULT_TARGETS}, not {target!r}")
        if action not in FAULT_ACTIONS:
            raise ValueError(f"action must be one of {FAULT_ACTIONS}, not {action!r}")
        if action in MALFORMED_ACTIONS and target not in TOKEN_FAULT_TARGETS:
            raise ValueError(f"action {action!r} is only for targets {sorted(TOKEN_FAULT_TARGETS)}, not {target!r}")
        if action in TOKEN_TIME_ACTIONS and target != "token":
            raise ValueError(f"action {action!r} is only for target 'token', not {target!r}")
        if action == "exp_before_expiry" and seconds < 1:
            raise ValueError("seconds (the JWT's exp from now) must be at least 1 for action 'exp_before_expiry'")
        if service is not None and not isinstance(service, str):
            raise ValueError(f"service must be a string or null, not {service!r}")
        if region is not None and (not isinstance(region, str) or not region):
            raise ValueError(f"region must be a non-empty string or null, not {region!r}")
        if action == "status":
            if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
                raise ValueError(f"status must be an integer from 200 to 599 for action 'status', not {status!r}")
        elif status is not None:
            raise ValueError(f"status is only allowed with action 'status', got action {action!r}")
        if retry_after is not None:
            if action != "status":
                raise ValueError(f"retry_after is only allowed with action 'status', got action {action!r}")
            if isinstance(retry_after, bool) or not isinstance(retry_after, int) or not 0 <= retry_after <= 86400:
                raise ValueError(
                    f"retry_after must be an integer number of seconds from 0 to 86400, not {retry_after!r}"
                )
        if isinstance(seconds, bool) or not _finite_between(seconds, 0.0, MAX_FAULT_SECONDS):
            raise ValueError(f"seconds must be a number from 0 to {MAX_FAULT_SECONDS}, not {seconds!r}")
        if action == "trickle" and seconds <= 0:
            raise ValueError("seconds must be above 0 for action 'trickle'")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(f"count must be a positive integer or null, not {count!r}")
        fault = Fault(
            id=f"fault-{next(self._fault_ids)}",
            target=target,
            action=action,
            service=service,
            region=region,
            status=status,
            retry_after=retry_after,
            seconds=float(seconds),
            remaining=count,
        )
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def take_fault(
        self, target: FaultTarget | Iterable[FaultTarget], service: str | None, region: str | None = None
    ) -> Fault | None:
        """The oldest fault matching this request (any of the targets), used up by one; None when none applies."""
        for fault in self.faults:
            if fault.matches(target, service, region):
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self.faults.remove(fault)
                return fault
        return None


def _finite_between(value: object, low: float, high: float) -> bool:
    if not isinstance(value, int | float):
        return False
    return math.isfinite(value) and low <= value <= high
