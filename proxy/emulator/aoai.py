"""An Azure OpenAI-style front end: chat completions for one emulated resource (a service with `api: openai`).

Paths (one listener per resource, like `https://<resource>.openai.azure.com`):

    POST /openai/v1/chat/completions                                  the v1 API: the deployment is the body's model
    POST /openai/deployments/{deployment}/chat/completions?api-version=...   the deployment-path API

Credentials, as Azure OpenAI takes them: `api-key: <key>` (either key of the resource), or `Authorization:
Bearer <t>` where t is an unexpired Entra stand-in token for https://cognitiveservices.azure.com or, as a Foundry
resource accepts, https://ai.azure.com (scopes `<audience>/.default`), or one of the keys (some clients send a key
as a bearer). Errors come in Azure's shape, `{"error": {"code", "message"}}`: 401 with code "401"; a
deployment path without api-version is the 404 "Resource not found" Azure answers; an unknown deployment or model
is 404 DeploymentNotFound; a body that is not a chat request is 400.

The answer is deterministic: the assistant says "Echo: " and the last user message (its text), word by word when
streamed. `"stream": true` answers `text/event-stream`: a role chunk, one `chat.completion.chunk` per word, a
finish chunk, then `data: [DONE]`, each written (and flushed) as it is produced, `stream_delay_seconds` apart.

Faults (target "scoring", the resource's name and region) are taken before the credential check, as at the AML
scoring front end. A `status` fault answers in Azure's shape; with `retry_after` it carries `Retry-After`
(seconds) and `retry-after-ms`, as Azure OpenAI's 429s do.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from aiohttp import web

from proxy.emulator import faults
from proxy.emulator.dates import use_clock_for_date
from proxy.emulator.state import EmulatorState, Service
from proxy.emulator.tokens import TokenRejected

STATE = web.AppKey("emulator_openai_state", EmulatorState)
SERVICE = web.AppKey("emulator_openai_service", str)

V1_PATH = "/openai/v1/chat/completions"
DEPLOYMENT_PATH = "/openai/deployments/{deployment}/chat/completions"
KEY_HEADER = "api-key"
RETRY_AFTER_MS = "retry-after-ms"

KEY_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an "
    "active subscription and use a correct regional API endpoint for your resource."
)
KEY_MISSING = (
    "Access denied due to missing subscription key. Make sure to include subscription key when making requests "
    "to an API."
)
TOKEN_DENIED = (
    "Unauthorized. Access token is missing, invalid, audience is incorrect (https://cognitiveservices.azure.com), "
    "or have expired."
)
DEPLOYMENT_MISSING = (
    "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, "
    "please wait a moment and try again."
)


def create_openai_app(state: EmulatorState, *, service: str) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app[SERVICE] = service
    use_clock_for_date(app, state.now)
    app.router.add_post(V1_PATH, _v1_chat)
    app.router.add_post(DEPLOYMENT_PATH, _deployment_chat)
    return app


def error(status: int, code: str, text: str) -> web.Response:
    """Azure OpenAI's error shape."""
    return web.json_response({"error": {"code": code, "message": text}}, status=status)


def _fault_error(status: int, text: str) -> web.Response:
    if status == 429:
        text = f"Requests to the ChatCompletions_Create Operation have exceeded the rate limit. ({text})"
    return error(status, str(status), text)


def reply_text(messages: list[Any]) -> str:
    """What the emulated model answers: "Echo: " and the text of the last user message."""
    said = ""
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            said = _text_of(message.get("content"))
    return f"Echo: {said}" if said else "Echo:"


def reply_pieces(messages: list[Any]) -> list[str]:
    """The content deltas of a streamed answer: the first word, then each further word with its leading space."""
    words = reply_text(messages).split(" ")
    return [words[0], *(" " + word for word in words[1:] if word)]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _tokens(text: str) -> int:
    return len(text.split())


async def _v1_chat(request: web.Request) -> web.StreamResponse:
    return await _chat(request, deployment=None)


