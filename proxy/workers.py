"""Several proxy processes on one port (`workers`): one primary, N-1 workers.

The primary runs the whole service: the admin port, every credential provider and refresher, and its share of the
proxy port. It binds the proxy port with SO_REUSEPORT, then starts each worker (`python -m proxy worker`, the same
config and environment) with one end of a socketpair; the worker binds the same port, so the kernel spreads the
callers' connections over all processes.

The channel carries newline-delimited JSON, both ways:

- primary -> worker: `cred` (a route's credential and readiness, pushed when they change) and `reply` (the answer
  to an `unauthorized`).
- worker -> primary: `listening`, `unauthorized` (a 401: which credential was refused), `metrics` (a snapshot of
  the request-path metrics, every second and at exit).

Workers never fetch a credential: the control plane sees one fetch per refresh per route, whatever N is. Secrets
cross only the anonymous socketpair and are registered with the log redactor on arrival.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from proxy.config.settings import KeyAuth, Route
from proxy.credentials.base import Credential, CredentialProvider
from proxy.credentials.remote import RemoteCredentialProvider
from proxy.logs import event
from proxy.metrics import NS

if TYPE_CHECKING:
    from proxy.forwarding import RouteRuntime


class PrimaryService(Protocol):
    """What the worker pool reads of the primary's ProxyService (proxy/app.py)."""

    @property
    def routes(self) -> Sequence[RouteRuntime]: ...

    @property
    def proxy_port(self) -> int: ...


log = logging.getLogger("aml_auth_proxy.workers")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PUSH_INTERVAL = 0.05  # how often the primary checks each route's credential and readiness for a change
METRICS_INTERVAL = 1.0  # how often a worker sends its metrics
_LINE_LIMIT = 16 << 20  # a metrics snapshot is one line
_BACKOFF_INITIAL = 0.5
_BACKOFF_MAX = 10.0
_STABLE_SECONDS = 10.0  # a worker up this long resets the restart backoff

# The request path's families: each process counts its own; the primary's /metrics shows their sums. Token,
# refresh, key-file and Kubernetes families are the primary's alone (workers never fetch).
MERGED_FAMILIES = frozenset(
    f"{NS}_{name}"
    for name in (
        "requests",
        "request_duration_seconds",
        "time_to_first_byte_seconds",
        "requests_in_flight",
        "upstream_errors",
        "upstream_auth_failures",
        "auth_retries",
        "client_disconnects",
        "rejected_requests",
    )
)
_GAUGES = frozenset({f"{NS}_requests_in_flight"})  # a gone worker's gauges drop; its counters stay counted


# -- how many -------------------------------------------------------------------------------------------------


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> int | None:
    """CPUs the cgroup quota allows, rounded up; None when there is no quota (or no cgroup files)."""
    try:
        fields = (root / "cpu.max").read_text().split()  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
    except OSError:
        fields = []
    if fields:
        if fields[0] == "max":
            return None
        try:
            quota, period = int(fields[0]), int(fields[1])
        except (ValueError, IndexError):
            return None
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    for base in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu", root):  # cgroup v1
        try:
            quota = int((base / "cpu.cfs_quota_us").read_text().strip())
            period = int((base / "cpu.cfs_period_us").read_text().strip())
        except (OSError, ValueError):
            continue
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    return None


def auto_workers(root: Path = CGROUP_ROOT, affinity: int | None = None) -> int:
    """The CPUs this container may use: the cgroup quota, capped by the CPUs the process may run on; at least 1."""
    cpus = affinity if affinity is not None else len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root)
    return max(1, min(cpus, limit) if limit is not None else cpus)


def resolve_workers(configured: int) -> int:
    return configured if configured > 0 else auto_workers()


# -- the channel ----------------------------------------------------------------------------------------------


