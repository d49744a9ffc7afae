"""The Kubernetes API client of the process, and the helpers that keep its blocking calls off the event loop.

The official `kubernetes` package is synchronous (urllib3), so every call runs in a worker thread: one-off calls
through `call()` (asyncio.to_thread), long-running watches in a `WorkerThread` of their own, which hands results
back to the loop with `post()` (call_soon_threadsafe) and can be interrupted by shutting its response down.

Where the client config comes from, in order: `kubernetes.kubeconfig`; the in-cluster service account (when
KUBERNETES_SERVICE_HOST is set and the token file exists: the token is re-read as kubelet rotates it); KUBECONFIG.
This module does not decide what to do with an error: `ApiError` carries a safe, stable reason and the HTTP status
(0 for a transport failure) and callers choose their backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

# The kubernetes package is untyped (pyproject.toml lets mypy take it as Any): this package's functions are its
# typed face.
import kubernetes.client as k8s
import kubernetes.config as k8s_config
import urllib3
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import InClusterConfigLoader
from kubernetes.watch.watch import iter_resp_lines

from proxy.config.settings import Kubernetes

T = TypeVar("T")

# Client-side timeouts: connecting, and one read (a watch sees a bookmark or an event well within it).
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 90.0


class KubeConfigError(Exception):
    """No usable Kubernetes API configuration; the message says which sources were tried."""


class ApiError(Exception):
    """A Kubernetes API call failed. `status` is the HTTP status, 0 when the server was not reached; `reason` is
    safe to log and show (never a response body)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def api_error(exc: BaseException, *, verb: str, what: str) -> ApiError:
    """Classify an exception from the client into an ApiError naming the verb and the object."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        if status == 403:
            return ApiError(403, f"forbidden: the service account may not {verb} {what} (RBAC)")
        if status == 401:
            return ApiError(401, f"unauthorized: the API server refused the service account token ({verb} {what})")
        if status == 404:
            return ApiError(404, f"{what} not found")
        return ApiError(status, f"{verb} {what}: HTTP {status} {_status_reason(exc)}".rstrip())
    if isinstance(exc, KubeConfigError):
        return ApiError(0, str(exc))
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return ApiError(0, f"{verb} {what}: API server unreachable ({type(exc).__name__})")
    return ApiError(0, f"{verb} {what}: unexpected {type(exc).__name__}")


def _status_reason(exc: Any) -> str:
    """The Status object's `reason` (e.g. InternalError), never its message, which may quote request data."""
    try:
        body = json.loads(exc.body)
    except (TypeError, ValueError):
        return ""
    reason = body.get("reason") if isinstance(body, dict) else None
    return str(reason) if isinstance(reason, str) and reason.isidentifier() else ""


def backoff_delay(attempt: int, *, initial: float, maximum: float, rng: Callable[[], float] = random.random) -> float:
    """Capped exponential backoff with full jitter; `attempt` counts from 1. Never below a tenth of `initial`."""
    ceiling = min(maximum, initial * 2.0 ** max(0, attempt - 1))
    return float(max(initial * 0.1, rng() * ceiling))


class KubeApi:
    """The process's one ApiClient, built on first use in a worker thread (loading the config reads files).

    Thread-safe: watches and event senders share it (urllib3's pool is thread-safe)."""

    def __init__(self, settings: Kubernetes) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._client: Any = None
        self._namespace: str | None = None

    def api_client(self) -> Any:
        """Build (once) and return the kubernetes.client.ApiClient. Raises KubeConfigError. Worker threads only."""
        with self._lock:
            if self._client is None:
                cfg, context_namespace = self._load()
                cfg.retries = False  # our callers own backoff
                self._client = k8s.ApiClient(cfg)
                self._namespace = self._resolve_namespace(context_namespace)
            return self._client

    def core(self) -> Any:
        return k8s.CoreV1Api(self.api_client())

    @property
    def namespace(self) -> str:
        """The namespace of the Secrets the config names (after `api_client()` has run)."""
        if self._namespace is None:
            self.api_client()
        assert self._namespace is not None
        return self._namespace

    def _load(self) -> tuple[Any, str | None]:
        s = self.settings
        cfg = k8s.Configuration()
        tried: list[str] = []
        if s.kubeconfig is not None:
            return self._load_kubeconfig(cfg, s.kubeconfig)
        token_file = os.path.join(s.service_account_dir, "token")
        if s.incluster_environ.get("KUBERNETES_SERVICE_HOST"):
            if os.path.exists(token_file):
                try:
                    InClusterConfigLoader(
                        token_filename=token_file,
                        cert_filename=os.path.join(s.service_account_dir, "ca.crt"),
                        environ=dict(s.incluster_environ),
                        try_refresh_token=True,
                    ).load_and_set(cfg)
                except ConfigException as exc:
                    raise KubeConfigError(f"in-cluster service account: {exc}") from exc
                return cfg, None
            tried.append(f"in-cluster (no token at {token_file})")
        else:
            tried.append("in-cluster (KUBERNETES_SERVICE_HOST is not set)")
        if s.kubeconfig_env:
            return self._load_kubeconfig(cfg, s.kubeconfig_env.split(os.pathsep)[0])
        tried.append("KUBECONFIG (not set)")
        raise KubeConfigError("no Kubernetes API configuration; tried " + ", ".join(tried))

    @staticmethod
    def _load_kubeconfig(cfg: Any, path: str) -> tuple[Any, str | None]:
        try:
            k8s_config.load_kube_config(config_file=path, client_configuration=cfg)
            _, active = k8s_config.list_kube_config_contexts(config_file=path)
        except (ConfigException, OSError, TypeError, ValueError) as exc:
            raise KubeConfigError(f"kubeconfig {path!r}: {type(exc).__name__}") from exc
        namespace = (active or {}).get("context", {}).get("namespace")
        return cfg, namespace if isinstance(namespace, str) and namespace else None

    def _resolve_namespace(self, context_namespace: str | None) -> str:
        s = self.settings
        if s.namespace:
            return s.namespace
        with contextlib.suppress(OSError, UnicodeDecodeError):
            with open(os.path.join(s.service_account_dir, "namespace"), encoding="utf-8") as fh:
                found = fh.read().strip()
            if found:
                return found
        return s.pod_namespace or context_namespace or "default"

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                with contextlib.suppress(Exception):  # closing a pool at shutdown must never raise
                    self._client.close()
                self._client = None


