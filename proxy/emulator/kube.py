"""A Kubernetes API server stand-in that the official `kubernetes` Python client uses unmodified: core/v1 Secrets,
Events and Pods (read only), events.k8s.io/v1 Events and coordination.k8s.io/v1 Leases, with get, list, create,
replace, merge patch, delete and watch, bearer tokens, RBAC-like rules and the real Status error bodies.

It speaks the wire protocol of https://kubernetes.io/docs/reference/using-api/api-concepts/:
- "Efficient detection of changes": `?watch=1` on a collection streams newline-delimited JSON
  `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`; `timeoutSeconds` ends the stream cleanly.
  A resourceVersion older than the kept history gets HTTP 200 and one ERROR event whose object is a Status with
  code 410, reason Expired (what the watch cache sends), then the stream ends.
- "Watch bookmarks": with `allowWatchBookmarks=true`, BOOKMARK events every `bookmark_interval` seconds (and on
  demand) whose object is the kind with only metadata.resourceVersion set, the current RV.
- Selectors on a watch follow the watch cache: an object that starts matching arrives as ADDED, one that stops
  matching as DELETED.

The state lives in `kube_store.KubeStore`; this module owns HTTP, the admin API for tests under `/_emulator/` and
the client config files (kubeconfig, in-cluster token + ca.crt + namespace). Not here: protobuf, server-side
apply, JSON patch, pagination (`limit` is ignored: every list is complete), deletecollection, subresources.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from aiohttp import web
from yarl import URL

from proxy.emulator.kube_store import (
    BOOKMARK,
    EMULATOR_USER,
    RESOURCES,
    SUPERUSER,
    Change,
    KubeError,
    KubeStore,
    Obj,
    Resource,
    Rule,
    Selector,
    bad_request,
    find_resource,
    parse_resource_version,
    resource_by_name,
    unauthorized,
)
from proxy.emulator.runner import _serve_app
from proxy.emulator.secretdir import write_private
from proxy.emulator.tls import LocalTls, make_local_tls

log = logging.getLogger(__name__)

JSON = "application/json"
MERGE_PATCH_TYPES = frozenset({"application/merge-patch+json", "application/strategic-merge-patch+json"})
DEFAULT_BOOKMARK_INTERVAL = 60.0  # the real watch cache sends one about every minute
DEFAULT_NAMESPACE = "default"
SERVER_VERSION: Obj = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-aml-auth-proxy-emulator",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def server_version(version: str) -> Obj:
    """The /version answer of a server at `version` ("1.29.4"), in SERVER_VERSION's shape."""
    major, minor = version.split(".")[:2]
    git = f"v{version}-aml-auth-proxy-emulator"
    return {**SERVER_VERSION, "major": major, "minor": minor, "gitVersion": git}


_METHOD_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_RESTART = "restart"


@dataclass(frozen=True, kw_only=True)
class KubeOptions:
    bookmark_interval: float = DEFAULT_BOOKMARK_INTERVAL
    version: Obj | None = None  # the /version answer (default SERVER_VERSION)
    # the admin restart call; set by the running server, absent for a bare app
    restart: Callable[[float, bool], Awaitable[None]] | None = None


_STORE = web.AppKey("kube_store", KubeStore)
_OPTIONS = web.AppKey("kube_options", KubeOptions)


def _json(body: Obj, *, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, content_type=JSON)


def _is_true(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true")


# -- discovery ---------------------------------------------------------------------------------------------------


def _resource_list(group: str, version: str) -> Obj:
    resources = [
        {
            "name": r.plural,
            "singularName": r.kind.lower(),
            "namespaced": True,
            "kind": r.kind,
            "verbs": sorted(r.verbs),
        }
        for r in RESOURCES
        if (r.group, r.version) == (group, version)
    ]
    group_version = f"{group}/{version}" if group else version
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}


def _group(group: str) -> Obj:
    versions = sorted({r.version for r in RESOURCES if r.group == group})
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": entries, "preferredVersion": entries[0]}


