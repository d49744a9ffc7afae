"""Weakenings of the emulator's Azure OpenAI front end (proxy/emulator/aoai.py) and its proxy routes that the
emulator's own tests and the openai package's tests must catch (run by `make mutants`, which passes OPENAI_PYTHON)."""

from tests.mutation import Mutant

AOAI = "proxy/emulator/aoai.py"
_E = "tests/test_emulator_openai.py::"
_S = "tests/test_openai_sdk.py::"

MUTANTS = [
    Mutant(
        name="openai front end accepts Entra tokens for Azure ML too (audience check widened)",
        path="proxy/emulator/state.py",
        old="self.accepts_entra_token(presented, audiences=OPENAI_AUDIENCES)",
        new="self.accepts_entra_token(presented, audiences=OPENAI_AUDIENCES | ML_AUDIENCES)",
        tests=(_E + "test_credentials_api_key_bearer_key_and_entra_tokens",),
    ),
    Mutant(
        name="openai stream sends its events back to back (no spacing)",
        path=AOAI,
        old="            await asyncio.sleep(service.stream_delay_seconds)\n",
        new="            pass\n",
        tests=(_E + "test_stream_framing_and_pace", _S + "test_openai_streamed_chat_completion_through_the_proxy"),
    ),
    Mutant(
        name="openai stream ends without data: [DONE]",
        path=AOAI,
        old='    events += [chunk({}, "stop"), b"data: [DONE]\\n\\n"]\n',
        new='    events += [chunk({}, "stop")]\n',
        tests=(_E + "test_stream_framing_and_pace",),
    ),
    Mutant(
        name="openai deployment path without api-version is served",
        path=AOAI,
        old='    if not request.query.get("api-version"):\n',
        new="    if False:\n",
        tests=(_E + "test_api_version_is_required_on_the_deployment_path_only",),
    ),
    Mutant(
        name="openai 429 without retry-after-ms",
        path=AOAI,
        old="            early.headers[RETRY_AFTER_MS] = str(fault.retry_after * 1000)\n",
        new="            pass\n",
        tests=(
            _E + "test_a_429_on_demand_carries_retry_after_ms",
            _S + "test_openai_client_sees_the_429_and_its_retry_after_ms",
        ),
    ),
    Mutant(
        name="proxy config's openai key route sends the key as a bearer, not api-key",
        path="proxy/emulator/proxyconfig.py",
        old='                route["auth"].update({"header": "api-key", "template": "{key}"})\n',
        new="",
        tests=(_S + "test_openai_chat_completion_through_the_proxy",),
    ),
]
