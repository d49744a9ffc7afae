"""What the emulator knows: services, their keys, accepted control-plane tokens, faults and latency.

Service descriptions are frozen; a key regeneration swaps the whole `Service` object in `EmulatorState.services`
in one assignment, so a request that has read a service sees one consistent pair of keys. Everything here runs on
the event loop, so no locks are needed. This module owns no HTTP: the apps in `scoring.py` and `control.py` read
and change the state, `faults.py` says how a fault is played out.
"""

from __future__ import annotations

import dataclasses
import hmac
import itertools
import math
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, get_args

ApiKind = Literal["v1", "v2"]
# Only "key" is served today; "aml_token" and "aad_token" are the other AML modes and fit in here later.
AuthMode = Literal["key"]
KeyType = Literal["Primary", "Secondary"]
FaultTarget = Literal["scoring", "control"]
FaultAction = Literal["status", "reset", "delay", "stall_after_headers", "trickle"]

API_KINDS: tuple[str, ...] = get_args(ApiKind)
AUTH_MODES: tuple[str, ...] = get_args(AuthMode)
FAULT_TARGETS: tuple[str, ...] = get_args(FaultTarget)
FAULT_ACTIONS: tuple[str, ...] = get_args(FaultAction)

MAX_OPERATIONS = 1000  # finished operations kept for polling; older ones are forgotten
MAX_FAULT_SECONDS = 3600.0


def new_key() -> str:
    """A fresh random key, the same strength as the ones AML hands out."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True, kw_only=True)
class Service:
    """One AML scoring service: a v1 AKS web service or a v2 online endpoint."""

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

    def __post_init__(self) -> None:
        if self.api not in API_KINDS:
            raise ValueError(f"service {self.name!r}: api must be one of {API_KINDS}, not {self.api!r}")
        if self.auth_mode not in AUTH_MODES:
            raise ValueError(f"service {self.name!r}: auth_mode must be one of {AUTH_MODES}, not {self.auth_mode!r}")
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
        }


@dataclass(kw_only=True)
class Fault:
    """One injected misbehaviour. `remaining` None means until cleared."""

    id: str
    target: FaultTarget
    action: FaultAction
    service: str | None = None
    status: int | None = None
    seconds: float = 0.0
    remaining: int | None = None

    def matches(self, target: str, service: str | None) -> bool:
        return self.target == target and (self.service is None or self.service == service)

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "target": self.target,
            "action": self.action,
            "service": self.service,
            "status": self.status,
            "seconds": self.seconds,
            "count": self.remaining,
        }


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

    # -- control-plane identity ------------------------------------------------------------------------------

    def accepts_control_token(self, presented: str) -> bool:
        given = presented.encode()
        ok = False
        for token in self.control_plane_tokens:
            # No early exit: the time taken does not tell which token was close.
            ok = hmac.compare_digest(given, token.encode()) or ok
        return ok

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
        status: int | None = None,
        seconds: float = 0.0,
        count: int | None = None,
    ) -> Fault:
        """Queue a fault; it applies to the next `count` matching requests (all of them when count is None)."""
        if target not in FAULT_TARGETS:
            raise ValueError(f"target must be one of {FAULT_TARGETS}, not {target!r}")
        if action not in FAULT_ACTIONS:
            raise ValueError(f"action must be one of {FAULT_ACTIONS}, not {action!r}")
        if service is not None and not isinstance(service, str):
            raise ValueError(f"service must be a string or null, not {service!r}")
        if action == "status":
            if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
                raise ValueError(f"status must be an integer from 200 to 599 for action 'status', not {status!r}")
        elif status is not None:
            raise ValueError(f"status is only allowed with action 'status', got action {action!r}")
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
            status=status,
            seconds=float(seconds),
            remaining=count,
        )
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def take_fault(self, target: FaultTarget, service: str | None) -> Fault | None:
        """The oldest fault matching this request, used up by one; None when no fault applies."""
        for fault in self.faults:
            if fault.matches(target, service):
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
