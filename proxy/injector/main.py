"""`aml-auth-proxy injector`: the process. Checks its options (exit 2, one line per problem), loads the sidecar
template and the certificate, asks the API server's version (with --native auto), serves until SIGTERM or
SIGINT, then stops: readiness turns false, the listeners close, reviews in flight finish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.clock import SystemClock
from proxy.injector import CERT_POLL_SECONDS, cluster
from proxy.injector.mutate import SidecarTemplate, TemplateError
from proxy.injector.server import Certificate, InjectorMetrics, InjectorServer, Settings
from proxy.logs import event
from proxy.logs import setup as setup_logging

log = logging.getLogger("aml_auth_proxy.injector")

EXIT_USAGE = 2
NAMESPACE_PATTERN = "lower case letters, digits and '-', at most 63"
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Options:
    tls_cert: str
    tls_key: str
    sidecar_template: str
    listen: str = "0.0.0.0:8443"
    admin: str | None = None
    native: str = "auto"  # auto, true or false
    namespace: str | None = None  # default: POD_NAMESPACE
    failure_policy: str = "Fail"  # Fail or Ignore
    log_level: str = "info"
    cert_poll_seconds: float = CERT_POLL_SECONDS


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT with a port from 0 to 65535")
    host = host.removeprefix("[").removesuffix("]")
    if not host:
        raise ValueError(f"{text!r} has no host")
    return host, int(port)


@dataclass(frozen=True)
class Checked:
    template: SidecarTemplate
    certificate: Certificate
    listen: tuple[str, int]
    admin: tuple[str, int] | None
    namespace: str
    metrics: InjectorMetrics


def check(options: Options, environ: Mapping[str, str] = os.environ) -> tuple[Checked | None, list[str]]:
    """Everything that can be wrong before serving: one line per problem, naming the flag."""
    problems: list[str] = []
    template: SidecarTemplate | None = None
    try:
        template = SidecarTemplate.load(options.sidecar_template)
    except TemplateError as exc:
        problems.extend(f"--sidecar-template: {p}" for p in exc.problems)
    metrics = InjectorMetrics()
    certificate = Certificate(
        options.tls_cert, options.tls_key, metrics=metrics, poll_seconds=options.cert_poll_seconds
    )
    for flag, path in (("--tls-cert", options.tls_cert), ("--tls-key", options.tls_key)):
        if not os.path.isfile(path):
            problems.append(f"{flag}: {path} is not a readable file")
    if not any(p.startswith(("--tls-cert", "--tls-key")) for p in problems):
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(options.tls_cert, options.tls_key)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
            problems.append(f"--tls-cert/--tls-key: {options.tls_cert} and {options.tls_key} do not load ({reason})")
    listen = admin = None
    try:
        listen = parse_address(options.listen)
    except ValueError as exc:
        problems.append(f"--listen: {exc}")
    if options.admin is not None:
        try:
            admin = parse_address(options.admin)
        except ValueError as exc:
            problems.append(f"--admin: {exc}")
    namespace = options.namespace or environ.get("POD_NAMESPACE") or ""
    if not namespace:
        problems.append("--namespace: not given and POD_NAMESPACE is not set (the injector's own namespace)")
    elif not _NAMESPACE.match(namespace):
        problems.append(f"--namespace: {namespace!r} is not a namespace name ({NAMESPACE_PATTERN})")
    if options.cert_poll_seconds <= 0:
        problems.append(f"--cert-poll-seconds: {options.cert_poll_seconds:g} must be above 0")
    if problems or template is None or listen is None:
        return None, problems
    return Checked(template, certificate, listen, admin, namespace, metrics), []


async def serve(options: Options, checked: Checked) -> int:
    api = cluster.kube_api()
    metrics = checked.metrics
    events = cluster.recorder(
        api, clock=SystemClock(), count=lambda reason, outcome: metrics.events.labels(outcome).inc()
    )
    deny_invalid = options.failure_policy == "Fail"
    native = None if options.native == "auto" else options.native == "true"
    settings = Settings(checked.template, checked.namespace, deny_invalid, native)
    server = InjectorServer(
        settings,
        checked.certificate,
        metrics=metrics,
        on_decision=lambda decision: cluster.report(events, decision, deny_invalid=deny_invalid),
    )
    checked.certificate.load()  # checked already; now it is logged and counted
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start(*checked.listen, admin=checked.admin)
    except OSError as exc:
        event(log, logging.ERROR, "start_failed", reason=str(exc))
        await server.stop()
        return 1
    tasks = [
        asyncio.create_task(checked.certificate.watch(), name="certificate"),
        asyncio.create_task(events.run(), name="kubernetes-events"),
    ]
    if native is None:

        async def decide() -> None:
            settings.native = await cluster.ask_native(api)

        tasks.append(asyncio.create_task(decide(), name="kubernetes-version"))
    else:
        event(log, logging.INFO, "sidecar_mode", sidecar="native" if native else "plain", source="--native")
    await stop.wait()
    event(log, logging.INFO, "shutting_down")
    await server.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.to_thread(api.close)
    event(log, logging.INFO, "stopped")
    return 0


def run(options: Options) -> int:
    checked, problems = check(options)
    if checked is None:
        for line in problems:
            print(f"injector error: {line}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(options.log_level)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    code = asyncio.run(serve(options, checked))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code
