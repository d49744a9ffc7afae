"""Watch one Kubernetes Secret by name, in a worker thread, and deliver each state of it on the event loop.

The loop, after client-go's reflector: LIST with `fieldSelector=metadata.name=NAME` (which RBAC allows with
`resourceNames`, and which answers an empty list for a missing Secret instead of a 404), then WATCH from the
list's resourceVersion with bookmarks, so a rotation arrives as soon as the API server has it.

- The watch ends normally (its timeoutSeconds, a bookmark-less close): watch again from the last resourceVersion.
- 410 Gone / Expired (an ERROR event or an HTTP 410): the history is compacted; list again (`expired`).
- The server is unreachable, restarts, or answers 5xx: list again after a capped, full-jitter backoff that
  doubles from `kubernetes.backoff_initial_seconds` (`unreachable`, `error`); the last good value stays in use.
- 401/403 (RBAC): the state names the Secret and the verb refused; retried at `kubernetes.backoff_max_seconds`.

Values are never logged; the data reaches the loop as bytes in a `SecretState` and is validated by its user.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Callable
from typing import Any

from proxy.credentials.secret_keys import SecretState
from proxy.events import NO_EVENTS, SECRET_UNAVAILABLE, EventSink
from proxy.kube.client import (
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    ApiError,
    KubeApi,
    WorkerThread,
    api_error,
    backoff_delay,
    list_secret,
    watch_secret,
)
from proxy.kube.client import post as post_to_loop
from proxy.logs import event

log = logging.getLogger("aml_auth_proxy.kube.secrets")

WATCH_SECONDS = 300  # server-side timeoutSeconds of one watch request (client-go picks 5-10 minutes)
RESTART_REASONS = ("closed", "expired", "unreachable", "forbidden", "error")


class _Expired(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class SecretWatch:
    """One Secret, listed then watched in its own thread; a `SecretFeed` for its subscribers."""

    def __init__(
        self,
        *,
        api: KubeApi,
        name: str,
        route: str,
        on_restart: Callable[[str], None] = lambda reason: None,
        events: EventSink = NO_EVENTS,
    ) -> None:
        self.name = name
        self._api = api
        self._route = route
        self._on_restart = on_restart
        self._events = events
        self._state: SecretState | None = None
        self._callbacks: list[Callable[[SecretState], None]] = []
        self._first = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: WorkerThread | None = None
        self._last_error: str | None = None  # thread-side: log and emit once per state

    # -- SecretFeed ----------------------------------------------------------------------------------------------

    @property
    def state(self) -> SecretState | None:
        return self._state

    def subscribe(self, callback: Callable[[SecretState], None]) -> None:
        self._callbacks.append(callback)

    async def first_state(self) -> None:
        await self._first.wait()

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = WorkerThread(self._run, name=f"secret-watch:{self._route}:{self.name}")
        self._worker.start()

    async def stop(self) -> None:
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None

    def _deliver(self, state: SecretState) -> None:
        """On the loop: publish a state to every subscriber."""
        self._state = state
        self._first.set()
        for callback in self._callbacks:
            callback(state)

    def _post(self, state: SecretState) -> None:
        assert self._loop is not None
        post_to_loop(self._loop, self._deliver, state)

    # -- the thread ----------------------------------------------------------------------------------------------

    def _run(self, worker: WorkerThread) -> None:
        s = self._api.settings
        attempt = 0
        rv: str | None = None
        while not worker.stopping:
            verb = "list"
            try:
                core = self._api.core()
                namespace = self._api.namespace
                if rv is None:
                    secret, rv = list_secret(
                        core, namespace, self.name, request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)
                    )
                    self._publish(_state_of(secret.data if secret is not None else None, namespace, self.name))
                    attempt = 0
                verb = "watch"
                rv = self._watch(worker, core, namespace, rv)
                self._on_restart("closed")
            except _Expired:
                rv = None
                self._on_restart("expired")
            except Exception as exc:  # every failure of the client: classified, reported, retried
                if worker.stopping:
                    break
                rv = None
                err = _as_expired(exc) or api_error(exc, verb=verb, what=f"Secret {self._ns()}/{self.name}")
                if isinstance(err, _Expired):
                    self._on_restart("expired")
                    continue
                attempt += 1
                self._on_restart(_restart_reason(err))
                self._failed(err)
                if err.status in (401, 403):
                    delay = s.backoff_max_seconds
                else:
                    delay = backoff_delay(attempt, initial=s.backoff_initial_seconds, maximum=s.backoff_max_seconds)
                worker.wait(delay)

    def _ns(self) -> str:
        try:
            return self._api.namespace
        except Exception:  # no client config yet: the reason says so already
            return "?"

    def _watch(self, worker: WorkerThread, core: Any, namespace: str, rv: str) -> str:
        """Stream watch events from `rv`; return the last resourceVersion seen when the stream ends normally."""
        timeouts = (CONNECT_TIMEOUT, READ_TIMEOUT)
        with watch_secret(
            worker, core, namespace, self.name, rv, timeout_seconds=WATCH_SECONDS, request_timeout=timeouts
        ) as events:
            for kind, obj in events:
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Expired()
                    raise ApiError(int(obj.get("code") or 0), f"watch Secret {namespace}/{self.name}: ERROR event")
                rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                if kind in ("ADDED", "MODIFIED"):
                    self._publish(_state_of(obj.get("data") or {}, namespace, self.name))
                elif kind == "DELETED":
                    self._publish(_state_of(None, namespace, self.name))
        return rv

    def _publish(self, state: SecretState) -> None:
        if state.error is None and self._last_error is not None:
            event(log, logging.INFO, "secret_watch_recovered", route=self._route, secret=self.name)
            self._last_error = None
        elif state.error is not None:
            self._report(state.error)
        self._post(state)

    def _failed(self, err: ApiError) -> None:
        """A failed call: unready only for reasons a retry alone will not fix (RBAC, no config); else keep."""
        self._report(err.reason)
        if err.status in (401, 403) or self._state is None or self._state.data is None:
            self._post(SecretState(data=None, error=err.reason))

    def _report(self, reason: str) -> None:
        if reason == self._last_error:
            return
        self._last_error = reason
        event(log, logging.ERROR, "secret_unavailable", route=self._route, secret=self.name, reason=reason)
        self._events.emit(warning=True, reason=SECRET_UNAVAILABLE, message=f"route {self._route}: {reason}")


def _state_of(data: Any, namespace: str, name: str) -> SecretState:
    """A SecretState from a Secret's `data` (base64 values; from the typed list or a raw watch object)."""
    if data is None:
        return SecretState(error=f"Secret {namespace}/{name} not found")
    decoded: dict[str, bytes] = {}
    for key, value in data.items():
        try:
            decoded[key] = base64.b64decode(value or "", validate=True)
        except (binascii.Error, ValueError):
            continue  # the key is then reported absent; its value is never shown
    return SecretState(data=decoded)


def _as_expired(exc: BaseException) -> _Expired | None:
    return _Expired() if getattr(exc, "status", None) == 410 else None


def _restart_reason(err: ApiError) -> str:
    if err.status in (401, 403):
        return "forbidden"
    if err.status == 0:
        return "unreachable"
    return "error"
