"""Key auth: key files as kubelet mounts them, reloads, bad files, and failover to the other key after a 401."""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.config.settings import KeyAuth
from proxy.credentials.files import SecretFileError, read_secret_file
from proxy.credentials.keys import SETTLE_SECONDS, KeyFileProvider
from proxy.emulator.secretdir import write_secret_dir
from proxy.metrics import Metrics
from tests.support.servers import ProxyFactory
from tests.support.session import new_key

Serve = Callable[..., Awaitable[str]]


def provider_for(primary: Path, secondary: Path | None = None) -> tuple[KeyFileProvider, Metrics]:
    metrics = Metrics(CollectorRegistry())
    auth = KeyAuth(
        primary_file=str(primary),
        secondary_file=str(secondary) if secondary else None,
        primary_secret_ref=None,
        secondary_secret_ref=None,
        header="Authorization",
        template="Bearer {key}",
        reload_seconds=0.05,
    )
    return KeyFileProvider(route="r", auth=auth, metrics=metrics.for_route("r")), metrics


def reloads(metrics: Metrics, outcome: str) -> float:
    return (
        metrics.registry.get_sample_value("aml_auth_proxy_credential_reloads_total", {"route": "r", "outcome": outcome})
        or 0.0
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"abc123456\n", "abc123456"), (b"  abc123456 \r\n", "abc123456"), (b"abc123456", "abc123456")],
)
def test_key_file_whitespace_and_trailing_newline_are_trimmed(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    assert read_secret_file(str(path)) == expected


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b"\n\n", "empty"),
        (b"abc\r\ndef", "contains control characters"),
        (b"abc\x00def", "contains control characters"),
        (b"\xff\xfe", "not ASCII text"),
        (b"k" * 20000, "larger than 16384 bytes"),
    ],
)
def test_unusable_key_files_are_refused_with_a_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    with pytest.raises(SecretFileError, match=reason):
        read_secret_file(str(path))


def test_missing_and_unreadable_key_files(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="file not found"):
        read_secret_file(str(tmp_path / "nope"))
    with pytest.raises(SecretFileError, match="is a directory"):
        read_secret_file(str(tmp_path))


def settle(root: Path) -> None:
    """Age the current payload past the settle time, as if it had been written a while ago."""
    past = time.time() - 2 * SETTLE_SECONDS
    for entry in (root / "..data").iterdir():
        os.utime(entry, (past, past))


async def test_kubelet_symlink_swap_is_picked_up_and_bad_updates_keep_the_last_good_key(tmp_path: Path) -> None:
    root = tmp_path / "secret"
    first, second = new_key("one"), new_key("two")
    write_secret_dir(root, {"primary": first + "\n"})
    provider, metrics = provider_for(root / "primary")
    await provider.start()
    assert provider.current is not None and provider.current.value == f"Bearer {first}"
    assert provider.readiness() == (True, "ok")
    assert not provider.reload()  # nothing changed: a stat, no read
    assert reloads(metrics, "success") == 1 and reloads(metrics, "unchanged") == 0
    loaded_at = metrics.registry.get_sample_value(
        "aml_auth_proxy_credential_last_success_timestamp_seconds", {"route": "r"}
    )
    assert loaded_at is not None and 0 <= time.time() - loaded_at < 60  # the last successful load

    write_secret_dir(root, {"primary": second + "\n"})
    assert not provider.reload()  # written just now: maybe half written, so not yet
    assert provider.current.value == f"Bearer {first}"
    settle(root)
    assert provider.reload()
    assert provider.current.value == f"Bearer {second}"
    assert os.path.islink(root / "..data")

    write_secret_dir(root, {"primary": ""})  # an emptied key: keep the last good one, and say so
    settle(root)
    assert not provider.reload()
    assert provider.current.value == f"Bearer {second}" and reloads(metrics, "error") == 1
    assert not provider.reload()
    assert reloads(metrics, "error") == 1  # the same bad file is not re-read every interval

    write_secret_dir(root, {"other": "x"})  # the key vanished from the Secret
    provider.reload()
    assert provider.current.value == f"Bearer {second}"

    write_secret_dir(root, {"primary": first})
    settle(root)
    assert provider.reload() and provider.current.value == f"Bearer {first}"


async def test_background_loop_reloads_on_its_interval(tmp_path: Path) -> None:
    root = tmp_path / "secret"
    write_secret_dir(root, {"primary": new_key("a")})
    provider, _metrics = provider_for(root / "primary")
    await provider.start()
    task = asyncio.create_task(provider.run())
    try:
        newer = new_key("b")
        write_secret_dir(root, {"primary": newer})
        async with asyncio.timeout(5):
            while provider.current is None or provider.current.value != f"Bearer {newer}":
                await asyncio.sleep(0.02)
    finally:
        task.cancel()