def _send(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
    if not writer.is_closing():
        writer.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")


def _cred_json(cred: Credential | None) -> dict[str, str] | None:
    return None if cred is None else {"header": cred.header, "value": cred.value, "label": cred.label}


def snapshot(registry: CollectorRegistry) -> list[list[Any]]:
    """The request-path samples of a worker's registry: [family, sample name, labels, value] each."""
    out: list[list[Any]] = []
    for family in registry.collect():
        if family.name in MERGED_FAMILIES:
            out.extend([family.name, s.name, s.labels, s.value] for s in family.samples)
    return out


# -- the primary ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _RouteState:
    """What the primary last pushed for one route."""

    gen: int = 0
    key: tuple[int, bool, str] | None = None
    recent: dict[int, Credential] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    listening: bool = False
    samples: list[list[Any]] = dataclasses.field(default_factory=list)
    reader_task: asyncio.Task[None] | None = None


class WorkerPool:
    """The primary's side: starts, feeds, watches, restarts and stops the worker processes."""

    def __init__(self, service: PrimaryService, *, count: int, config_path: str | None) -> None:
        self.service = service
        self.count = count
        self.config_path = config_path
        self.workers = [_Worker(i + 1) for i in range(count)]
        self._routes = {rt.name: rt for rt in service.routes}
        self._state = {name: _RouteState() for name in self._routes}
        self._retired: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._replies: set[asyncio.Task[None]] = set()

    # -- status for /readyz and /metrics --------------------------------------------------------------------------

    def status(self) -> dict[str, int]:
        running = sum(1 for w in self.workers if w.listening and w.process is not None and w.process.returncode is None)
        return {"expected": self.count + 1, "running": running + 1}

    def samples(self) -> dict[tuple[str, str, tuple[tuple[str, str], ...]], float]:
        """The workers' request-path samples, summed: retired workers' counters plus every live snapshot."""
        total = dict(self._retired)
        for w in self.workers:
            for family, name, labels, value in w.samples:
                key = (family, name, tuple(sorted(labels.items())))
                total[key] = total.get(key, 0.0) + value
        return total

    def collector(self, registry: CollectorRegistry) -> MergedView:
        return MergedView(registry, self)

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._check()
        for w in self.workers:
            await self._spawn(w)
        self._tasks.append(asyncio.create_task(self._push_loop(), name="workers:push"))
        for w in self.workers:
            self._tasks.append(asyncio.create_task(self._supervise(w), name=f"workers:{w.index}"))
        event(log, logging.INFO, "workers_started", workers=self.count + 1, port=self.service.proxy_port)

    async def stop(self, grace: float) -> None:
        """Forward SIGTERM, wait for every worker to drain (grace + a margin), kill the ones that do not."""
        self._stopping = True
        for w in self.workers:
            if w.process is not None and w.process.returncode is None:
                w.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 5.0
        for w in self.workers:
            if w.process is None:
                continue
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    await w.process.wait()
            except TimeoutError:
                event(log, logging.WARNING, "worker_killed", worker=w.index, pid=w.process.pid)
                w.process.kill()
                await w.process.wait()
            if w.reader_task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await w.reader_task
        for task in self._tasks:
            task.cancel()
        for task in [*self._tasks, *self._replies]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _spawn(self, w: _Worker) -> None:
        mine, theirs = socket.socketpair()
        argv = [sys.executable, "-m", "proxy", "worker", "--fd", str(theirs.fileno())]
        argv += ["--port", str(self.service.proxy_port), "--index", str(w.index)]
        if self.config_path is not None:
            argv += ["--config", self.config_path]
        try:
            w.process = await asyncio.create_subprocess_exec(*argv, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=mine, limit=_LINE_LIMIT)
        w.writer, w.listening, w.samples = writer, False, []
        for name in self._routes:
            self._push(w, name)
        w.reader_task = asyncio.create_task(self._read(w, reader), name=f"workers:{w.index}:read")

    async def _supervise(self, w: _Worker) -> None:
        """Restart a worker that exits while the primary runs, with backoff; log once per change of state."""
        delay = _BACKOFF_INITIAL
        failing = False
        while True:
            assert w.process is not None
            started = time.monotonic()
            code = await w.process.wait()
            if w.reader_task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await w.reader_task
            if self._stopping:
                return
            if time.monotonic() - started >= _STABLE_SECONDS:
                delay, failing = _BACKOFF_INITIAL, False
            if not failing:
                event(log, logging.ERROR, "worker_exited", worker=w.index, pid=w.process.pid, code=code)
                failing = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)
            if self._stopping:
                return
            await self._spawn(w)

    async def _read(self, w: _Worker, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                msg = json.loads(line)
                kind = msg.get("t")
                if kind == "metrics":
                    w.samples = msg["samples"]
                elif kind == "unauthorized":
                    task = asyncio.create_task(self._unauthorized(w, msg))
                    self._replies.add(task)
                    task.add_done_callback(self._replies.discard)
                elif kind == "listening":
                    w.listening = True
                    assert w.process is not None
                    event(log, logging.INFO, "worker_running", worker=w.index, pid=w.process.pid)
        except (ConnectionError, ValueError) as exc:
            event(log, logging.WARNING, "worker_channel_failed", worker=w.index, error_type=type(exc).__name__)
        finally:
            w.listening = False
            for family, name, labels, value in w.samples:  # its counters stay in the totals
                if family not in _GAUGES:
                    key = (family, name, tuple(sorted(labels.items())))
                    self._retired[key] = self._retired.get(key, 0.0) + value
            w.samples = []
            if w.writer is not None:
                w.writer.close()
                w.writer = None

    async def _unauthorized(self, w: _Worker, msg: dict[str, Any]) -> None:
        name = msg["route"]
        rt = self._routes.get(name)
        state = self._state.get(name)
        reply: dict[str, Any] = {"t": "reply", "id": msg["id"], "cred": None, "gen": 0}
        if rt is not None and state is not None:
            sent = state.recent.get(int(msg["gen"]))
            if sent is None or sent.label != msg["label"]:
                # Older than anything pushed: the provider's current credential differs from it by identity.
                sent = Credential(header="", value="", label=str(msg["label"]))
            other = await rt.provider.unauthorized(sent)
            self.push_changes()
            if other is not None:
                gen = next((g for g, c in state.recent.items() if c is other), None)
                if gen is None:
                    gen = self._remember(state, other)
                reply.update(cred=_cred_json(other), gen=gen)
        if w.writer is not None:
            _send(w.writer, reply)

    # -- pushing credentials ------------------------------------------------------------------------------------

    @staticmethod
    def _remember(state: _RouteState, cred: Credential) -> int:
        state.gen += 1
        state.recent[state.gen] = cred
        for old in [g for g in state.recent if g <= state.gen - 8]:
            del state.recent[old]
        return state.gen

    def _message(self, name: str) -> dict[str, Any]:
        provider: CredentialProvider = self._routes[name].provider
        state = self._state[name]
        cred = provider.current
        ready, reason = provider.readiness()
        return {
            "t": "cred",
            "route": name,
            "gen": state.gen,
            "cred": _cred_json(cred),
            "ready": ready,
            "reason": reason,
            "retry_after": provider.retry_after(),
        }

    def _push(self, w: _Worker, name: str) -> None:
        if w.writer is not None:
            _send(w.writer, self._message(name))

    def push_changes(self) -> None:
        """Push every route whose credential (by identity) or readiness changed since the last push."""
        for name, rt in self._routes.items():
            cred = rt.provider.current
            ready, reason = rt.provider.readiness()
            key = (id(cred), ready, reason)
            state = self._state[name]
            if key == state.key and (cred is None or state.recent.get(state.gen) is cred):
                continue
            state.key = key
            if cred is not None and state.recent.get(state.gen) is not cred:
                self._remember(state, cred)
            elif cred is None:
                state.gen += 1
            for w in self.workers:
                self._push(w, name)

    async def _push_loop(self) -> None:
        while True:
            self.push_changes()
            await asyncio.sleep(PUSH_INTERVAL)

    def _check(self) -> None:
        self.push_changes()


class MergedView(Collector):
    """The primary's registry with the workers' request-path samples added in: what /metrics exposes.

    Each merged family keeps its name, help and type; a worker sample with the same name and labels as one of the
    primary's is added to it, one the primary lacks (a status code only a worker saw) is appended. No family is
    exposed twice."""

    def __init__(self, registry: CollectorRegistry, pool: WorkerPool) -> None:
        self._registry = registry
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        extra: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for (family_name, name, labels), value in self._pool.samples().items():
            extra.setdefault(family_name, {})[(name, labels)] = value
        for family in self._registry.collect():
            add = extra.get(family.name)
            if not add:
                yield family
                continue
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            seen = set()
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                seen.add(key)
                merged.samples.append(s._replace(value=s.value + add.get(key, 0.0)))
            merged.samples.extend(Sample(n, dict(lbl), v) for (n, lbl), v in add.items() if (n, lbl) not in seen)
            yield merged


# -- a worker -------------------------------------------------------------------------------------------------


class WorkerChannel:
    """The worker's side of the channel."""

    @classmethod
    async def open(cls, fd: int, routes: Iterable[Route]) -> WorkerChannel:
        """The channel on the socket the primary passed as `fd`."""
        sock = socket.socket(fileno=fd)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=_LINE_LIMIT)
        return cls(reader, writer, routes)

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, routes: Iterable[Route]) -> None:
        self.reader = reader
        self.writer = writer
        self.timeouts = {
            r.name: (5.0 if isinstance(r.auth, KeyAuth) else r.auth.refresh.timeout_seconds + 5.0) for r in routes
        }
        self.providers = {name: RemoteCredentialProvider(name, self.ask) for name in self.timeouts}
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.closed = asyncio.Event()

    async def ask(self, route: str, label: str, gen: int) -> dict[str, Any] | None:
        """Ask the primary what to retry with after a 401; None on timeout or a closed channel."""
        if self.closed.is_set():
            return None
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            _send(self.writer, {"t": "unauthorized", "id": rid, "route": route, "label": label, "gen": gen})
            async with asyncio.timeout(self.timeouts.get(route, 5.0)):
                return await fut
        except (TimeoutError, ConnectionError):
            event(log, logging.WARNING, "worker_unauthorized_unanswered", route=route)
            return None
        finally:
            self._waiting.pop(rid, None)

    async def read(self) -> None:
        try:
            while line := await self.reader.readline():
                msg = json.loads(line)
                kind = msg.get("t")
                if kind == "cred":
                    provider = self.providers.get(msg["route"])
                    if provider is not None:
                        provider.install(msg)
                elif kind == "reply":
                    fut = self._waiting.get(msg["id"])
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
        except (ConnectionError, ValueError):
            pass
        finally:
            self.closed.set()
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("the primary process is gone"))

    def send(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            _send(self.writer, msg)
