"""The official `openai` package calling chat completions through the proxy, configured as a user would.

Run by tests/test_openai_sdk.py with the openai venv's Python (OPENAI_PYTHON); JSON in on stdin, one JSON line
out (tests/sdk/sdk_io.py). The client is `OpenAI(base_url=<proxy>/<route>/openai/v1, api_key=<a placeholder>)`:
the v1 API of Azure OpenAI and Foundry takes the plain OpenAI client with the model (the deployment) in the body.
The placeholder goes out as `Authorization: Bearer <placeholder>`; the proxy drops it and puts the route's own
credential, so no real key is ever in the client.

Params: base_url, api_key, model, prompt, cases (a list of "plain", "stream", "rate_limited"), max_retries.
Each case is one step:

- plain: one chat completion; its id, object, model, content, finish_reason and usage;
- stream: a streamed chat completion; every chunk's content delta and the time.monotonic() it arrived at;
- rate_limited: a chat completion that must fail with a status error; its status, retry headers and body.
"""

from __future__ import annotations

import time
from typing import Any

from sdk_io import sdk_run


def main() -> None:
    with sdk_run("openai") as run:
        p = run.params
        import openai

        seen_headers: list[dict[str, str]] = []

        def record(request: Any) -> None:
            # What the client itself sends (before the proxy): header names and whether a credential is there.
            names = {k.lower() for k in request.headers}
            seen_headers.append({"authorization": request.headers.get("authorization", ""), "names": sorted(names)})

        http_client = openai.DefaultHttpxClient(event_hooks={"request": [record]})
        client = openai.OpenAI(
            base_url=p["base_url"], api_key=p["api_key"], max_retries=p.get("max_retries", 0), http_client=http_client
        )
        messages = [{"role": "user", "content": p["prompt"]}]

        def plain() -> dict[str, Any]:
            answer = client.chat.completions.create(model=p["model"], messages=messages)
            choice = answer.choices[0]
            return {
                "id": answer.id,
                "object": answer.object,
                "model": answer.model,
                "content": choice.message.content,
                "role": choice.message.role,
                "finish_reason": choice.finish_reason,
                "usage": answer.usage.model_dump() if answer.usage else None,
            }

        def stream() -> dict[str, Any]:
            chunks: list[dict[str, Any]] = []
            started = time.monotonic()
            with client.chat.completions.create(model=p["model"], messages=messages, stream=True) as events:
                for chunk in events:
                    choice = chunk.choices[0] if chunk.choices else None
                    chunks.append(
                        {
                            "at": time.monotonic() - started,
                            "object": chunk.object,
                            "content": choice.delta.content if choice else None,
                            "role": choice.delta.role if choice else None,
                            "finish_reason": choice.finish_reason if choice else None,
                        }
                    )
            return {"chunks": chunks}

        def rate_limited() -> dict[str, Any]:
            try:
                client.chat.completions.create(model=p["model"], messages=messages)
            except openai.APIStatusError as exc:
                headers = exc.response.headers
                return {
                    "class": type(exc).__name__,
                    "status": exc.status_code,
                    "retry_after_ms": headers.get("retry-after-ms"),
                    "retry_after": headers.get("retry-after"),
                    "body": exc.body,
                }
            raise AssertionError("expected the chat completion to fail with a status error")

        steps = {"plain": plain, "stream": stream, "rate_limited": rate_limited}
        for case in p["cases"]:
            run.step(case, steps[case])
        run.out["client_headers"] = seen_headers


if __name__ == "__main__":
    main()