async def test_unauthorized_switches_to_the_other_key_once_per_credential(tmp_path: Path) -> None:
    root = tmp_path / "secret"
    write_secret_dir(root, {"primary": new_key("p"), "secondary": new_key("s")})
    provider, metrics = provider_for(root / "primary", root / "secondary")
    await provider.start()
    first = provider.current
    assert first is not None and first.label == "primary"
    second = await provider.unauthorized(first)
    assert second is not None and second.label == "secondary" and provider.current is second
    # A concurrent request that also got 401 with the primary retries with what is current now: no flip back.
    assert await provider.unauthorized(first) is second
    assert metrics.registry.get_sample_value("aml_auth_proxy_key_failovers_total", {"route": "r"}) == 1
    # A reload keeps the slot that works.
    write_secret_dir(root, {"primary": new_key("p2"), "secondary": new_key("s")})
    provider.reload()
    assert provider.current is not None and provider.current.label == "secondary"


async def test_without_a_secondary_a_401_has_nothing_to_fail_over_to(tmp_path: Path) -> None:
    root = tmp_path / "secret"
    write_secret_dir(root, {"primary": new_key("p")})
    provider, _ = provider_for(root / "primary")
    await provider.start()
    assert provider.current is not None
    assert await provider.unauthorized(provider.current) is None


def auth_checking_app(valid: set[str], seen: list[str]) -> web.Application:
    """An upstream that accepts only `Bearer <k>` for k in `valid` (mutable, like a key regeneration)."""

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        presented = request.headers.get("Authorization", "")
        seen.append(presented)
        if presented.removeprefix("Bearer ") not in valid:
            return web.json_response({"message": "key_auth_access_denied"}, status=401)
        return web.json_response({"bytes": len(body)})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{t:.*}", handler)
    return app


@pytest.fixture
async def keyed(serve: Serve, make_proxy: ProxyFactory, key_dir: Callable[..., dict[str, str]]) -> dict[str, Any]:
    primary, secondary = new_key("p"), new_key("s")
    valid = {primary, secondary}
    seen: list[str] = []
    upstream = await serve(auth_checking_app(valid, seen))
    svc = await make_proxy({"name": "k", "upstream": upstream, "auth": key_dir(primary, secondary)})
    return {"svc": svc, "valid": valid, "seen": seen, "primary": primary, "secondary": secondary}


def sample(svc: Any, name: str, **labels: str) -> float:
    return svc.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_401_is_retried_once_with_the_other_key_and_that_key_stays(keyed: dict[str, Any]) -> None:
    svc, seen = keyed["svc"], keyed["seen"]
    keyed["valid"].discard(keyed["primary"])  # the primary was regenerated
    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{svc.proxy_port}/score", data=b"x" * 1000) as resp:
            assert resp.status == 200 and (await resp.json())["bytes"] == 1000
        assert seen == [f"Bearer {keyed['primary']}", f"Bearer {keyed['secondary']}"]
        async with client.post(f"http://127.0.0.1:{svc.proxy_port}/score", data=b"y") as resp:
            assert resp.status == 200
    assert seen[2] == f"Bearer {keyed['secondary']}"  # the key that worked is the one used now
    assert sample(svc, "aml_auth_proxy_auth_retries_total", route="k") == 1
    assert sample(svc, "aml_auth_proxy_upstream_auth_failures_total", route="k", code="401") == 1


async def test_401_with_both_keys_goes_back_to_the_caller(keyed: dict[str, Any]) -> None:
    svc, seen = keyed["svc"], keyed["seen"]
    keyed["valid"].clear()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{svc.proxy_port}/score") as resp:
            assert resp.status == 401
            assert await resp.json() == {"message": "key_auth_access_denied"}
    assert len(seen) == 2  # one retry, not a loop


async def test_large_bodies_are_not_retried_but_the_next_request_uses_the_other_key(keyed: dict[str, Any]) -> None:
    svc, seen = keyed["svc"], keyed["seen"]
    keyed["valid"].discard(keyed["primary"])
    big = b"z" * (2 * 1024 * 1024)  # over the default 1 MiB retry buffer
    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://127.0.0.1:{svc.proxy_port}/score", data=io.BytesIO(big)) as resp:
            assert resp.status == 401
        async with client.post(f"http://127.0.0.1:{svc.proxy_port}/score", data=io.BytesIO(big)) as resp:
            assert resp.status == 200 and (await resp.json())["bytes"] == len(big)
    assert seen == [f"Bearer {keyed['primary']}", f"Bearer {keyed['secondary']}"]


async def test_concurrent_401s_fail_over_once(keyed: dict[str, Any]) -> None:
    svc = keyed["svc"]
    keyed["valid"].discard(keyed["primary"])
    async with aiohttp.ClientSession() as client:

        async def call() -> int:
            async with client.get(f"http://127.0.0.1:{svc.proxy_port}/score") as resp:
                return resp.status

        statuses = await asyncio.gather(*(call() for _ in range(20)))
    assert statuses == [200] * 20
    assert sample(svc, "aml_auth_proxy_key_failovers_total", route="k") == 1
