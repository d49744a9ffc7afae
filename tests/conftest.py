"""Shared fixtures and session hooks: real servers on 127.0.0.1, kubelet-style key directories, the session log
scan. What tests import as a library lives in tests/support/.

Every credential a test creates is remembered; at the end of the session every log line written by the code
under test (in-process, captured without redaction, and by every proxy subprocess) is scanned for them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.app import ProxyService
from proxy.config.reader import parse
from proxy.emulator.kube import RunningKubeApi, start_kube_api
from proxy.emulator.secretdir import write_secret_dir
from proxy.logs import JsonFormatter
from tests.support.compiled import describe
from tests.support.logscan import scan_logs
from tests.support.servers import KUBE_NS, ProxyFactory, start_app
from tests.support.session import LOG_DIR, SESSION_DIGESTS, SESSION_SECRETS, remember


def pytest_report_header(config: pytest.Config) -> str:
    return describe()


def pytest_configure(config: pytest.Config) -> None:
    handler = logging.FileHandler(LOG_DIR / "in-process.log")
    handler.setFormatter(JsonFormatter(redact=False))
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.getLogger("aml_auth_proxy").setLevel(logging.DEBUG)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    findings = scan_logs(LOG_DIR, SESSION_SECRETS, SESSION_DIGESTS)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = sum(len(f.read_bytes().splitlines()) for f in LOG_DIR.glob("*.log"))
    summary = (
        f"log scan: {len(SESSION_SECRETS)} secrets, {len(SESSION_DIGESTS)} token digests and any JWT checked "
        f"against {lines} log lines in {LOG_DIR}"
    )
    if reporter is not None:
        reporter.write_line(summary)
    if findings:
        for finding in findings[:20]:
            if reporter is not None:
                reporter.write_line(f"SECRET IN LOG: {finding}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def key_dir(tmp_path: Path) -> Callable[..., dict[str, str]]:
    """Write primary/secondary keys the way kubelet mounts a Secret; returns the key paths."""
    root = tmp_path / "secret"

    def write(primary: str, secondary: str | None = None, *, trailing_newline: bool = True) -> dict[str, str]:
        remember(primary, secondary or "")
        nl = "\n" if trailing_newline else ""
        data = {"primary": primary + nl}
        if secondary is not None:
            data["secondary"] = secondary + nl
        write_secret_dir(root, data)
        return {"primary_file": str(root / "primary"), "secondary_file": str(root / "secondary")}

    return write


@pytest.fixture
async def kube() -> AsyncIterator[RunningKubeApi]:
    """The Kubernetes API stand-in on 127.0.0.1, namespace KUBE_NS, a watch bookmark every 0.2 s."""
    server = await start_kube_api(namespace=KUBE_NS, bookmark_interval=0.2)
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    """Start real ProxyService instances on 127.0.0.1 port 0 from route dicts."""
    started: list[ProxyService] = []

    async def factory(*routes: dict[str, Any], **top: Any) -> ProxyService:
        doc: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "routes": list(routes),
        }
        doc.update(top)
        service = ProxyService(parse(doc, {}), registry=CollectorRegistry())
        await service.start()
        started.append(service)
        return service

    yield factory
    for service in started:
        await service.stop()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Serve an aiohttp app on 127.0.0.1:0; returns its base URL."""
    runners: list[web.AppRunner] = []

    async def factory(app: web.Application, **site_kw: Any) -> str:
        runner, url = await start_app(app, **site_kw)
        runners.append(runner)
        return url

    yield factory
    for runner in runners:
        await runner.cleanup()
