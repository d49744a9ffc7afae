"""Key auth from Kubernetes Secrets read through the API: what a Secret's state means for a route's keys.

The watching itself (list, watch, reconnect, relist) is proxy/kube/secrets.py, which delivers each new state of
a Secret on the event loop through `SecretFeed`; this module turns states into keys. Values obey the key-file
rules (`validate_secret`); a bad update, a deleted Secret or a lost connection keeps the last good key, and the
request path reads a prepared Credential, never the API.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.config.settings import KeyAuth, SecretRef
from proxy.credentials.files import SecretFileError, validate_secret
from proxy.credentials.keys import KeyPair
from proxy.events import NO_EVENTS, EventSink
from proxy.logs import event
from proxy.metrics import RouteMetrics

log = logging.getLogger("aml_auth_proxy.credentials.secret_keys")


@dataclass(frozen=True, kw_only=True, eq=False)
class SecretState:
    """One observed state of a Secret: its data (raw bytes per key), or why it cannot be used.

    `data` is None when the Secret is unavailable (missing, forbidden, unreachable); `error` then says why, in
    words safe to log. `repr` never shows the data."""

    data: Mapping[str, bytes] | None = field(default=None, repr=False)
    error: str | None = None

    def value(self, key: str) -> str:
        """The key's validated value; SecretFileError when unavailable, absent or invalid."""
        if self.data is None:
            raise SecretFileError(self.error or "not read yet")
        raw = self.data.get(key)
        if raw is None:
            raise SecretFileError(f"has no key {key!r}")
        return validate_secret(raw)


class SecretFeed(Protocol):
    """The latest state of one watched Secret, with a callback on every change (run on the event loop)."""

    name: str

    @property
    def state(self) -> SecretState | None:
        """The latest state, None before the first read."""

    def subscribe(self, callback: Callable[[SecretState], None]) -> None:
        """Call `callback(state)` on the loop after each new state."""

    async def first_state(self) -> None:
        """Wait until the first state is known (the caller bounds the wait)."""


class SecretKeyProvider(KeyPair):
    """Primary/secondary keys from Secret keys, with failover on 401."""

    def __init__(
        self,
        *,
        route: str,
        auth: KeyAuth,
        metrics: RouteMetrics,
        feeds: Mapping[str, SecretFeed],
        events: EventSink = NO_EVENTS,
        startup_wait: float = 5.0,
    ) -> None:
        super().__init__(route=route, auth=auth, metrics=metrics, events=events)
        assert auth.primary_secret_ref is not None  # config requires it for this provider
        self._refs: dict[str, SecretRef] = {"primary": auth.primary_secret_ref}
        if auth.secondary_secret_ref is not None:
            self._refs["secondary"] = auth.secondary_secret_ref
        self._feeds = feeds
        self._startup_wait = startup_wait
        for feed in {id(f): f for f in feeds.values()}.values():
            feed.subscribe(self._on_state)

    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "key",
            "source": "kubernetes-secret",
            "active": self._active,
            "loaded": sorted(self._keys),
        }
        if self._errors:
            out["secret_errors"] = {slot: f"{why}; {self._kept(slot)}" for slot, why in sorted(self._errors.items())}
        return out

    def readiness(self) -> tuple[bool, str]:
        if self._current is not None:
            return True, "ok"
        reasons = [
            f"{slot} key Secret {ref}: {self._errors.get(slot, 'not read yet')}" for slot, ref in self._refs.items()
        ]
        return False, "; ".join(reasons)

    def retry_after(self) -> int:
        return 1

    async def refresh_now(self, reason: str) -> None:
        self._apply()  # the watch already delivers every change; re-check what it holds

    async def start(self) -> None:
        try:
            async with asyncio.timeout(self._startup_wait):
                for feed in self._feeds.values():
                    await feed.first_state()
        except TimeoutError:
            pass  # the route stays unready; the watch keeps trying and installs the keys when it can
        self._apply()

    async def run(self) -> None:
        await asyncio.Event().wait()  # the watch threads push states; nothing to poll

    async def close(self) -> None:
        return None

    def _on_state(self, state: SecretState) -> None:
        self._apply()

    def _apply(self) -> bool:
        """Take each slot's key from its Secret's latest state; returns True when a key changed."""
        changed = False
        for slot, ref in self._refs.items():
            state = self._feeds[ref.name].state
            if state is None:
                continue
            try:
                key = state.value(ref.key)
            except SecretFileError as exc:
                self._load_failed(log, "key_secret_error", slot, str(exc), secret=str(ref))
                continue
            if self._errors.pop(slot, None) is not None:
                event(log, logging.INFO, "key_secret_recovered", route=self._route, slot=slot, secret=str(ref))
            changed = self._set_key(slot, key) or changed
        self._select()
        return changed
