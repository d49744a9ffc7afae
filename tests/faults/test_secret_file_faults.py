"""Faults in a mounted key file while the proxy serves: the file is deleted, emptied, made unreadable, replaced by a
directory or a FIFO, or rewritten in place by a writer that is not atomic. The proxy keeps serving with the last
good key, says so once (log, /readyz, metrics), and uses the new key once the file is good again.

The proxy runs in its own process. As root it runs without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv),
so that a mode-000 file is as unreadable to it as it would be to the non-root user of the image.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.emulator.secretdir import write_secret_dir
from tests.support.procs import ProxyProcess
from tests.support.session import new_key

POLL = 0.05
NO_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--") if os.geteuid() == 0 else ()


class Upstream:
    """Accepts the keys it is told are valid and records every Authorization it saw."""

    def __init__(self) -> None:
        self.valid: set[str] = set()
        self.seen: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        self.seen.append(auth)
        if auth.removeprefix("Bearer ") not in self.valid:
            return web.json_response({"error": "bad key"}, status=401)
        return web.json_response({"ok": True})


@pytest.fixture
async def rig(serve: Callable[..., Awaitable[str]], tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    upstream = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{t:.*}", upstream.handle)
    url = await serve(app)
    root = tmp_path / "secret"
    primary, secondary = new_key("file-p"), new_key("file-s")
    upstream.valid = {primary, secondary}
    write_secret_dir(root, {"primary": primary + "\n", "secondary": secondary + "\n"})
    age(root)
    route = {
        "name": "files",
        "upstream": url,
        "auth": {
            "type": "key",
            "primary_file": str(root / "primary"),
            "secondary_file": str(root / "secondary"),
            "reload_seconds": POLL,
        },
    }
    proxy = await ProxyProcess.start({"routes": [route]}, tmp_path, name="secret-files", argv_prefix=NO_DAC)
    try:
        yield {"proxy": proxy, "upstream": upstream, "root": root, "primary": primary}
    finally:
        await proxy.stop()


def age(root: Path, seconds: float = 5.0) -> None:
    """Make the current payload look written `seconds` ago (past the proxy's settle time)."""
    past = os.path.getmtime(root) - seconds
    for entry in (root / "..data").iterdir():
        os.utime(entry, (past, past), follow_symlinks=False)


async def score_for(proxy: ProxyProcess, seconds: float) -> list[int]:
    """Call the proxy for a while (bounded in time and count); the statuses."""
    statuses: list[int] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        while loop.time() < end and len(statuses) < 2000:
            async with client.post(proxy.proxy_url + "/score", json={"x": 1}) as resp:
                await resp.read()
                statuses.append(resp.status)
            await asyncio.sleep(0.01)
    return statuses


async def readyz(proxy: ProxyProcess) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as client, client.get(proxy.admin_url + "/readyz") as resp:
        return resp.status, (await resp.json())["routes"]["files"]


def key_file(root: Path) -> Path:
    """The real file behind root/primary (through kubelet's ..data link)."""
    return root / "..data" / "primary"


def break_deleted(root: Path) -> None:
    (root / "primary").unlink()


def break_emptied(root: Path) -> None:
    key_file(root).write_bytes(b"")


def break_unreadable(root: Path) -> None:
    key_file(root).chmod(0)


def break_directory(root: Path) -> None:
    path = key_file(root)
    path.unlink()
    path.mkdir()


def break_fifo(root: Path) -> None:
    path = key_file(root)
    path.unlink()
    os.mkfifo(path)


FAULTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "deleted": (break_deleted, "file not found"),
    "emptied": (break_emptied, "empty"),
    "unreadable": (break_unreadable, "permission denied"),
    "replaced by a directory": (break_directory, "is a directory"),
    "replaced by a FIFO": (break_fifo, "not a regular file"),
}


def repair(root: Path, key: str, secondary_key: str) -> None:
    data = root / "..data"
    target = data.resolve()
    if (root / "primary").exists() or (root / "primary").is_symlink():
        path = target / "primary"
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    write_secret_dir(root, {"primary": key + "\n", "secondary": secondary_key + "\n"})


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_a_broken_key_file_keeps_the_last_good_key_reports_it_once_and_recovers(
    rig: dict[str, Any], fault: str
) -> None:
    proxy, upstream, root = rig["proxy"], rig["upstream"], rig["root"]
    assert set(await score_for(proxy, 0.2)) == {200}
    secondary = (root / "secondary").read_text().strip()
    breaker, reason = FAULTS[fault]
    breaker(root)
    statuses = await score_for(proxy, 0.6)  # a dozen polls see the broken file
    assert set(statuses) == {200}, "the last good key must keep serving"
    assert upstream.seen[-1] == f"Bearer {rig['primary']}"
    status, detail = await readyz(proxy)
    assert status == 200 and detail["file_errors"] == {"primary": f"{reason}; keeping the last good key"}
    errors = [e for e in proxy.events() if e.get("event") == "key_file_error"]
    assert [(e["slot"], e["reason"], e["action"]) for e in errors] == [
        ("primary", reason, "keeping the last good key")
    ], "one line per change of state, not one per poll"
    assert await proxy.metric("aml_auth_proxy_credential_reloads_total", route="files", outcome="error") == 1

    fresh = new_key("file-fresh")
    upstream.valid.add(fresh)
    repair(root, fresh, secondary)
    age(root)
    async with asyncio.timeout(5):
        while upstream.seen[-1] != f"Bearer {fresh}":
            assert set(await score_for(proxy, 0.1)) == {200}
    status, detail = await readyz(proxy)
    assert status == 200 and "file_errors" not in detail
    assert [e["slot"] for e in proxy.events() if e.get("event") == "key_file_recovered"] == ["primary"]


async def test_a_key_file_rewritten_in_place_is_never_used_half_written(rig: dict[str, Any]) -> None:
    """A writer that truncates and writes in two steps (not kubelet's atomic swap): the half key is never sent."""
    proxy, upstream, root = rig["proxy"], rig["upstream"], rig["root"]
    fresh = new_key("file-whole")
    upstream.valid.add(fresh)
    half = fresh[: len(fresh) // 2]
    path = key_file(root)
    with path.open("wb") as fh:  # same inode, written in two steps with a pause between
        fh.write(half.encode())
        fh.flush()
        during = await score_for(proxy, 0.4)  # eight polls see the half-written file
        fh.write(fresh[len(half) :].encode() + b"\n")
    assert set(during) == {200}
    async with asyncio.timeout(5):
        while upstream.seen[-1] != f"Bearer {fresh}":
            assert set(await score_for(proxy, 0.1)) == {200}
    assert f"Bearer {half}" not in upstream.seen
    assert not [e for e in proxy.events() if e.get("event") == "key_failover"]
