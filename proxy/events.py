"""What an operator should see on the pod: the Kubernetes Event reasons the proxy reports, all of them in one
place (docs/configuration.md, "Kubernetes"; the metric of Events counts each one from the start), and the sink
code reports them through. proxy/kube/events.py turns reports into Events, so nothing that reports imports the
Kubernetes client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

TOKEN_REFRESH_FAILING = "TokenRefreshFailing"
TOKEN_REFRESH_RECOVERED = "TokenRefreshRecovered"
TOKEN_EXPIRED = "TokenExpired"
KEY_FAILOVER = "KeyFailover"
SECRET_UNAVAILABLE = "SecretUnavailable"
CREDENTIAL_TASK_FAILED = "CredentialTaskFailed"
EVENT_REASONS = (
    TOKEN_REFRESH_FAILING,
    TOKEN_REFRESH_RECOVERED,
    TOKEN_EXPIRED,
    KEY_FAILOVER,
    SECRET_UNAVAILABLE,
    CREDENTIAL_TASK_FAILED,
)


@dataclass(frozen=True, slots=True)
class About:
    """The object an Event is about when it is not the reporting pod itself (its involvedObject): the sidecar
    injector reports on the controller of a pod it refused (proxy/injector/)."""

    kind: str
    api_version: str
    name: str
    namespace: str
    uid: str | None = None


class EventSink(Protocol):
    """Where credential code reports what an operator should see on the pod. `emit` never blocks or raises."""

    def emit(self, *, warning: bool, reason: str, message: str) -> None:
        """Report one occurrence; `message` never contains a credential."""


class _NoEvents:
    def emit(self, *, warning: bool, reason: str, message: str) -> None:
        return None


NO_EVENTS: EventSink = _NoEvents()
