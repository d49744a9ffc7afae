"""The contract between a credential kind and the rest of the proxy."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.events import KEY_FAILOVER, EventSink
from proxy.logs import event
from proxy.metrics import RouteMetrics

log = logging.getLogger("aml_auth_proxy.credentials")


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


def report_failover(*, route: str, to: str, metrics: RouteMetrics, events: EventSink) -> None:
    """A 401 moved `route` to its `to` key ("primary" or "secondary"): counted, logged and reported as a
    KeyFailover Event, the same for every kind with two keys (key files, Secrets, aml-keys)."""
    metrics.failovers.inc()
    event(log, logging.WARNING, "key_failover", route=route, to=to)
    other = "primary" if to == "secondary" else "secondary"
    events.emit(
        warning=True,
        reason=KEY_FAILOVER,
        message=f"route {route}: upstream refused the {other} key (401), using the {to} key",
    )
