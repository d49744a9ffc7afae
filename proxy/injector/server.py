"""The injector's HTTPS server (aiohttp: the injector is a process of its own, off the proxy's request path).

- `POST /mutate`: an AdmissionReview in, an AdmissionReview out (mutate.py decides). A body over MAX_BODY_BYTES
  gets 413, one not read within READ_TIMEOUT_SECONDS 408, one that is not an AdmissionReview 400; each as JSON
  `{"error": ...}`.
- `GET /healthz` (the loop runs), `GET /readyz` (the template and the certificate are loaded and the native/plain
  choice is made; 503 with what is missing otherwise), `GET /metrics` (reviews by outcome, a latency histogram,
  the certificate's expiry and reloads). The same three on the optional plain-HTTP admin listener.

The certificate is polled (path, inode, size and mtime of both files, so kubelet's `..data` symlink swap is
seen) and, when it changed and loads, put in a new SSLContext that the listening context hands each new
connection (its SNI callback, which OpenSSL calls on every handshake, with or without a server name);
connections already open keep theirs. A certificate that does not load keeps the previous one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from proxy.injector import CERT_POLL_SECONDS
from proxy.injector.mutate import OUTCOMES, BadReview, Decision, SidecarTemplate, review
from proxy.logs import event

log = logging.getLogger("aml_auth_proxy.injector")

disable_created_metrics()  # type: ignore[no-untyped-call]  # as the proxy: no `_created` series

MAX_BODY_BYTES: Final = 1024 * 1024  # a pod spec is a few KiB; the API server caps an object at 1.5 MiB
READ_TIMEOUT_SECONDS: Final = 10.0  # the API server's own timeout is timeoutSeconds (at most 30)
LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
NS: Final = "aml_auth_proxy_injector"


class InjectorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.reviews = Counter(f"{NS}_reviews", "AdmissionReviews answered, by outcome.", ("outcome",), registry=r)
        self.duration = Histogram(
            f"{NS}_review_duration_seconds",
            "Time from a review's body read to its answer.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cert_expiry = Gauge(
            f"{NS}_certificate_expiry_timestamp_seconds",
            "notAfter of the serving certificate in use (Unix time).",
            registry=r,
        )
        self.cert_reloads = Counter(
            f"{NS}_certificate_reloads", "Certificate (re)loads, by outcome.", ("outcome",), registry=r
        )
        self.events = Counter(
            f"{NS}_kubernetes_events", "Events about refused pods, by outcome.", ("outcome",), registry=r
        )
        for outcome in OUTCOMES:
            self.reviews.labels(outcome)
        for outcome in ("success", "error"):
            self.cert_reloads.labels(outcome)


# -- the certificate ---------------------------------------------------------------------------------------------


def _stamp(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)  # follows symlinks: kubelet's ..data swap changes the inode
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Certificate:
    """The serving certificate, reloaded when its files change. `context` is what the listener uses."""

    def __init__(
        self,
        cert_file: str,
        key_file: str,
        *,
        metrics: InjectorMetrics,
        poll_seconds: float = CERT_POLL_SECONDS,
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.poll_seconds = poll_seconds
        self._metrics = metrics
        self._stamps: tuple[Any, ...] | None = None
        self._current: ssl.SSLContext | None = None
        self._last_error = ""
        self.not_after: float | None = None
        self.context = self._new_context()
        self.context.sni_callback = self._pick

    @property
    def loaded(self) -> bool:
        return self._current is not None

    @staticmethod
    def _new_context() -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def _pick(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        current = self._current
        if current is not None and connection.context is not current:
            connection.context = current

    def load(self) -> bool:
        """Load the files when they changed since the last load; True when a new certificate is in use."""
        try:
            stamps = (_stamp(self.cert_file), _stamp(self.key_file))
        except OSError as exc:
            self._failed(f"{exc.filename}: {exc.strerror or type(exc).__name__}")
            return False
        if stamps == self._stamps:
            return False
        context = self._new_context()
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
            with open(self.cert_file, "rb") as fh:
                not_after = x509.load_pem_x509_certificate(fh.read()).not_valid_after_utc.timestamp()
        except (OSError, ssl.SSLError, ValueError) as exc:
            # Half-written (a certificate that does not match its key yet): try again at the next poll.
            self._failed(f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}")
            return False
        first = self._current is None
        self._stamps = stamps
        self._current = context
        if first:  # the listening context serves it too, for a client whose handshake skips the callback
            self.context.load_cert_chain(self.cert_file, self.key_file)
        self.not_after = not_after
        self._last_error = ""
        self._metrics.cert_reloads.labels("success").inc()
        self._metrics.cert_expiry.set(not_after)
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(not_after))
        event(log, logging.INFO, "certificate_loaded" if first else "certificate_reloaded", not_after=expires)
        return True

    def _failed(self, reason: str) -> None:
        self._metrics.cert_reloads.labels("error").inc()
        if reason != self._last_error:
            self._last_error = reason
            event(log, logging.WARNING, "certificate_load_failed", reason=reason, file=self.cert_file)

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            self.load()


# -- the server --------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    template: SidecarTemplate
    own_namespace: str
    deny_invalid: bool  # failurePolicy Fail: invalid annotations refuse the pod
    native: bool | None  # None until the API server's version is known


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")), status=status, content_type="application/json")


class InjectorServer:
    """The HTTPS listener (and an optional plain-HTTP admin listener). `start()`, then `stop()`."""

    def __init__(
        self,
        settings: Settings,
        certificate: Certificate,
        *,
        metrics: InjectorMetrics,
        on_decision: Callable[[Decision], None] = lambda decision: None,
        read_timeout_seconds: float = READ_TIMEOUT_SECONDS,
    ) -> None:
        self.settings = settings
        self.read_timeout_seconds = read_timeout_seconds
        self.certificate = certificate
        self.metrics = metrics
        self._on_decision = on_decision
        self.stopping = False
        self._runners: list[web.AppRunner] = []
        self.port = 0
        self.admin_port = 0

    # -- handlers --------------------------------------------------------------------------------------------------

    def not_ready(self) -> dict[str, str]:
        missing = {}
        if not self.certificate.loaded:
            missing["certificate"] = "not loaded"
        if self.settings.native is None:
            missing["native"] = "the API server's version is not known yet"
        if self.stopping:
            missing["shutdown"] = "stopping"
        return missing

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        missing = self.not_ready()
        if missing:
            return _json({"ready": False, "not_ready": missing}, status=503)
        mode = "native" if self.settings.native else "plain"
        return _json({"ready": True, "sidecar": mode})

    async def metrics_page(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def mutate(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return self._error(413, f"the body is over {MAX_BODY_BYTES} bytes")
        try:
            body = await asyncio.wait_for(request.read(), self.read_timeout_seconds)
        except web.HTTPRequestEntityTooLarge:
            return self._error(413, f"the body is over {MAX_BODY_BYTES} bytes")
        except TimeoutError:
            return self._error(408, f"the body was not read within {self.read_timeout_seconds:g} s")
        started = time.perf_counter()
        s = self.settings
        if s.native is None:
            return self._error(503, "not ready: the API server's version is not known yet")
        try:
            decision = review(
                json.loads(body),
                template=s.template,
                native=s.native,
                own_namespace=s.own_namespace,
                deny_invalid=s.deny_invalid,
            )
        except (BadReview, ValueError, UnicodeDecodeError) as exc:
            return self._error(400, f"not an admission.k8s.io/v1 AdmissionReview: {exc}")
        except Exception as exc:  # a bug: answer, count and log it, never take the server down
            log.exception("review_failed", extra={"event": "review_failed", "fields": {"error": type(exc).__name__}})
            return self._error(500, "the injector failed on this review (a bug; see its log)")
        answer = _json(decision.review)
        seconds = time.perf_counter() - started
        self.metrics.reviews.labels(decision.outcome).inc()
        self.metrics.duration.observe(seconds)
        level = logging.WARNING if decision.outcome == "denied" else logging.INFO
        fields: dict[str, Any] = {"outcome": decision.outcome, "reason": decision.reason}
        fields.update(uid=decision.review["response"]["uid"], namespace=decision.namespace, pod=decision.pod)
        if decision.subject is not None:
            fields["owner"] = f"{decision.subject.kind}/{decision.subject.name}"
        if decision.mode:
            fields["sidecar"] = decision.mode
        if decision.problems:
            fields["problems"] = list(decision.problems)
        fields["duration_ms"] = round(seconds * 1000, 3)
        event(log, level, "review", **fields)
        self._on_decision(decision)
        return answer

    def _error(self, status: int, message: str) -> web.Response:
        self.metrics.reviews.labels("error").inc()
        event(log, logging.WARNING, "review_refused", status=status, error=message)
        return _json({"error": message}, status=status)

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def _app(self, *, webhook: bool) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        if webhook:
            app.router.add_post("/mutate", self.mutate)
        return app

    async def _serve(self, app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None) -> int:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=512, reuse_address=True)
        await site.start()
        address = runner.addresses[-1]
        return int(address[1])

    async def start(self, host: str, port: int, *, admin: tuple[str, int] | None = None) -> None:
        self.port = await self._serve(self._app(webhook=True), host, port, self.certificate.context)
        if admin is not None:
            self.admin_port = await self._serve(self._app(webhook=False), admin[0], admin[1], None)
        event(log, logging.INFO, "started", listen=f"{host}:{self.port}", admin=self.admin_port or None)

    async def stop(self) -> None:
        self.stopping = True
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
