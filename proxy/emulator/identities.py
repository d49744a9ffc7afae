"""Who may get a token: the Entra ID directory (apps, federated credentials, managed identities) and ML Server users.

The directory is frozen: it comes from the config and never changes while the emulator runs. ML Server sessions
do change (login, refresh rotation, revocation); they are kept in memory only, indexed by the SHA-256 of each
token, so nothing here ever needs to compare or show a token's value. No HTTP in this module.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import jwt

from proxy.emulator.tokens import token_digest

DEFAULT_TENANT = "00000000-0000-0000-0000-0000000000aa"
DEFAULT_ENTRA_TOKEN_LIFETIME = 3599
DEFAULT_MLSERVER_ACCESS_LIFETIME = 3600
DEFAULT_MLSERVER_REFRESH_LIFETIME = 14 * 24 * 3600  # ML Server: 336 h of inactivity
MAX_MLSERVER_SESSIONS = 10_000  # the oldest session is dropped beyond this
_OBJECT_ID_NAMESPACE = uuid.UUID("5d0c3f0e-7d4e-4f43-9a55-3c1b8e2b6a10")


@dataclass(frozen=True, kw_only=True)
class EntraDirectory:
    """One tenant's apps: client-secret apps, workload-identity apps (client id -> subject), managed identities."""

    tenant: str = DEFAULT_TENANT
    token_lifetime_seconds: int = DEFAULT_ENTRA_TOKEN_LIFETIME
    clients: Mapping[str, str] = field(default_factory=dict, repr=False)
    federated: Mapping[str, str] = field(default_factory=dict)
    managed_identities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.tenant or "/" in self.tenant:
            raise ValueError(f"tenant must be a non-empty string without '/', not {self.tenant!r}")
        lifetime = self.token_lifetime_seconds
        if isinstance(lifetime, bool) or not isinstance(lifetime, int) or lifetime < 1:
            raise ValueError(f"token_lifetime_seconds must be a positive integer, not {lifetime!r}")
        if any(not secret for secret in self.clients.values()):
            raise ValueError("client secrets must not be empty")
        if any(not subject for subject in self.federated.values()):
            raise ValueError("federated subjects must not be empty")
        object.__setattr__(self, "clients", MappingProxyType(dict(self.clients)))
        object.__setattr__(self, "federated", MappingProxyType(dict(self.federated)))
        object.__setattr__(self, "managed_identities", tuple(self.managed_identities))

    def knows(self, client_id: str) -> bool:
        return client_id in self.clients or client_id in self.federated or client_id in self.managed_identities

    def secret_matches(self, client_id: str, presented: str) -> bool:
        """Constant-time for the secret; an unknown client compares against a dummy so it takes as long."""
        expected = self.clients.get(client_id)
        ok = hmac.compare_digest(presented.encode(), (expected or "\x00" * 32).encode())
        return ok and expected is not None

    def object_id(self, client_id: str) -> str:
        """A stable object id for an app's service principal (or a managed identity) in this tenant."""
        return str(uuid.uuid5(_OBJECT_ID_NAMESPACE, f"{self.tenant}/{client_id}"))

    @property
    def default_managed_identity(self) -> str | None:
        return self.managed_identities[0] if self.managed_identities else None


