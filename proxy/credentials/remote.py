"""A worker process's credential provider: serves what the primary process pushed; never fetches.

The primary owns every real provider (refreshers, key files, Secret watches). It pushes each route's current
credential and readiness over the worker's private channel (proxy/workers.py) whenever they change; the request
path here reads a field, with no I/O. A 401 is passed to the primary, whose provider decides (one refresh, the
other key) and answers with the credential to retry with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.credentials.base import Credential
from proxy.logs import REDACTOR

# (route, label of the credential sent, generation it came with) -> the reply message's "cred", or None
Ask = Callable[[str, str, int], Awaitable[dict[str, Any] | None]]

_KEEP = 8  # credentials remembered by identity, so a late 401 still names the generation it was sent with


class RemoteCredentialProvider:
    """The CredentialProvider of one route in a worker process."""

    def __init__(self, route: str, ask: Ask) -> None:
        self._route = route
        self._ask = ask
        self._cred: Credential | None = None
        self._gen = -1
        self._recent: list[tuple[Credential, int]] = []
        self._ready = False
        self._reason = "no credential from the primary process yet"
        self._retry_after = 1.0
        self._retry_at = time.monotonic()
        self.received = asyncio.Event()

    # -- what the primary pushes -------------------------------------------------------------------------------

    def install(self, state: dict[str, Any]) -> None:
        """Apply a pushed state: {"gen", "cred": {header, value, label} | None, "ready", "reason", "retry_after"}."""
        self._set_cred(state.get("cred"), int(state["gen"]))
        self._ready = bool(state["ready"])
        self._reason = str(state["reason"])
        self._retry_after = float(state["retry_after"])
        self._retry_at = time.monotonic()
        self.received.set()

    def _set_cred(self, raw: dict[str, Any] | None, gen: int) -> Credential | None:
        if gen < self._gen:
            return self._cred  # an older push overtaken by a newer one
        if raw is None:
            self._cred = None
            self._gen = gen
            return None
        if self._cred is not None and gen == self._gen:
            return self._cred
        REDACTOR.add(raw["value"], owner=f"remote:{id(self)}")
        cred = Credential(header=raw["header"], value=raw["value"], label=raw["label"])
        self._cred = cred
        self._gen = gen
        self._recent.append((cred, gen))
        del self._recent[:-_KEEP]
        return cred

    # -- the CredentialProvider protocol -------------------------------------------------------------------------

    @property
    def current(self) -> Credential | None:
        return self._cred

    async def unauthorized(self, sent: Credential) -> Credential | None:
        gen = next((g for c, g in self._recent if c is sent), -1)
        reply = await self._ask(self._route, sent.label, gen)
        if reply is None or reply.get("cred") is None:
            return None
        cred = self._set_cred(reply["cred"], int(reply["gen"]))  # a newer push wins over the reply
        return cred if cred is not None and cred is not sent else None

    def readiness(self) -> tuple[bool, str]:
        return self._ready, self._reason

    def details(self) -> dict[str, Any]:
        return {"kind": "remote"}

    def retry_after(self) -> int:
        return max(1, round(self._retry_after - (time.monotonic() - self._retry_at)))

    async def refresh_now(self, reason: str) -> None:
        return None  # workers never fetch: the primary does

    async def start(self) -> None:
        return None

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        return None
