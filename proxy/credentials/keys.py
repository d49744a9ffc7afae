"""Key auth from files: primary and secondary keys from a mounted Kubernetes Secret.

The files are polled (a `stat` per file per interval; a read only when the stat changes), which also sees
kubelet's atomic `..data` symlink swap: the key path then resolves to a new inode. A bad or missing file keeps
the last good value, reported in the log (once per change of state), in `/readyz` and in the reload metrics.
A changed file replaces a loaded key only once it has been still for SETTLE_SECONDS, so a writer that is not
atomic (truncate, then write) is never caught halfway. A 401 switches to the other key; the key that works
stays in use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from proxy.config.settings import KeyAuth
from proxy.credentials.base import Credential, report_failover
from proxy.credentials.files import FileSignature, SecretFileError, file_signature, read_secret_file
from proxy.events import NO_EVENTS, EventSink
from proxy.headers import render_credential
from proxy.logs import REDACTOR, event
from proxy.metrics import RouteMetrics

log = logging.getLogger("aml_auth_proxy.credentials.keys")

SLOTS = ("primary", "secondary")
SETTLE_SECONDS = 1.0


class KeyPair:
    """Primary/secondary keys with failover on 401, whatever loads them (files here, Secrets in secret_keys.py).

    Subclasses call `_set_key` with each validated key and `_select` after a round of loading."""

    def __init__(self, *, route: str, auth: KeyAuth, metrics: RouteMetrics, events: EventSink = NO_EVENTS) -> None:
        self._route = route
        self._auth = auth
        self._metrics = metrics
        self._events = events
        self._keys: dict[str, str] = {}
        self._creds: dict[str, Credential] = {}
        self._errors: dict[str, str] = {}
        self._active = "primary"
        self._current: Credential | None = None

    @property
    def current(self) -> Credential | None:
        return self._current

    async def unauthorized(self, sent: Credential) -> Credential | None:
        return self.fail_over(sent)

    def fail_over(self, sent: Credential) -> Credential | None:
        """Switch to the other key after a 401 with `sent` (once per credential)."""
        current = self._current
        if current is not None and current is not sent:
            return current  # another request already moved on; retry with what is current now
        other = "secondary" if self._active == "primary" else "primary"
        cred = self._creds.get(other)
        if cred is None:
            return None
        self._active = other
        self._current = cred
        report_failover(route=self._route, to=other, metrics=self._metrics, events=self._events)
        return cred

    @staticmethod
    def _other(slot: str) -> str:
        return "secondary" if slot == "primary" else "primary"

    def _kept(self, slot: str) -> str:
        return "keeping the last good key" if slot in self._keys else "no key loaded"

    def _load_failed(self, logger: logging.Logger, name: str, slot: str, reason: str, **where: str) -> None:
        """Count a failed load of `slot` and log event `name` at error level, once per distinct reason."""
        self._metrics.reloads["error"].inc()
        if self._errors.get(slot) != reason:
            self._errors[slot] = reason
            event(
                logger,
                logging.ERROR,
                name,
                route=self._route,
                slot=slot,
                **where,
                reason=reason,
                action=self._kept(slot),
            )

    def _set_key(self, slot: str, key: str) -> bool:
        """Install a validated key; True when it is new."""
        self._metrics.last_success.set(time.time())  # a successful load, new key or not
        if self._keys.get(slot) == key:
            self._metrics.reloads["unchanged"].inc()
            return False
        REDACTOR.add(key)
        self._keys[slot] = key
        self._creds[slot] = Credential(
            header=self._auth.header, value=render_credential(self._auth.template, key), label=slot
        )
        self._metrics.reloads["success"].inc()
        event(log, logging.INFO, "key_loaded", route=self._route, slot=slot)
        return True

    def _select(self) -> None:
        if self._active not in self._creds and self._creds:
            self._active = next(slot for slot in SLOTS if slot in self._creds)
        self._current = self._creds.get(self._active)
        self._metrics.ready.set(1 if self._current is not None else 0)


class KeyFileProvider(KeyPair):
    """Primary/secondary keys from files, with failover on 401."""

    def __init__(self, *, route: str, auth: KeyAuth, metrics: RouteMetrics, events: EventSink = NO_EVENTS) -> None:
        super().__init__(route=route, auth=auth, metrics=metrics, events=events)
        assert auth.primary_file is not None  # build_provider picks this provider when the keys are files
        self._paths: dict[str, str] = {"primary": auth.primary_file}
        if auth.secondary_file:
            self._paths["secondary"] = auth.secondary_file
        self._sigs: dict[str, FileSignature | None] = {}

    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "key", "active": self._active, "loaded": sorted(self._keys)}
        if self._errors:
            out["file_errors"] = {slot: f"{why}; {self._kept(slot)}" for slot, why in sorted(self._errors.items())}
        return out

    def retry_after(self) -> int:
        return max(1, round(self._auth.reload_seconds))

    async def refresh_now(self, reason: str) -> None:
        self.reload()

    def readiness(self) -> tuple[bool, str]:
        if self._current is not None:
            return True, "ok"
        reasons = [f"{slot} key file: {self._errors.get(slot, 'not loaded')}" for slot in self._paths]
        return False, "; ".join(reasons)

    async def start(self) -> None:
        self.reload()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._auth.reload_seconds)
            self.reload()

    async def close(self) -> None:
        return None

    def reload(self) -> bool:
        """Check every key file; returns True when a key value changed."""
        changed = False
        for slot, path in self._paths.items():
            sig = file_signature(path)
            if slot in self._sigs and sig == self._sigs[slot] and (slot in self._keys or slot in self._errors):
                continue  # unchanged since the last look (also a file still missing): no read
            try:
                key = read_secret_file(path)
            except SecretFileError as exc:
                self._sigs[slot] = sig
                self._load_failed(log, "key_file_error", slot, str(exc), path=path)
                continue
            if (
                self._keys.get(slot, key) != key
                and sig is not None
                and 0 <= time.time() - sig[2] / 1e9 < SETTLE_SECONDS
            ):
                continue  # a new key written moments ago may be half written: read it again on the next poll
            self._sigs[slot] = sig
            if self._errors.pop(slot, None) is not None:
                event(log, logging.INFO, "key_file_recovered", route=self._route, slot=slot, path=path)
            changed = self._set_key(slot, key) or changed
        self._select()
        return changed
