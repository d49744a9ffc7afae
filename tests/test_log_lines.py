"""What the process writes as `aml-auth-proxy run` sets logging up: one JSON document per line whatever a library
logs, azure-identity's, azure-core's and msal's chatter below WARNING left out, and a library's repeated warning
written once a minute with the count of repeats."""

from __future__ import annotations

import json
import logging

import pytest

from proxy.logs import LibraryRepeats
from tests.support.logsetup import logging_as_run


def test_libraries_write_warnings_only_and_every_record_is_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    with logging_as_run("debug") as out:  # even with the proxy at debug
        mixin = logging.getLogger("azure.identity.aio._internal.get_token_mixin")
        mixin.info("%s.%s succeeded", "ClientSecretCredential", "get_token_info")  # one per token call
        http = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
        http.info("Request URL: 'https://login.example/t/oauth2/v2.0/token'\nRequest method: 'POST'")
        logging.getLogger("msal.application").debug("Broker enabled? None")
        logging.getLogger("urllib3.connectionpool").debug("Starting new HTTPS connection (1): login.example:443")
        failure = ValueError("AADSTS90033: A transient error has occurred.\r\nTrace ID: 1234")
        # azure-identity passes exc_info=False (not None) when DEBUG is off: the compiled formatter took it for a
        # tuple, failed, and logging wrote a multi-line "--- Logging error ---" traceback to stderr instead.
        mixin.warning("%s.%s failed: %s", "ClientSecretCredential", "get_token_info", failure, exc_info=False)
        http.warning("%s and %s", "one argument for two")  # a library bug: the message cannot be formatted
        logging.getLogger("aml_auth_proxy.test").debug("ours\nat debug")
    assert capsys.readouterr().err == ""  # nothing bypassed the JSON lines
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(d["logger"], d["level"]) for d in docs] == [
        ("azure.identity.aio._internal.get_token_mixin", "warning"),
        ("azure.core.pipeline.policies.http_logging_policy", "warning"),
        ("aml_auth_proxy.test", "debug"),
    ]
    assert docs[0]["message"].endswith("failed: AADSTS90033: A transient error has occurred.\r\nTrace ID: 1234")
    assert docs[1]["message"] == "%s and %s (the library's arguments did not fit its message)"
    assert docs[2]["message"] == "ours\nat debug"


def test_a_librarys_repeated_warning_is_written_once_a_minute_with_the_count() -> None:
    now = [1000.0]
    repeats = LibraryRepeats(clock=lambda: now[0])

    def record(name: str, msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)

    def passes(rec: logging.LogRecord) -> bool:
        return bool(repeats.filter(rec))

    failed = "%s.%s failed: %s"
    assert passes(record("azure.identity", failed, "A", "get_token", "trace 1"))
    for second in range(1, 60):  # retries every second: each with new trace ids, the same message template
        now[0] = 1000.0 + second
        assert not passes(record("azure.identity", failed, "A", "get_token", f"trace {second}"))
    assert passes(record("azure.core", "another message"))  # another message is not a repeat
    assert passes(record("aml_auth_proxy.refresher", failed, "ours", "are", "never held back"))
    now[0] = 1060.0
    again = record("azure.identity", failed, "A", "get_token", "trace 60")
    assert passes(again)
    assert again.fields == {"repeats_not_logged": 59}  # type: ignore[attr-defined]
    now[0] = 1061.0
    assert not passes(record("azure.identity", failed, "A", "get_token", "trace 61"))
