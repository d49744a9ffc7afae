"""One clock for every timing decision: epoch seconds, and a way to wait. Tests inject `ManualClock`.

Two readings are the wall clock on purpose: a key file's age (its mtime is the filesystem's wall clock,
credentials/keys.py) and a Retry-After given as an HTTP date (credentials/http.py), both compared with
`time.time()` because the other side of the comparison is."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Epoch seconds."""

    def sleep(self, seconds: float) -> Awaitable[None]:
        """Wait `seconds` of this clock's time."""


class SystemClock:
    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that only moves when a test calls `advance`; sleepers wake in deadline order."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self._now

    def sleep(self, seconds: float) -> asyncio.Future[None]:
        """The deadline is fixed now, at the call, not when a task wrapping the wait first runs: a sleep started
        while `advance` is moving time must not count its seconds from a later instant."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._order), future))
        return future

    @property
    def next_deadline(self) -> float | None:
        live = [d for d, _, f in self._sleepers if not f.done()]
        return min(live) if live else None

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its deadline and letting it run before moving on."""
        target = self._now + seconds
        while True:
            await _settle()
            while self._sleepers and self._sleepers[0][2].done():
                heapq.heappop(self._sleepers)
            if not self._sleepers or self._sleepers[0][0] > target:
                break
            deadline, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            future.set_result(None)
        self._now = target
        await _settle()


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)
