"""The emulator's Azure OpenAI front end (proxy/emulator/aoai.py): both URL forms, api-key and bearer
credentials, the Entra audience check, Azure's error shapes, the server-sent event framing and pace, 429s with
retry-after-ms, key rotation through ARM with the key files mirrored, its config and its proxy routes.

Every server is real and listens on 127.0.0.1 with a port chosen by the kernel.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.emulator.aoai import reply_pieces, reply_text
from proxy.emulator.proxyconfig import OPENAI_SCOPE, build_proxy_config
from proxy.emulator.runner import RunningEmulator, parse_config, start_emulator
from tests.support.emulated import SUBSCRIPTION
from tests.support.emulator_checks import config_problems

TOKEN = "dev-control-token"
PRIMARY, SECONDARY = "aoai-primary-key-value", "aoai-secondary-key-value"
DELAY = 0.08
API_VERSION = "2024-10-21"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}]
ACCOUNT = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg/providers/Microsoft.CognitiveServices/accounts/aoai"
ARM = {"Authorization": f"Bearer {TOKEN}"}


def openai_service(**extra: Any) -> dict[str, Any]:
    return {
        "name": "aoai",
        "api": "openai",
        "primary_key": PRIMARY,
        "secondary_key": SECONDARY,
        "deployments": {"chat": "gpt-4o-mini", "big": "gpt-4o"},
        "stream_delay_seconds": DELAY,
        **extra,
    }


@pytest.fixture
async def emu(tmp_path: Path) -> AsyncIterator[RunningEmulator]:
    raw = {"control_plane_tokens": [TOKEN], "keys_dir": str(tmp_path / "keys"), "services": [openai_service()]}
    async with await start_emulator(raw) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def v1_url(emu: RunningEmulator) -> str:
    return emu.service_urls["aoai"] + "/openai/v1/chat/completions"


def deployment_url(emu: RunningEmulator, deployment: str = "big", *, api_version: str | None = API_VERSION) -> str:
    query = f"?api-version={api_version}" if api_version else ""
    return emu.service_urls["aoai"] + f"/openai/deployments/{deployment}/chat/completions{query}"


async def post(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict[str, Any]
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with http.post(url, headers=headers, json=body) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def test_both_url_forms_answer_a_chat_completion(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    key = {"api-key": PRIMARY}
    status, body, _ = await post(http, v1_url(emu), key, {"model": "chat", "messages": MESSAGES})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["model"] == "gpt-4o-mini"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Echo: one two three", "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    again = await post(http, v1_url(emu), key, {"model": "chat", "messages": MESSAGES})
    assert again[1]["id"] == body["id"]  # deterministic

    status, body, headers = await post(http, deployment_url(emu), key, {"messages": MESSAGES})
    assert status == 200, body
    assert body["model"] == "gpt-4o" and headers["x-ms-deployment-name"] == "big"


async def test_api_version_is_required_on_the_deployment_path_only(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    key = {"api-key": PRIMARY}
    status, body, _ = await post(http, deployment_url(emu, api_version=None), key, {"messages": MESSAGES})
    assert (status, body) == (404, {"error": {"code": "404", "message": "Resource not found"}})
    status, _, _ = await post(http, v1_url(emu), key, {"model": "chat", "messages": MESSAGES})
    assert status == 200


async def test_unknown_deployment_and_bad_bodies(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    key = {"api-key": PRIMARY}
    for url, body in (
        (v1_url(emu), {"model": "nope", "messages": MESSAGES}),
        (deployment_url(emu, "nope"), {"messages": MESSAGES}),
    ):
        status, answer, _ = await post(http, url, key, body)
        assert (status, answer["error"]["code"]) == (404, "DeploymentNotFound")
    status, answer, _ = await post(http, v1_url(emu), key, {"messages": MESSAGES})
    assert (status, answer["error"]["code"]) == (400, "BadRequest")
    status, answer, _ = await post(http, v1_url(emu), key, {"model": "chat"})
    assert (status, answer["error"]["code"]) == (400, "BadRequest")


async def test_credentials_api_key_bearer_key_and_entra_tokens(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    body = {"model": "chat", "messages": MESSAGES}
    accepted = [
        {"api-key": PRIMARY},
        {"api-key": SECONDARY},
        {"Authorization": f"Bearer {PRIMARY}"},  # a key sent as a bearer
        {"Authorization": "Bearer " + emu.entra_token("https://cognitiveservices.azure.com")},
        {"Authorization": "Bearer " + emu.entra_token("https://ai.azure.com")},  # Foundry's audience
    ]
    for headers in accepted:
        status, answer, _ = await post(http, v1_url(emu), headers, body)
        assert status == 200, (list(headers), answer)

    refused = [
        {},
        {"api-key": "not-a-key"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Bearer " + emu.entra_token("https://ml.azure.com")},  # another audience
        {"Authorization": "Bearer " + emu.entra_token("https://management.azure.com")},
        {"Authorization": f"Basic {PRIMARY}"},
    ]
    for headers in refused:
        status, answer, _ = await post(http, v1_url(emu), headers, body)
        assert status == 401, list(headers)
        assert answer["error"]["code"] == "401" and answer["error"]["message"]
    status, answer, _ = await post(http, v1_url(emu), refused[3], body)
    assert "audience is incorrect" in answer["error"]["message"]


async def test_an_expired_entra_token_is_refused(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    token = emu.entra_token("https://cognitiveservices.azure.com")
    emu.state.set_clock_offset(2 * 3600)  # the emulator's clock past the token's exp
    status, answer, _ = await post(
        http, v1_url(emu), {"Authorization": f"Bearer {token}"}, {"model": "chat", "messages": MESSAGES}
    )
    assert (status, answer["error"]["code"]) == (401, "401")


async def read_events(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[Any, list[tuple[float, bytes]]]:
    """The response headers and each SSE event (its raw `data: ...` text) with the monotonic time it arrived."""
    events: list[tuple[float, bytes]] = []
    async with http.post(url, headers={"api-key": PRIMARY}, json=body) as resp:
        assert resp.status == 200
        buffer = b""
        async for piece in resp.content.iter_any():
            buffer += piece
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                events.append((time.monotonic(), event))
        assert buffer == b""
        return resp.headers, events


async def test_stream_framing_and_pace(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    headers, events = await read_events(http, v1_url(emu), {"model": "chat", "messages": MESSAGES, "stream": True})
    assert headers["Content-Type"].startswith("text/event-stream")
    assert "Content-Length" not in headers
    assert events[-1][1] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for _, e in events[:-1]]
    assert all(e.startswith(b"data: ") for _, e in events)
    assert len(chunks) == len(reply_pieces(MESSAGES)) + 2
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["model"] == "gpt-4o-mini"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == reply_text(MESSAGES)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    # Each event is written when it is made, DELAY apart: they arrive spread out, not in one piece at the end.
    # (A bound on the spread, not on each gap: a busy machine may hand two events to the reader together.)
    spread = events[-1][0] - events[0][0]
    assert spread >= (len(events) - 1) * DELAY * 0.5, spread
    # The deployment path streams the same way.
    _, events = await read_events(http, deployment_url(emu), {"messages": MESSAGES, "stream": True})
    assert events[-1][1] == b"data: [DONE]"


async def test_a_429_on_demand_carries_retry_after_ms(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    emu.state.add_fault(target="scoring", action="status", status=429, retry_after=3, service="aoai", count=1)
    body = {"model": "chat", "messages": MESSAGES}
    status, answer, headers = await post(http, v1_url(emu), {"api-key": PRIMARY}, body)
    assert (status, answer["error"]["code"]) == (429, "429")
    assert (headers["retry-after-ms"], headers["Retry-After"]) == ("3000", "3")
    status, _, _ = await post(http, v1_url(emu), {"api-key": PRIMARY}, body)
    assert status == 200


async def test_key_rotation_through_arm_mirrors_the_files(
    emu: RunningEmulator, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    keys = tmp_path / "keys" / "aoai"
    assert ((keys / "primary").read_text(), (keys / "secondary").read_text()) == (PRIMARY, SECONDARY)
    url = emu.control_url + ACCOUNT
    async with http.post(f"{url}/listKeys?api-version=2023-05-01", headers=ARM) as resp:
        assert (resp.status, await resp.json()) == (200, {"key1": PRIMARY, "key2": SECONDARY})
    async with http.post(f"{url}/regenerateKey?api-version=2023-05-01", headers=ARM, json={"keyName": "Key1"}) as resp:
        assert resp.status == 200
        rotated = await resp.json()
    assert rotated["key1"] != PRIMARY and rotated["key2"] == SECONDARY
    assert (keys / "primary").read_text() == rotated["key1"]

    body = {"model": "chat", "messages": MESSAGES}
    assert (await post(http, v1_url(emu), {"api-key": PRIMARY}, body))[0] == 401  # the old key is revoked
    assert (await post(http, v1_url(emu), {"api-key": rotated["key1"]}, body))[0] == 200

    async with http.post(f"{url}/regenerateKey?api-version=2023-05-01", headers=ARM, json={"keyName": "Key3"}) as resp:
        assert resp.status == 400
    async with http.post(f"{url}/listKeys", headers=ARM) as resp:
        assert resp.status == 400  # ARM wants its api-version
    async with http.post(f"{url}/listKeys?api-version=2023-05-01") as resp:
        assert resp.status == 401
    async with http.post(f"{url.replace('/aoai', '/other')}/listKeys?api-version=2023-05-01", headers=ARM) as resp:
        assert resp.status == 404


def test_config_checks_for_openai_services() -> None:
    parsed = parse_config({"services": [{"name": "aoai", "api": "openai"}]})
    assert dict(parsed.services[0].deployments) == {"gpt-4o-mini": "gpt-4o-mini"}
    assert parsed.services[0].stream_delay_seconds == 0.05
    config_problems(
        {"services": [openai_service(auth_mode="aad_token")]}, "services[0] (aoai).auth_mode: an openai service"
    )
    config_problems({"services": [openai_service(stream_delay_seconds=-1)]}, "stream_delay_seconds: must be")
    config_problems(
        {"services": [{"name": "v1", "deployments": {"b": "echo"}, "stream_delay_seconds": 1}]},
        "services[0] (v1).stream_delay_seconds: only for openai services",
    )
    config_problems({"services": [openai_service(deployments={"a/b": "m"})]}, "deployment names must be")
    config_problems({"services": [openai_service(colour="blue")]}, "services[0].colour: unknown key")


async def test_proxy_config_has_a_key_route_and_an_entra_route(emu: RunningEmulator, tmp_path: Path) -> None:
    cfg = parse_config({"services": [openai_service()]})
    routes = build_proxy_config(emu, cfg, tmp_path / "keys", client_secret="s")["routes"]
    key, entra = routes
    assert (key["name"], key["match"], key["upstream"]) == ("aoai", "/aoai", emu.service_urls["aoai"])
    assert key["auth"]["header"] == "api-key" and key["auth"]["template"] == "{key}"
    assert key["auth"]["primary_file"] == str((tmp_path / "keys").resolve() / "aoai" / "primary")
    assert (entra["name"], entra["match"], entra["upstream"]) == ("aoai-entra", "/aoai-entra", key["upstream"])
    assert entra["auth"]["type"] == "aad" and entra["auth"]["scope"] == OPENAI_SCOPE
    assert entra["auth"]["identity"]["type"] == "client_secret"
