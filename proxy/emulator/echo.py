"""A stand-in scoring server: the AML sample model plus endpoints that show what arrived and stream big bodies.

GET  /                   200 "Healthy" (azmlinfsrv's liveness answer)
POST /score              {"data": [numbers]} -> {"result": [x * 2, ...]}, like the AML sample score.py
ANY  /echo...            what arrived: method, raw path and query, headers in order, body size and SHA-256
GET  /download?bytes=N   N bytes of a fixed pattern, chunked (or with Content-Length when length=1)
POST /upload             {"bytes": N, "sha256": ...} of the streamed body
GET  /status/{code}      that status with a small JSON body
GET  /sleep?seconds=x    sleeps, then 200

Bodies are read and written in chunks, so gigabytes pass with bounded memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from typing import Any

from aiohttp import web

CHUNK_SIZE = 64 * 1024
# The download pattern: this block repeated, cut at N bytes. Deterministic so tests can predict the hash.
PATTERN_BLOCK = bytes(range(256)) * (CHUNK_SIZE // 256)
MAX_SLEEP_SECONDS = 300.0
SCORE_FACTOR = 2


def expected_download_sha256(n: int) -> str:
    """The SHA-256 hex digest of `GET /download?bytes=n`."""
    digest = hashlib.sha256()
    full, rest = divmod(n, CHUNK_SIZE)
    for _ in range(full):
        digest.update(PATTERN_BLOCK)
    digest.update(PATTERN_BLOCK[:rest])
    return digest.hexdigest()


def create_echo_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", _healthy)
    app.router.add_post("/score", _score)
    app.router.add_route("*", "/echo{tail:.*}", _echo)
    app.router.add_get("/download", _download)
    app.router.add_post("/upload", _upload)
    app.router.add_get("/status/{code}", _status)
    app.router.add_get("/sleep", _sleep)
    return app


def _bad(text: str) -> web.Response:
    return web.json_response({"message": text}, status=400)


async def _healthy(request: web.Request) -> web.Response:
    return web.Response(text="Healthy")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


async def _score(request: web.Request) -> web.Response:
    try:
        body: Any = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        return _bad('the body must be JSON like {"data": [1, 2, 3]}')
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(_is_number(x) for x in data):
        return _bad('the body must be JSON like {"data": [1, 2, 3]}')
    return web.json_response({"result": [x * SCORE_FACTOR for x in data]})


async def _digest_body(request: web.Request) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_chunked(CHUNK_SIZE):
        size += len(chunk)
        digest.update(chunk)
    return size, digest.hexdigest()


async def _echo(request: web.Request) -> web.Response:
    size, sha = await _digest_body(request)
    return web.json_response(
        {
            "method": request.method,
            "path": request.rel_url.raw_path,
            "query": request.rel_url.raw_query_string,
            "headers": [[name, value] for name, value in request.headers.items()],
            "body_bytes": size,
            "body_sha256": sha,
        }
    )


def _int_param(request: web.Request, name: str, *, default: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise web.HTTPBadRequest(
                text=json.dumps({"message": f"{name} is required"}), content_type="application/json"
            )
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise web.HTTPBadRequest(
            text=json.dumps({"message": f"{name} must be a non-negative integer"}), content_type="application/json"
        )
    return value


async def _download(request: web.Request) -> web.StreamResponse:
    n = _int_param(request, "bytes")
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("length") == "1":
        response.content_length = n
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    remaining = n
    while remaining > 0:
        chunk = PATTERN_BLOCK if remaining >= CHUNK_SIZE else PATTERN_BLOCK[:remaining]
        await response.write(chunk)
        remaining -= len(chunk)
    await response.write_eof()
    return response


async def _upload(request: web.Request) -> web.Response:
    size, sha = await _digest_body(request)
    return web.json_response({"bytes": size, "sha256": sha})


async def _status(request: web.Request) -> web.Response:
    try:
        code = int(request.match_info["code"])
    except ValueError:
        code = 0
    if not 200 <= code <= 599:
        return _bad("code must be an integer from 200 to 599")
    if code in (204, 304):
        return web.Response(status=code)
    return web.json_response({"status": code}, status=code)


async def _sleep(request: web.Request) -> web.Response:
    try:
        seconds = float(request.query.get("seconds", "0"))
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_SLEEP_SECONDS:
        return _bad(f"seconds must be a number from 0 to {MAX_SLEEP_SECONDS}")
    await asyncio.sleep(seconds)
    return web.json_response({"slept": seconds})
