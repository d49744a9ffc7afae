"""HTTP `Date` headers from the emulator's clock, so a client sees the same skew in headers as in token times."""

from __future__ import annotations

from collections.abc import Callable
from email.utils import formatdate

from aiohttp import web


def http_date(epoch: float) -> str:
    """RFC 9110 IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`."""
    return formatdate(epoch, usegmt=True)


def use_clock_for_date(app: web.Application, now: Callable[[], float]) -> None:
    """Every response of `app` gets `Date` from `now()` (aiohttp would otherwise use the real clock)."""

    async def set_date(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Date"] = http_date(now())

    app.on_response_prepare.append(set_date)