def _discovery(parts: list[str], host: str, version: Obj | None = None) -> Obj | None:
    groups = sorted({r.group for r in RESOURCES if r.group})
    if parts == ["version"]:
        return version or SERVER_VERSION
    if parts == ["api"]:
        cidrs = [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": cidrs}
    if parts == ["api", "v1"]:
        return _resource_list("", "v1")
    if parts == ["apis"]:
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group(g) for g in groups]}
    if len(parts) == 2 and parts[0] == "apis" and parts[1] in groups:
        return {"kind": "APIGroup", "apiVersion": "v1", **_group(parts[1])}
    if len(parts) == 3 and parts[0] == "apis" and any((r.group, r.version) == (parts[1], parts[2]) for r in RESOURCES):
        return _resource_list(parts[1], parts[2])
    return None


# -- routing -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    resource: Resource
    namespace: str | None
    name: str | None


def _target(parts: list[str]) -> Target | None:
    """/api/v1/... or /apis/<group>/<version>/..., then namespaces/<ns>/<plural>[/<name>] or <plural> (every ns)."""
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if len(rest) in (3, 4) and rest[0] == "namespaces" and rest[1]:
        resource = find_resource(group, version, rest[2])
        name = rest[3] if len(rest) == 4 else None
        return Target(resource, rest[1], name) if resource is not None and name != "" else None
    if len(rest) == 1:
        resource = find_resource(group, version, rest[0])
        return Target(resource, None, None) if resource is not None else None
    return None


def _path_not_found() -> KubeError:
    details: Obj = {"causes": [{"reason": "UnexpectedServerResponse", "message": "404 page not found"}]}
    message = "the server could not find the requested resource"
    return KubeError(code=404, reason="NotFound", message=message, details=details)


def _method_not_allowed() -> KubeError:
    message = "the server does not allow this method on the requested resource"
    return KubeError(code=405, reason="MethodNotAllowed", message=message)


def _verb(request: web.Request, target: Target) -> str:
    if request.method == "GET":
        if target.name is not None:
            return "get"
        return "watch" if _is_true(request.query.get("watch")) else "list"
    verb = _METHOD_VERBS.get(request.method)
    if verb is None or (verb == "create") != (target.name is None) or target.namespace is None:
        raise _method_not_allowed()
    return verb


