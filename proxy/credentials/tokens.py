"""The vocabulary every fetched credential kind shares: the Token, the errors a fetch raises, the TokenSource
protocol each kind implements (proxy/refresher.py schedules it), and moving a server's times onto the local clock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

TRANSIENT = "transient_error"
PERMANENT = "permanent_error"


@dataclass(frozen=True, kw_only=True, eq=False)
class Token:
    """A fetched credential with its times on the local clock (sources correct server clock skew).

    `value` and `secondary` are secrets; `state` is kind-specific (the ML Server refresh token, say).
    """

    value: str
    expires_at: float | None  # None: never expires (keys)
    refresh_at: float | None  # the server's "refresh after" hint, if it gave one
    secondary: str | None = None
    state: Any = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"Token(expires_at={self.expires_at}, refresh_at={self.refresh_at})"


class RefreshError(Exception):
    """A fetch failed. `reason` is safe to log and show: it never contains a credential."""

    outcome = TRANSIENT

    def __init__(self, reason: str, *, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status  # the HTTP status that caused it, when there was one


class TransientError(RefreshError):
    """Network errors, timeouts, 5xx, 429: worth retrying soon."""


class PermanentError(RefreshError):
    """Other 4xx, bad configuration: retrying soon will not help; retry at the backoff cap."""

    outcome = PERMANENT


class TokenSource(Protocol):
    """How to get one kind of token; proxy/refresher.py decides when."""

    auth_type: str  # the route's auth.type

    async def fetch(self, previous: Token | None) -> Token:
        """Fetch a new token (or keys). Raise TransientError or PermanentError."""

    async def watch(self, changed: Callable[[str], Awaitable[None]]) -> None:
        """Call `changed(reason)` whenever the token changes outside the schedule (a file the kind reads was
        replaced); return at once when the kind has nothing to watch."""

    async def revoke(self, token: Token) -> None:
        """Give the token back at shutdown, where the kind can."""

    async def close(self) -> None:
        """Release clients."""


class NothingToWatch:
    """For a kind whose token changes only when it is fetched: its `watch` returns at once."""

    async def watch(self, changed: Callable[[str], Awaitable[None]]) -> None:
        return None


# Server clocks are read from whole-second sources (the Date header, a JWT's iat): below this they agree with ours.
SKEW_TOLERANCE_SECONDS = 2.0


def skew_corrected(server_time: float | None, *, server_now: float | None, local_now: float) -> float | None:
    """A server's absolute time moved onto the local clock, using the server's idea of now.

    `server_now` comes from a whole-second source that is truncated, so callers pass the upper end of its
    second (the conservative side: a token then looks a little shorter-lived, never longer). Differences within
    the tolerance are no evidence of skew and leave the time as the server said it.
    """
    if server_time is None:
        return None
    if server_now is None:
        return server_time
    skew = server_now - local_now
    if abs(skew) < SKEW_TOLERANCE_SECONDS:
        return server_time
    return server_time - skew


def jwt_claims(token: str) -> dict[str, Any] | None:
    """A JWT's claims, read without verifying it (only its issuer can); None when `token` is not a JWT. The one
    place the proxy reads a JWT."""
    import jwt  # here: pyjwt loads cryptography (about 8 MiB), paid only by routes that read a token's times

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    return claims if isinstance(claims, dict) else None
