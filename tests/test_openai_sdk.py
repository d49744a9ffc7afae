"""The official `openai` package, configured as a user would, calling the emulator's Azure OpenAI front end through
the proxy: a chat completion and a streamed one, through the key route and through the Entra route.

The openai package runs in its own venv (`make install` builds .tools/openai-venv; `make test` passes its
interpreter as OPENAI_PYTHON), with tests/sdk/openai_client.py (JSON in on stdin, one JSON line out). The client
holds no real key: `OpenAI(base_url=<proxy>/<route>/openai/v1, api_key="unused")`; the proxy drops the
placeholder and sends the route's own credential. The routes are the ones `aml-auth-proxy emulator
--proxy-config` writes for an openai service (proxy/emulator/proxyconfig.py): `api-key: <key>` from the
mirrored key files, and an Entra token for https://cognitiveservices.azure.com/.default from the emulator's
Entra ID stand-in. A missing openai venv is a failure, never a skip.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.app import ProxyService
from proxy.emulator.aoai import reply_pieces, reply_text
from proxy.emulator.proxyconfig import DEV_CLIENT, build_proxy_config, with_dev_client
from proxy.emulator.runner import RunningEmulator, parse_config, start_emulator
from tests import test_sdk_clients as sdk_clients
from tests.support.servers import ProxyFactory
from tests.support.session import remember
from tests.test_sdk_clients import OutboundTrap, run_sdk, sdk_env, sdk_python

trap = sdk_clients.trap  # the fixture: calls that would leave the machine reach a trap instead

SERVICE = "aoai"
KEY_ROUTE = "aoai"
ENTRA_ROUTE = "aoai-entra"
DEPLOYMENT = "chat"
MODEL = "gpt-4o-mini"
DELAY = 0.1  # seconds between two streamed events
PROMPT = "hello through the proxy"
PLACEHOLDER = "unused"  # what the client holds instead of a key
CLIENT_SECRET = "openai-sdk-dev-client-secret"
# Where `make install` builds the openai venv (named in the failure when OPENAI_PYTHON is missing).
OPENAI_VENV = "openai-venv"


@pytest.fixture
async def emu(tmp_path: Path) -> AsyncIterator[RunningEmulator]:
    raw = {
        "keys_dir": str(tmp_path / "keys"),
        "services": [
            {
                "name": SERVICE,
                "api": "openai",
                "region": "eastus",
                "deployments": {DEPLOYMENT: MODEL},
                "stream_delay_seconds": DELAY,
            }
        ],
    }
    remember(CLIENT_SECRET)
    async with await start_emulator(with_dev_client(parse_config(raw), CLIENT_SECRET)) as running:
        service = running.state.services[SERVICE]
        remember(service.primary_key, service.secondary_key)
        yield running


@pytest.fixture
async def proxy(emu: RunningEmulator, make_proxy: ProxyFactory, tmp_path: Path) -> ProxyService:
    cfg = with_dev_client(parse_config({"services": [{"name": SERVICE, "api": "openai"}]}), CLIENT_SECRET)
    routes = build_proxy_config(emu, cfg, tmp_path / "keys", client_secret=CLIENT_SECRET)["routes"]
    assert [r["name"] for r in routes] == [KEY_ROUTE, ENTRA_ROUTE]
    return await make_proxy(*routes)


async def call_openai(
    proxy: ProxyService, route: str, cases: list[str], *, trap: OutboundTrap, emu: RunningEmulator, tmp_path: Path
) -> dict[str, Any]:
    python = sdk_python("OPENAI_PYTHON", OPENAI_VENV)
    params = {
        "base_url": f"http://127.0.0.1:{proxy.proxy_port}/{route}/openai/v1",
        "api_key": PLACEHOLDER,
        "model": DEPLOYMENT,
        "prompt": PROMPT,
        "cases": cases,
    }
    got = await run_sdk(
        python, "openai_client.py", params, env=sdk_env(emu, trap, tmp_path), trap=trap, tmp_path=tmp_path
    )
    assert trap.seen == [], "the openai client tried to leave the machine"
    # The client sent only its placeholder; the proxy replaced it (the emulator would refuse "unused").
    assert {h["authorization"] for h in got["client_headers"]} == {f"Bearer {PLACEHOLDER}"}
    assert "api-key" not in {name for h in got["client_headers"] for name in h["names"]}
    return got


def check_credential_sent(emu: RunningEmulator, route: str) -> None:
    """What reached the emulator: the key route's api-key alone, or the Entra route's bearer token alone."""
    expected = ("api-key",) if route == KEY_ROUTE else ("authorization",)
    assert emu.state.openai_credential_headers[SERVICE] == expected
    if route == ENTRA_ROUTE:
        assert emu.state.entra_token_calls[DEV_CLIENT] >= 1


@pytest.mark.parametrize("route", [KEY_ROUTE, ENTRA_ROUTE])
async def test_openai_chat_completion_through_the_proxy(
    emu: RunningEmulator, proxy: ProxyService, trap: OutboundTrap, tmp_path: Path, route: str
) -> None:
    got = await call_openai(proxy, route, ["plain"], trap=trap, emu=emu, tmp_path=tmp_path)
    answer = got["plain"]
    assert got["sdk_version"]
    assert (answer["object"], answer["model"], answer["role"]) == ("chat.completion", MODEL, "assistant")
    assert answer["content"] == f"Echo: {PROMPT}"
    assert answer["finish_reason"] == "stop"
    assert answer["id"].startswith("chatcmpl-")
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    check_credential_sent(emu, route)


@pytest.mark.parametrize("route", [KEY_ROUTE, ENTRA_ROUTE])
async def test_openai_streamed_chat_completion_through_the_proxy(
    emu: RunningEmulator, proxy: ProxyService, trap: OutboundTrap, tmp_path: Path, route: str
) -> None:
    got = await call_openai(proxy, route, ["stream"], trap=trap, emu=emu, tmp_path=tmp_path)
    chunks = got["stream"]["chunks"]
    messages = [{"role": "user", "content": PROMPT}]
    expected = len(reply_pieces(messages)) + 2  # a role chunk, one per word, a finish chunk ([DONE] ends it)
    assert len(chunks) == expected, f"the client received {len(chunks)} of {expected} events"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["role"] == "assistant"
    assert "".join(c["content"] or "" for c in chunks) == reply_text(messages)
    assert [c["finish_reason"] for c in chunks][-1] == "stop"
    # Events left the emulator DELAY apart; through the proxy they must still arrive spread out, not in one batch.
    spread = chunks[-1]["at"] - chunks[0]["at"]
    assert spread >= (expected - 1) * DELAY * 0.5, f"{expected} events arrived within {spread:.3f} s"
    check_credential_sent(emu, route)


async def test_openai_client_sees_the_429_and_its_retry_after_ms(
    emu: RunningEmulator, proxy: ProxyService, trap: OutboundTrap, tmp_path: Path
) -> None:
    emu.state.add_fault(target="scoring", action="status", status=429, retry_after=7, service=SERVICE, count=1)
    got = await call_openai(proxy, KEY_ROUTE, ["rate_limited", "plain"], trap=trap, emu=emu, tmp_path=tmp_path)
    limited = got["rate_limited"]
    assert (limited["class"], limited["status"]) == ("RateLimitError", 429)
    assert (limited["retry_after_ms"], limited["retry_after"]) == ("7000", "7")
    assert limited["body"]["code"] == "429"  # the client unwraps Azure's {"error": {...}}
    assert got["plain"]["content"] == f"Echo: {PROMPT}"  # the fault was used up by one call
