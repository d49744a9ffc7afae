"""The contract between a credential kind and the rest of the proxy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True, eq=False)
class Credential:
    """A prepared credential: the exact header to inject. Built once when the credential changes.

    `label` names the credential for logs and metrics (e.g. "primary"); it is never secret. Identity (`is`)
    tells two credentials apart, so a 401 invalidates exactly the credential that was sent.
    """

    header: str
    value: str
    label: str

    def __repr__(self) -> str:  # never show the value, even in a debugger or a traceback
        return f"Credential(header={self.header!r}, label={self.label!r})"


class CredentialProvider(Protocol):
    """Keeps one route's credential usable; the request path only reads `current`."""

    @property
    def current(self) -> Credential | None:
        """The credential to send now, or None while none is usable. Never blocks."""

    async def unauthorized(self, sent: Credential) -> Credential | None:
        """The upstream answered 401 to `sent`; return a different credential to retry with, if any.

        Key kinds answer at once (the other key); token kinds join one forced, rate-limited refresh.
        """

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason) for /readyz."""

    def details(self) -> dict[str, Any]:
        """Non-secret state for /readyz: kind, expires_in, refresh_in, last outcome, failures."""

    def retry_after(self) -> int:
        """Seconds a caller should wait when there is no usable credential (a 503's Retry-After)."""

    async def refresh_now(self, reason: str) -> None:
        """Reload or refetch now (operators: POST /refresh on the admin port)."""

    async def start(self) -> None:
        """Load the first credential. Errors leave the provider unready instead of raising."""

    async def run(self) -> None:
        """Background loop that keeps the credential fresh; runs until cancelled."""

    async def close(self) -> None:
        """Release what start() acquired."""


# Kubernetes Event reasons (docs/configuration.md, "Kubernetes"), all of them: the metric of Events counts each one
# from the start. The credential code reports through `EventSink`; proxy/kube/events.py turns reports into Events,
# so no credential module imports the Kubernetes client.
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


class EventSink(Protocol):
    """Where credential code reports what an operator should see on the pod. `emit` never blocks or raises."""

    def emit(self, *, warning: bool, reason: str, message: str) -> None:
        """Report one occurrence; `message` never contains a credential."""


class _NoEvents:
    def emit(self, *, warning: bool, reason: str, message: str) -> None:
        return None


NO_EVENTS: EventSink = _NoEvents()