@dataclass(frozen=True, kw_only=True)
class IssuedPair:
    """A fresh ML Server access/refresh pair; the caller sends it once and keeps no copy."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in: int
    expires_on: int


@dataclass(kw_only=True)
class _Session:
    username: str
    access_digest: str
    refresh_digest: str
    access_expires_on: float
    refresh_expires_on: float


class MLServerSessions:
    """ML Server's users and live sessions. A refresh replaces both tokens; revoking a refresh token ends its pair."""

    def __init__(
        self,
        *,
        users: Mapping[str, str],
        access_token_lifetime_seconds: int = DEFAULT_MLSERVER_ACCESS_LIFETIME,
        refresh_token_lifetime_seconds: int = DEFAULT_MLSERVER_REFRESH_LIFETIME,
    ) -> None:
        for what, value in (
            ("access_token_lifetime_seconds", access_token_lifetime_seconds),
            ("refresh_token_lifetime_seconds", refresh_token_lifetime_seconds),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive integer, not {value!r}")
        if any(not password for password in users.values()):
            raise ValueError("ML Server passwords must not be empty")
        self._users = dict(users)
        self.access_token_lifetime_seconds = access_token_lifetime_seconds
        self.refresh_token_lifetime_seconds = refresh_token_lifetime_seconds
        self._signing_secret = secrets.token_bytes(32)
        self._by_refresh: OrderedDict[str, _Session] = OrderedDict()
        self._by_access: dict[str, _Session] = {}

    @property
    def usernames(self) -> list[str]:
        return sorted(self._users)

    @property
    def session_count(self) -> int:
        return len(self._by_refresh)

    def check_password(self, username: str, password: str) -> bool:
        expected = self._users.get(username)
        ok = hmac.compare_digest(password.encode(), (expected or "\x00" * 32).encode())
        return ok and expected is not None

    def login(self, username: str, *, now: float) -> IssuedPair:
        """A new session for a user whose password was checked."""
        if username not in self._users:
            raise KeyError(username)
        return self._open(username, now)

    def refresh(self, refresh_token: str, *, now: float) -> IssuedPair | None:
        """Swap a live refresh token for a new pair (the old pair dies at once); None when it is not live."""
        session = self._live_by_refresh(refresh_token, now)
        if session is None:
            return None
        self._end(session)
        return self._open(session.username, now)

    def revoke(self, refresh_token: str) -> bool:
        """End the session of this refresh token; False when there was none."""
        session = self._by_refresh.get(token_digest(refresh_token))
        if session is None:
            return False
        self._end(session)
        return True

    def revoke_all(self) -> int:
        count = len(self._by_refresh)
        self._by_refresh.clear()
        self._by_access.clear()
        return count

    def access_user(self, access_token: str, *, now: float) -> str | None:
        """The user a live, unexpired access token belongs to; None otherwise."""
        session = self._by_access.get(token_digest(access_token))
        if session is None or now >= session.access_expires_on:
            return None
        return session.username

    def _live_by_refresh(self, refresh_token: str, now: float) -> _Session | None:
        session = self._by_refresh.get(token_digest(refresh_token))
        if session is None:
            return None
        if now >= session.refresh_expires_on:
            self._end(session)
            return None
        return session

    def _open(self, username: str, now: float) -> IssuedPair:
        issued = int(now)
        expires_on = issued + self.access_token_lifetime_seconds
        claims = {
            "sub": username,
            "iss": "mlserver-emulator",
            "iat": issued,
            "nbf": issued,
            "exp": expires_on,
            "jti": secrets.token_hex(8),
        }
        access = jwt.encode(claims, self._signing_secret, algorithm="HS256")
        refresh = secrets.token_urlsafe(48)
        session = _Session(
            username=username,
            access_digest=token_digest(access),
            refresh_digest=token_digest(refresh),
            access_expires_on=expires_on,
            refresh_expires_on=issued + self.refresh_token_lifetime_seconds,
        )
        self._by_refresh[session.refresh_digest] = session
        self._by_access[session.access_digest] = session
        while len(self._by_refresh) > MAX_MLSERVER_SESSIONS:
            _, oldest = self._by_refresh.popitem(last=False)
            self._by_access.pop(oldest.access_digest, None)
        return IssuedPair(
            access_token=access,
            refresh_token=refresh,
            expires_in=self.access_token_lifetime_seconds,
            expires_on=expires_on,
        )

    def _end(self, session: _Session) -> None:
        self._by_refresh.pop(session.refresh_digest, None)
        self._by_access.pop(session.access_digest, None)
