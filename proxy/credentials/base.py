"""The contract between a credential kind and the rest of the proxy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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

    def unauthorized(self, sent: Credential) -> Credential | None:
        """The upstream answered 401 to `sent`; return a different credential to retry with, if any."""

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason) for /readyz."""

    async def start(self) -> None:
        """Load the first credential. Errors leave the provider unready instead of raising."""

    async def run(self) -> None:
        """Background loop that keeps the credential fresh; runs until cancelled."""

    async def close(self) -> None:
        """Release what start() acquired."""