def list_secret(core: Any, namespace: str, name: str, *, request_timeout: Any) -> tuple[Any, str]:
    """LIST one Secret by name, as client-go's reflector starts: `fieldSelector=metadata.name=NAME` (which RBAC
    allows with `resourceNames`, and which answers an empty list for a missing Secret instead of a 404).
    Returns the Secret (a V1Secret, None when there is none) and the list's resourceVersion, to watch from."""
    listed = core.list_namespaced_secret(
        namespace, field_selector=f"metadata.name={name}", _request_timeout=request_timeout
    )
    return (listed.items[0] if listed.items else None), listed.metadata.resource_version


@contextlib.contextmanager
def watch_secret(
    worker: WorkerThread,
    core: Any,
    namespace: str,
    name: str,
    resource_version: str,
    *,
    timeout_seconds: int,
    request_timeout: Any,
) -> Iterator[Iterator[tuple[Any, dict[str, Any]]]]:
    """WATCH one Secret by name from `resource_version`, with bookmarks, for the thread of `worker` (which can
    interrupt the read). Yields the events as (type, object) until the server ends the stream or the worker
    stops; the connection is released when the block ends."""
    response = core.list_namespaced_secret(
        namespace,
        field_selector=f"metadata.name={name}",
        resource_version=resource_version,
        allow_watch_bookmarks=True,
        watch=True,
        timeout_seconds=timeout_seconds,
        _preload_content=False,
        _request_timeout=request_timeout,
    )
    worker.track(response)
    try:
        yield _watch_events(worker, response)
    finally:
        worker.track(None)
        response.release_conn()


def _watch_events(worker: WorkerThread, response: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    for line in iter_resp_lines(response):
        if worker.stopping:
            return
        doc = json.loads(line)
        yield doc.get("type"), doc.get("object") or {}


async def call(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one blocking client call in the default executor."""
    return await asyncio.to_thread(func, *args, **kwargs)


def post(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> bool:
    """Hand `callback(*args)` to the loop from a worker thread; False when the loop is already closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True


class WorkerThread:
    """A daemon thread running `target(worker)` until `stop()`; the target checks `stopping` and sleeps with
    `wait()`. `stop()` also shuts down the response it is blocked on (`track()`), so shutdown never waits for
    a watch's next line."""

    def __init__(self, target: Callable[[WorkerThread], None], *, name: str) -> None:
        self._target = target
        self._stop = threading.Event()
        self._response: Any = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when stopped meanwhile."""
        return self._stop.wait(max(0.0, seconds))

    def track(self, response: Any) -> None:
        """The urllib3 response the thread now reads (None when done with it)."""
        with self._lock:
            self._response = response
        if response is not None and self._stop.is_set():
            _shutdown(response)

    def _run(self) -> None:
        self._target(self)

    async def stop(self, *, join_seconds: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            response = self._response
        if response is not None:
            _shutdown(response)
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, join_seconds)


def _shutdown(response: Any) -> None:
    """Wake a thread blocked reading `response` (urllib3 2.3+: HTTPResponse.shutdown)."""
    with contextlib.suppress(Exception):
        shutdown = getattr(response, "shutdown", None)
        if shutdown is not None:
            shutdown()
        response.release_conn()