def _user(request: web.Request, store: KubeStore) -> str:
    """The bearer token's user; the scheme is case-insensitive (the client's in-cluster config sends "bearer")."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    user = store.user_for(token.strip()) if scheme.lower() == "bearer" else None
    if user is None:
        raise unauthorized()
    return user


async def _body(request: web.Request) -> Any:
    if not request.can_read_body:
        return None
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


# -- the API handler ---------------------------------------------------------------------------------------------


async def handle_api(request: web.Request) -> web.StreamResponse:
    store = request.app[_STORE]
    call: Obj = {"method": request.method, "path": request.path, "query": dict(request.query), "user": None}
    try:
        user = call["user"] = _user(request, store)
        parts = [p for p in request.path.split("/") if p]
        version = request.app[_OPTIONS].version
        found = _discovery(parts, request.host, version) if request.method == "GET" else None
        if found is not None:
            call["verb"] = "discovery"
            response: web.StreamResponse = _json(found)
        else:
            target = _target(parts)
            if target is None:
                raise _path_not_found()
            verb = call["verb"] = _verb(request, target)
            call.update(resource=target.resource.qualified, namespace=target.namespace, name=target.name)
            response = await _serve(request, store, user=user, verb=verb, target=target)
    except KubeError as exc:
        response = _json(exc.status(), status=exc.code)
    call["code"] = response.status
    store.record_call(call)
    return response


async def _serve(request: web.Request, store: KubeStore, *, user: str, verb: str, target: Target) -> web.StreamResponse:
    resource, namespace, name = target.resource, target.namespace, target.name
    query = request.query
    selector = Selector.parse(label_selector=query.get("labelSelector"), field_selector=query.get("fieldSelector"))
    if verb not in resource.verbs:
        raise _method_not_allowed()
    store.authorize(
        user=user, verb=verb, resource=resource, namespace=namespace, name=name if name is not None else selector.name
    )
    if verb == "watch":
        return await _watch(request, store, target=target, selector=selector)
    if verb == "list":
        store.check_list_version(
            parse_resource_version(query.get("resourceVersion")), match=query.get("resourceVersionMatch")
        )
        items, rv = store.list_objects(resource, namespace, selector)
        for item in items:  # items of a list carry no kind/apiVersion of their own, as the real server's
            item.pop("kind", None)
            item.pop("apiVersion", None)
        body: Obj = {"kind": f"{resource.kind}List", "apiVersion": resource.api_version}
        return _json({**body, "metadata": {"resourceVersion": str(rv)}, "items": items})
    assert namespace is not None  # _verb refuses namespace-less writes and gets
    if verb == "get":
        assert name is not None
        return _json(store.get(resource, namespace, name))
    payload = await _body(request)
    if verb == "create":
        return _json(store.create(resource, namespace, payload, user=user), status=201)
    assert name is not None
    if verb == "update":
        return _json(store.replace(resource, namespace, name, payload, user=user))
    if verb == "patch":
        if request.content_type not in MERGE_PATCH_TYPES:
            message = (
                f"the body of the request was in an unknown format - accepted media types include: "
                f"{', '.join(sorted(MERGE_PATCH_TYPES))}"
            )
            raise KubeError(code=415, reason="UnsupportedMediaType", message=message)
        return _json(store.patch(resource, namespace, name, payload, user=user))
    preconditions = payload.get("preconditions") if isinstance(payload, dict) else None
    gone = store.delete(resource, namespace, name, user=user, preconditions=preconditions)
    details = resource.details(name, uid=gone["metadata"]["uid"])
    return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details})


def _event(change: Change, selector: Selector) -> Obj | None:
    """The watch event for `change` as this watcher sees it (selectors turn MODIFIED into ADDED or DELETED)."""
    now = selector.matches(change.obj)
    before = change.prev is not None and selector.matches(change.prev)
    if change.type == "MODIFIED" and now != before:
        if now:
            return {"type": "ADDED", "object": change.obj}
        assert change.prev is not None
        prev = {**change.prev, "metadata": {**change.prev["metadata"], "resourceVersion": str(change.rv)}}
        return {"type": "DELETED", "object": prev}
    return {"type": change.type, "object": change.obj} if now else None


async def _watch(request: web.Request, store: KubeStore, *, target: Target, selector: Selector) -> web.StreamResponse:
    query = request.query
    timeout_text = query.get("timeoutSeconds")
    if timeout_text is not None and not timeout_text.isdigit():
        raise bad_request(f'invalid timeoutSeconds "{timeout_text}"')
    deadline = time.monotonic() + int(timeout_text) if timeout_text else None
    bookmarks = _is_true(query.get("allowWatchBookmarks"))
    interval = request.app[_OPTIONS].bookmark_interval
    since = parse_resource_version(query.get("resourceVersion"))

    response = web.StreamResponse(headers={"Content-Type": JSON, "Cache-Control": "no-cache, private"})
    response.enable_chunked_encoding()
    try:
        watcher, initial = store.watch(target.resource, target.namespace, since, selector)
    except KubeError as exc:
        if exc.code != 410:
            raise
        await response.prepare(request)
        await response.write(json.dumps({"type": "ERROR", "object": exc.status()}).encode() + b"\n")
        await response.write_eof()
        return response

    async def send(event: Obj) -> None:
        await response.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")

    try:
        await response.prepare(request)
        for change in initial:
            event = _event(change, selector)
            if event is not None:
                await send(event)
        next_bookmark = time.monotonic() + interval
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            wait = min(next_bookmark - now, (deadline - now) if deadline is not None else interval)
            try:
                item = await asyncio.wait_for(watcher.queue.get(), timeout=max(wait, 0.0))
            except TimeoutError:
                item = BOOKMARK if time.monotonic() >= next_bookmark else ""
            if item is None:
                break
            if item == BOOKMARK:
                next_bookmark = time.monotonic() + interval
                if bookmarks:
                    meta = {"resourceVersion": str(store.resource_version)}
                    kind = {"kind": target.resource.kind, "apiVersion": target.resource.api_version}
                    await send({"type": "BOOKMARK", "object": {**kind, "metadata": meta}})
            elif isinstance(item, Change):
                event = _event(item, selector)
                if event is not None:
                    await send(event)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away
    finally:
        store.unwatch(watcher)
    return response


# -- the admin API -----------------------------------------------------------------------------------------------


def _admin_error(message: str) -> web.Response:
    return _json({"error": message}, status=400)


async def _admin_json(request: web.Request) -> Any:
    try:
        return await request.json() if request.can_read_body else {}
    except ValueError:
        return None


async def admin_state(request: web.Request) -> web.Response:
    store = request.app[_STORE]
    return _json(
        {
            "resourceVersion": str(store.resource_version),
            "compactedResourceVersion": str(store.compacted_rv),
            "watches": store.watch_count,
        }
    )


async def admin_rules(request: web.Request) -> web.Response:
    """GET: the rules (null = RBAC off, anyone authenticated may do anything). PUT {"rules": [...] | null}."""
    store = request.app[_STORE]
    if request.method == "PUT":
        raw = await _admin_json(request)
        if not isinstance(raw, dict) or "rules" not in raw:
            return _admin_error('the body must be {"rules": [...]} or {"rules": null}')
        try:
            store.rules = None if raw["rules"] is None else tuple(Rule.from_json(r) for r in raw["rules"])
        except (ValueError, TypeError) as exc:
            return _admin_error(str(exc))
    rules = None if store.rules is None else [r.to_json() for r in store.rules]
    return _json({"rules": rules})


async def admin_token(request: web.Request) -> web.Response:
    raw = await _admin_json(request)
    user = raw.get("user") if isinstance(raw, dict) else None
    if not isinstance(user, str) or not user:
        return _admin_error('the body must be {"user": "<name>"}')
    return _json({"user": user, "token": request.app[_STORE].token(user)})


async def admin_compact(request: web.Request) -> web.Response:
    return _json({"compactedResourceVersion": str(request.app[_STORE].compact())})


async def admin_bookmark(request: web.Request) -> web.Response:
    store = request.app[_STORE]
    store.send_bookmarks()
    return _json({"watches": store.watch_count})


async def admin_close_watches(request: web.Request) -> web.Response:
    return _json({"closed": request.app[_STORE].close_watches()})


async def admin_restart(request: web.Request) -> web.Response:
    """{"down_seconds": 1.0, "compact": true}: answer 202, then stop and restart the listener on the same port."""
    raw = await _admin_json(request)
    restart = request.app[_OPTIONS].restart
    if restart is None:
        return _admin_error("this app is not a started server; nothing to restart")
    down = raw.get("down_seconds", 1.0) if isinstance(raw, dict) else None
    compact = raw.get("compact", True) if isinstance(raw, dict) else None
    if isinstance(down, bool) or not isinstance(down, int | float) or not 0 <= down <= 60:
        return _admin_error(f"down_seconds must be a number from 0 to 60, got {down!r}")
    if not isinstance(compact, bool):
        return _admin_error(f"compact must be true or false, got {compact!r}")
    try:
        await restart(float(down), compact)
    except KubeError as exc:
        return _json({"error": exc.message}, status=exc.code)
    return _json({"restarting": True, "down_seconds": down}, status=202)


async def admin_objects(request: web.Request) -> web.Response:
    """POST a whole object (apiVersion, kind, metadata.namespace): stored as is, past rules and verbs (seed Pods)."""
    raw = await _admin_json(request)
    if not isinstance(raw, dict):
        return _admin_error("the body must be a Kubernetes object")
    group, _, version = str(raw.get("apiVersion", "")).rpartition("/")
    matches = [r for r in RESOURCES if (r.group, r.version, r.kind) == (group, version, raw.get("kind"))]
    namespace = (raw.get("metadata") or {}).get("namespace") or DEFAULT_NAMESPACE
    if not matches:
        return _admin_error(f"unknown apiVersion/kind {raw.get('apiVersion')!r}/{raw.get('kind')!r}")
    try:
        obj = request.app[_STORE].create(matches[0], namespace, raw, user=EMULATOR_USER, verb="seed")
    except KubeError as exc:
        return _json(exc.status(), status=exc.code)
    return _json(obj, status=201)


async def admin_history(request: web.Request) -> web.Response:
    """?resource=secrets&namespace=ns&name=x -> every write of that object, oldest first, with who wrote it."""
    query = request.query
    try:
        resource = resource_by_name(query.get("resource", ""))
    except KeyError as exc:
        return _admin_error(str(exc.args[0]))
    writes = request.app[_STORE].history(resource, query.get("namespace", DEFAULT_NAMESPACE), query.get("name", ""))
    return _json({"writes": [{**w.to_json(), "object": w.obj} for w in writes]})


async def admin_calls(request: web.Request) -> web.Response:
    """GET: every API call (method, path, query, user, verb, resource, namespace, name, code); DELETE clears."""
    store = request.app[_STORE]
    if request.method == "DELETE":
        store.calls.clear()
    return _json({"calls": list(store.calls)})


def create_kube_app(store: KubeStore, options: KubeOptions | None = None) -> web.Application:
    app = web.Application()
    app[_STORE] = store
    app[_OPTIONS] = options or KubeOptions()
    app.router.add_get("/_emulator/state", admin_state)
    app.router.add_route("GET", "/_emulator/rules", admin_rules)
    app.router.add_route("PUT", "/_emulator/rules", admin_rules)
    app.router.add_post("/_emulator/tokens", admin_token)
    app.router.add_post("/_emulator/compact", admin_compact)
    app.router.add_post("/_emulator/bookmark", admin_bookmark)
    app.router.add_post("/_emulator/close-watches", admin_close_watches)
    app.router.add_post("/_emulator/restart", admin_restart)
    app.router.add_post("/_emulator/objects", admin_objects)
    app.router.add_get("/_emulator/history", admin_history)
    app.router.add_route("GET", "/_emulator/calls", admin_calls)
    app.router.add_route("DELETE", "/_emulator/calls", admin_calls)
    app.router.add_route("*", "/{tail:.*}", handle_api)
    return app


# -- the running server ------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class InClusterFiles:
    """What kubelet mounts in a pod, plus the environment variables that point at the API server.

    Use with `kubernetes.config.incluster_config.InClusterConfigLoader(token_filename=..., cert_filename=...,
    environ=...)` (`load_incluster_config()` itself reads only the fixed /var/run/secrets/... paths)."""

    directory: Path
    token_file: Path
    ca_file: Path
    namespace_file: Path
    environ: dict[str, str]


class RunningKubeApi:
    """A started stand-in: `url`, `kubeconfig_path` (the superuser), `token(user)`, `restart()`, `close()`."""

    def __init__(self, *, store: KubeStore, options: KubeOptions, host: str, directory: Path, owns_directory: bool):
        self.store = store
        self.url = ""
        self.kubeconfig_path = directory / "kubeconfig"
        self.ca_file: Path | None = None
        self.namespace = DEFAULT_NAMESPACE
        self._options = options
        self._host = host
        self._port = 0
        self._directory = directory
        self._owns_directory = owns_directory
        self._tls: LocalTls | None = None
        self._runner: web.AppRunner | None = None
        self._restarting: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def serving(self) -> bool:
        """False while a restart keeps the port closed."""
        return self._runner is not None

    def token(self, user: str) -> str:
        """The bearer token of `user` (made on first use); rules decide what it may do."""
        return self.store.token(user)

    def set_rules(self, rules: Iterable[Rule] | None) -> None:
        self.store.rules = None if rules is None else tuple(rules)

    def write_kubeconfig(self, path: Path, *, user: str = SUPERUSER, namespace: str | None = None) -> Path:
        """A kubeconfig for `user` that `kubernetes.config.load_kube_config(config_file=path)` accepts."""
        cluster: Obj = {"server": self.url}
        if self.ca_file is not None:
            cluster["certificate-authority"] = str(self.ca_file)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": cluster}],
            "users": [{"name": user, "user": {"token": self.token(user)}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": user, "namespace": namespace or self.namespace},
                }
            ],
            "current-context": "emulator",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, yaml.safe_dump(config, sort_keys=False))
        return path

    def write_incluster(self, directory: Path, *, user: str, namespace: str | None = None) -> InClusterFiles:
        """token, ca.crt and namespace in `directory` (the layout of /var/run/secrets/kubernetes.io/serviceaccount).

        The in-cluster client config always speaks HTTPS, so the server must run with `tls=True`."""
        if self.ca_file is None:
            raise ValueError("in-cluster config is HTTPS only: start the stand-in with tls=True")
        directory.mkdir(parents=True, exist_ok=True)
        files = InClusterFiles(
            directory=directory,
            token_file=directory / "token",
            ca_file=directory / "ca.crt",
            namespace_file=directory / "namespace",
            environ={"KUBERNETES_SERVICE_HOST": self._host, "KUBERNETES_SERVICE_PORT": str(self._port)},
        )
        write_private(files.token_file, self.token(user))
        files.ca_file.write_bytes(self.ca_file.read_bytes())
        files.namespace_file.write_text(namespace or self.namespace)
        return files

    async def _listen(self) -> None:
        app = create_kube_app(self.store, self._options)
        ssl_context = self._tls.server_context() if self._tls is not None else None
        self._runner, url = await _serve_app(app, host=self._host, port=self._port, ssl_context=ssl_context)
        self._port = URL(url).port or 0
        self.url = url

    async def _stop_listening(self) -> None:
        self.store.close_watches()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def restart(self, *, down_seconds: float = 1.0, compact: bool = True) -> None:
        """Stop like a restarting API server: watches end, connections close, the port refuses connections for
        `down_seconds`, then the same port serves again with the same objects and counter. With `compact` the
        watch history is gone too, as a fresh watch cache: resuming a watch from an older RV gets 410."""
        await self._stop_listening()
        if compact:
            self.store.compact()
        await asyncio.sleep(down_seconds)
        await self._listen()

    async def _restart_later(self, down_seconds: float, compact: bool) -> None:
        """For the admin call: restart after its 202 has gone out."""
        if self._restarting is not None and not self._restarting.done():
            raise KubeError(code=409, reason="Conflict", message="a restart is already under way")

        async def run() -> None:
            await asyncio.sleep(0.05)
            try:
                await self.restart(down_seconds=down_seconds, compact=compact)
            except Exception:
                log.exception("the Kubernetes API stand-in did not come back after a restart")

        self._restarting = asyncio.create_task(run(), name=_RESTART)

    async def wait_restarted(self) -> None:
        if self._restarting is not None:
            await self._restarting

    async def close(self) -> None:
        """Stop serving and remove the files this server made; safe to call twice."""
        task, self._restarting = self._restarting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self._stop_listening()
        finally:
            if self._owns_directory:
                shutil.rmtree(self._directory, ignore_errors=True)

    async def __aenter__(self) -> RunningKubeApi:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def start_kube_api(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: bool = False,
    namespace: str = DEFAULT_NAMESPACE,
    rules: Iterable[Rule] | None = None,
    history_limit: int = 1000,
    bookmark_interval: float = DEFAULT_BOOKMARK_INTERVAL,
    directory: Path | None = None,
    version: str | None = None,
) -> RunningKubeApi:
    """Start the stand-in on `host:port` (0 = any free port); `rules=None` means RBAC off; `version` ("1.28.0")
    is the Kubernetes version /version reports (default: SERVER_VERSION's).

    `directory` holds the kubeconfig and the TLS files; a temporary one (removed by `close()`) when None.
    """
    if bookmark_interval <= 0:
        raise ValueError(f"bookmark_interval must be above 0, not {bookmark_interval!r}")
    owns = directory is None
    workdir = Path(tempfile.mkdtemp(prefix="kube-emulator-")) if directory is None else directory
    workdir.mkdir(parents=True, exist_ok=True)
    store = KubeStore(history_limit=history_limit, rules=rules)
    server: RunningKubeApi | None = None
    try:
        answer = server_version(version) if version is not None else None
        options = KubeOptions(bookmark_interval=bookmark_interval, version=answer)
        server = RunningKubeApi(store=store, options=options, host=host, directory=workdir, owns_directory=owns)
        server._options = KubeOptions(
            bookmark_interval=bookmark_interval, version=answer, restart=server._restart_later
        )
        server.namespace = namespace
        server._port = port
        if tls:
            server._tls = make_local_tls(workdir / "tls")
            server.ca_file = server._tls.ca_file
        await server._listen()
        server.write_kubeconfig(server.kubeconfig_path)
    except BaseException:
        if server is not None:
            await server.close()
        elif owns:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    return server