async def _deployment_chat(request: web.Request) -> web.StreamResponse:
    if not request.query.get("api-version"):
        # What Azure OpenAI answers for a deployment path without its api-version.
        return error(404, "404", "Resource not found")
    return await _chat(request, deployment=request.match_info["deployment"])


async def _chat(request: web.Request, *, deployment: str | None) -> web.StreamResponse:
    state = request.app[STATE]
    name = request.app[SERVICE]
    service = state.services.get(name)
    if service is None:
        return error(404, "404", "Resource not found")
    fault = state.take_fault("scoring", service.name, service.region)
    early = await faults.before_handler(request, fault, _fault_error)
    if early is not None:
        if fault is not None and fault.retry_after is not None:
            early.headers[RETRY_AFTER_MS] = str(fault.retry_after * 1000)
        return early

    current = state.services.get(name, service)  # a key regeneration may have happened during a delay fault
    denied = check_credential(state, current, request)
    if denied is not None:
        return denied

    try:
        body: Any = json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError):
        return error(400, "BadRequest", "The request body is not valid JSON.")
    if not isinstance(body, dict):
        return error(400, "BadRequest", "The request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return error(400, "BadRequest", "'messages' is required: a non-empty list of messages.")
    if deployment is None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return error(400, "BadRequest", "'model' is required: the name of a deployment.")
        deployment = model
    model_name = current.deployments.get(deployment)
    if model_name is None:
        return error(404, "DeploymentNotFound", DEPLOYMENT_MISSING)

    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    completion_id = "chatcmpl-" + hashlib.sha256(raw).hexdigest()[:29]
    created = int(state.now())
    headers = {"x-ms-deployment-name": deployment, "apim-request-id": completion_id}
    if body.get("stream") is True:
        return await _stream(request, current, messages, completion_id, created, model_name, headers)
    text = reply_text(messages)
    prompt_tokens = sum(_tokens(_text_of(m.get("content"))) for m in messages if isinstance(m, dict))
    answer = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": _tokens(text),
            "total_tokens": prompt_tokens + _tokens(text),
        },
        "system_fingerprint": None,
    }
    return await faults.finish(request, web.json_response(answer, headers=headers), fault)


def check_credential(state: EmulatorState, service: Service, request: web.Request) -> web.Response | None:
    """None when the request carries a key of `service` or an Entra token for Azure OpenAI; else the 401."""
    headers = request.headers
    state.openai_credential_headers[service.name] = tuple(
        sorted(h for h in (KEY_HEADER, "authorization") if h in headers)
    )
    keys = headers.getall(KEY_HEADER, [])
    if keys:
        if len(keys) != 1 or not service.accepts_key(keys[0].strip()):
            return error(401, "401", KEY_DENIED)
        return None
    values = headers.getall("Authorization", [])
    if not values:
        return error(401, "401", KEY_MISSING)
    scheme, _, presented = values[0].strip().partition(" ")
    presented = presented.strip()
    if len(values) != 1 or scheme.lower() != "bearer" or not presented:
        return error(401, "401", TOKEN_DENIED)
    if presented.count(".") != 2:  # not a JWT: a key sent as a bearer
        return None if service.accepts_key(presented) else error(401, "401", KEY_DENIED)
    try:
        state.check_openai_token(presented)
    except TokenRejected:
        return error(401, "401", TOKEN_DENIED)
    return None


async def _stream(
    request: web.Request,
    service: Service,
    messages: list[Any],
    completion_id: str,
    created: int,
    model: str,
    headers: dict[str, str],
) -> web.StreamResponse:
    """Server-sent events, each written as soon as it is made, `stream_delay_seconds` apart; [DONE] last."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        event = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece}) for piece in reply_pieces(messages)]
    events += [chunk({}, "stop"), b"data: [DONE]\n\n"]
    response = web.StreamResponse(
        status=200, headers={**headers, "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for i, event in enumerate(events):
        if i:
            await asyncio.sleep(service.stream_delay_seconds)
        await response.write(event)  # aiohttp hands each write to the transport: nothing is held back
    await response.write_eof()
    return response
