"""How a queued fault (see `state.Fault`) is played out on an HTTP exchange.

A fault acts in two places: before the handler does its work (`status`, `reset`, `delay`, `invalid_json`) and
while the response body is written (`stall_after_headers`, `trickle`). The body-time faults keep the real status
and headers, so a client sees a normal-looking response that arrives slowly. `missing_fields` is played by the
token handlers themselves (`without_fields`): a 200 whose JSON lacks the token. So are `expired_token` and
`exp_before_expiry` (AML token operation only, see `EmulatorState.issue_aml_token`): a well-formed 200 whose token
is already expired, or whose JWT exp is earlier than the expiryOn/expiryTimeUtc the answer reports.

Where a fault is taken: at the scoring front end once the service is known and before the credential check (so
a fault can be played against any client); at the control planes after the token check and the service lookup
(so only authorised, well-formed calls use up a counted fault); at the Entra ID and ML Server stand-ins before
any check. One request takes at most one fault: the oldest match.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

from aiohttp import web

from proxy.emulator.state import Fault

ErrorBody = Callable[[int, str], web.Response]
# What `invalid_json` sends: a 200 that says JSON but is an HTML error page, as a misbehaving gateway might.
INVALID_JSON_BODY = b"<html><body><h1>Temporarily unavailable</h1></body></html>"


async def before_handler(request: web.Request, fault: Fault | None, error: ErrorBody) -> web.Response | None:
    """Play out the part of `fault` that comes before the real work; a response means: send this instead."""
    if fault is None:
        return None
    if fault.action == "status":
        status = fault.status if fault.status is not None else 500
        response = error(status, f"Emulated fault {fault.id}: status {status}.")
        if fault.retry_after is not None:
            response.headers["Retry-After"] = str(fault.retry_after)
        return response
    if fault.action == "invalid_json":
        return web.Response(status=200, body=INVALID_JSON_BODY, content_type="application/json")
    if fault.action == "reset":
        return reset_connection(request)
    if fault.action == "delay":
        await asyncio.sleep(fault.seconds)
    return None


def reset_connection(request: web.Request) -> web.Response:
    """Drop the TCP connection without an HTTP response (the peer sees a reset or an early EOF).

    The returned response is never sent: aiohttp finds the transport closed, treats it like a client that went
    away and logs nothing. Raising instead would log a traceback for a fault that was asked for.
    """
    transport = request.transport
    if transport is not None:
        transport.abort()
    return web.Response(status=500)


async def write_body(
    response: web.StreamResponse,
    chunks: AsyncIterable[bytes],
    fault: Fault | None,
) -> None:
    """Write `chunks` to a prepared response, stalling or trickling as `fault` says; then end the body."""
    if fault is not None and fault.action == "stall_after_headers":
        # A prepared StreamResponse has put its headers on the wire already; hold the body back.
        await asyncio.sleep(fault.seconds)
    interval = fault.seconds if fault is not None and fault.action == "trickle" else None
    first = True
    async for chunk in chunks:
        if interval is None:
            await response.write(chunk)
            continue
        for i in range(len(chunk)):
            # One byte, then a pause, and so on: n bytes take (n - 1) intervals.
            if not first:
                await asyncio.sleep(interval)
            first = False
            await response.write(chunk[i : i + 1])
    await response.write_eof()


async def send_slowly(request: web.Request, response: web.Response, fault: Fault) -> web.StreamResponse:
    """Send an already-built response with a body-time fault applied."""
    body = response.body
    if not isinstance(body, bytes):
        body = b"" if body is None else str(body).encode()
    stream = web.StreamResponse(status=response.status, reason=response.reason, headers=response.headers)
    stream.content_length = len(body)
    await stream.prepare(request)

    await write_body(stream, _one_chunk(body), fault)
    return stream


async def _one_chunk(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def finish(request: web.Request, response: web.Response, fault: Fault | None) -> web.StreamResponse:
    """`response` as it is, or sent slowly when `fault` is a body-time fault (the handlers' last step)."""
    if fault is not None and is_body_fault(fault):
        return await send_slowly(request, response, fault)
    return response


def without_fields(payload: dict[str, Any], fault: Fault | None, fields: Iterable[str]) -> dict[str, Any]:
    """`payload` minus `fields` when `fault` is a `missing_fields` fault; else `payload` itself."""
    if fault is None or fault.action != "missing_fields":
        return payload
    dropped = set(fields)
    return {name: value for name, value in payload.items() if name not in dropped}


def is_body_fault(fault: Fault | None) -> bool:
    return fault is not None and fault.action in ("stall_after_headers", "trickle")
