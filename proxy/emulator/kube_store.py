"""The state behind the Kubernetes API stand-in: objects, the resourceVersion counter, the watch history, RBAC-like
rules, bearer tokens and the records tests read (writes per object, calls).

It owns what kube-apiserver and etcd would keep and the error Status objects they answer with; it does not own
HTTP (that is `kube.py`). Everything runs on one event loop, so a write, its history entry and its delivery to
the open watches happen in one step, with no await in between.

Behaviour follows https://kubernetes.io/docs/reference/using-api/api-concepts/:
- "Resource versions": one counter for the whole store, as etcd's revision; every write that changes an object
  bumps it and stamps the object; a list carries the counter at the time of the list.
- "Efficient detection of changes": a watch from a resourceVersion replays the later changes kept in a bounded
  history; one older than the history gets `410 Gone` (reason Expired), and the client must list again.
- "Conflicts" / optimistic concurrency: an update whose metadata.resourceVersion is not the stored one is a 409.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import datetime
import itertools
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]

ALL_VERBS = frozenset({"get", "list", "watch", "create", "update", "patch", "delete"})
READ_VERBS = frozenset({"get", "list", "watch"})
SUPERUSER = "kubernetes-admin"  # in group system:masters, like kubeadm's admin: no rule applies to it
EMULATOR_USER = "_emulator"  # writes made through the admin API
DEFAULT_HISTORY_LIMIT = 1000
MAX_CALLS = 10_000
# generateName suffixes use the same alphabet as apimachinery's utilrand.String (no vowels, no confusable digits)
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


@dataclass(frozen=True, kw_only=True)
class Resource:
    """One served resource type; `qualified` names it in the real server's messages (`leases.coordination.k8s.io`)."""

    group: str
    version: str
    plural: str
    kind: str
    verbs: frozenset[str] = ALL_VERBS

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def details(self, name: str | None, **extra: Any) -> Obj:
        out: Obj = {"name": name} if name else {}
        if self.group:
            out["group"] = self.group
        out["kind"] = self.plural
        out.update(extra)
        return out


RESOURCES: tuple[Resource, ...] = (
    Resource(group="", version="v1", plural="secrets", kind="Secret"),
    Resource(group="", version="v1", plural="events", kind="Event"),
    Resource(group="", version="v1", plural="pods", kind="Pod", verbs=READ_VERBS),
    Resource(group="events.k8s.io", version="v1", plural="events", kind="Event"),
    Resource(group="coordination.k8s.io", version="v1", plural="leases", kind="Lease"),
)


def find_resource(group: str, version: str, plural: str) -> Resource | None:
    for resource in RESOURCES:
        if (resource.group, resource.version, resource.plural) == (group, version, plural):
            return resource
    return None


def resource_by_name(name: str) -> Resource:
    """`secrets`, `leases.coordination.k8s.io`, `events.events.k8s.io`: the qualified name, as in messages."""
    for resource in RESOURCES:
        if resource.qualified == name:
            return resource
    raise KeyError(f"unknown resource {name!r}; known: {', '.join(r.qualified for r in RESOURCES)}")


# -- errors ------------------------------------------------------------------------------------------------------


class KubeError(Exception):
    """A request that fails with a metav1.Status body, as the real server answers every error."""

    def __init__(self, *, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> Obj:
        body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
        body.update(message=self.message, reason=self.reason)
        if self.details:
            body["details"] = self.details
        body["code"] = self.code
        return body


def not_found(resource: Resource, name: str) -> KubeError:
    return KubeError(
        code=404, reason="NotFound", message=f'{resource.qualified} "{name}" not found', details=resource.details(name)
    )


def already_exists(resource: Resource, name: str) -> KubeError:
    message = f'{resource.qualified} "{name}" already exists'
    return KubeError(code=409, reason="AlreadyExists", message=message, details=resource.details(name))


def conflict(resource: Resource, name: str, why: str) -> KubeError:
    message = f'Operation cannot be fulfilled on {resource.qualified} "{name}": {why}'
    return KubeError(code=409, reason="Conflict", message=message, details=resource.details(name))


MODIFIED_WHY = "the object has been modified; please apply your changes to the latest version and try again"


def forbidden(*, user: str, verb: str, resource: Resource, namespace: str | None, name: str | None) -> KubeError:
    subject = f'{resource.qualified} "{name}"' if name else resource.qualified
    where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    message = (
        f'{subject} is forbidden: User "{user}" cannot {verb} resource "{resource.plural}" '
        f'in API group "{resource.group}" {where}'
    )
    return KubeError(code=403, reason="Forbidden", message=message, details=resource.details(name))


def unauthorized() -> KubeError:
    return KubeError(code=401, reason="Unauthorized", message="Unauthorized")


def bad_request(message: str) -> KubeError:
    return KubeError(code=400, reason="BadRequest", message=message)


def invalid(resource: Resource, name: str, *, field_path: str, detail: str) -> KubeError:
    message = f'{resource.kind} "{name}" is invalid: {field_path}: {detail}'
    causes = [{"reason": "FieldValueInvalid", "message": detail, "field": field_path}]
    details: Obj = {"name": name, "group": resource.group, "kind": resource.kind, "causes": causes}
    return KubeError(code=422, reason="Invalid", message=message, details=details)


def expired(message: str) -> KubeError:
    return KubeError(code=410, reason="Expired", message=message)


def too_large_resource_version(asked: int, current: int) -> KubeError:
    details: Obj = {
        "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
        "retryAfterSeconds": 1,
    }
    message = f"Too large resource version: {asked}, current: {current}"
    return KubeError(code=504, reason="Timeout", message=message, details=details)


def parse_resource_version(value: str | None) -> int | None:
    """None when unset or "0" (any version will do); 400 when not a number, as the real server."""
    if value is None or value in ("", "0"):
        return None
    if not value.isdigit():
        raise bad_request(f'invalid resource version "{value}"')  # the real server's wording for a non-number
    return int(value)


# -- selectors ---------------------------------------------------------------------------------------------------

Requirement = tuple[str, str, str]  # (key, operator, value); operators "=", "!=", "exists", "!exists"


def _parse_requirements(text: str | None, *, kind: str) -> tuple[Requirement, ...]:
    out: list[Requirement] = []
    for raw in (text or "").split(","):
        part = raw.strip()
        if not part:
            continue
        if "!=" in part:
            key, value = part.split("!=", 1)
            op = "!="
        elif "==" in part:
            key, value = part.split("==", 1)
            op = "="
        elif "=" in part:
            key, value = part.split("=", 1)
            op = "="
        elif kind == "label" and " " not in part and "(" not in part:
            key, op, value = (part[1:], "!exists", "") if part.startswith("!") else (part, "exists", "")
        else:
            raise bad_request(f'unable to parse requirement: "{part}": only equality selectors are served here')
        if not key.strip():
            raise bad_request(f'unable to parse requirement: "{part}": empty key')
        out.append((key.strip(), op, value.strip()))
    return tuple(out)


FIELD_SELECTORS = ("metadata.name", "metadata.namespace")


@dataclass(frozen=True)
class Selector:
    """`labelSelector` (equality, inequality, existence) and `fieldSelector` (metadata.name, metadata.namespace)."""

    labels: tuple[Requirement, ...] = ()
    fields: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, *, label_selector: str | None, field_selector: str | None) -> Selector:
        fields = _parse_requirements(field_selector, kind="field")
        for key, _, _ in fields:
            if key not in FIELD_SELECTORS:
                allowed = ", ".join(f'"{f}"' for f in FIELD_SELECTORS)
                raise bad_request(f'"{key}" is not a known field selector: only {allowed}')
        return cls(_parse_requirements(label_selector, kind="label"), fields)

    @property
    def name(self) -> str | None:
        """The one name asked for with `metadata.name=X` (RBAC's resourceNames apply to such list and watch calls)."""
        names = [value for key, op, value in self.fields if key == "metadata.name" and op == "="]
        return names[0] if len(names) == 1 else None

    def matches(self, obj: Obj) -> bool:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        fields = {"metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace", "")}
        return all(_holds(labels, r) for r in self.labels) and all(_holds(fields, r) for r in self.fields)


def _holds(values: Mapping[str, Any], requirement: Requirement) -> bool:
    key, op, value = requirement
    if op == "exists":
        return key in values
    if op == "!exists":
        return key not in values
    return (values.get(key) == value) == (op == "=")


# -- rules -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One allow rule, shaped like an RBAC PolicyRule bound to one user ("*" in a field matches anything).

    Empty `resource_names` or `namespaces` match any. As in RBAC, a rule with resource names never matches a
    create (its name is not known when authorizing), nor a list or watch unless it asks for one name with
    `fieldSelector=metadata.name=X`.
    """

    user: str = "*"
    verbs: tuple[str, ...] = ("*",)
    api_groups: tuple[str, ...] = ("*",)
    resources: tuple[str, ...] = ("*",)
    resource_names: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()

    def allows(self, *, user: str, verb: str, resource: Resource, namespace: str | None, name: str | None) -> bool:
        def hit(allowed: tuple[str, ...], value: str) -> bool:
            return "*" in allowed or value in allowed

        return (
            hit((self.user,), user)
            and hit(self.verbs, verb)
            and hit(self.api_groups, resource.group)
            and hit(self.resources, resource.plural)
            and (not self.resource_names or (name is not None and name in self.resource_names))
            and (not self.namespaces or (namespace is not None and namespace in self.namespaces))
        )

    @classmethod
    def from_json(cls, raw: Any) -> Rule:
        if not isinstance(raw, Mapping):
            raise ValueError(f"a rule must be a mapping, got {type(raw).__name__}")
        keys = {"user": "user", "verbs": "verbs", "apiGroups": "api_groups", "resources": "resources"}
        keys |= {"resourceNames": "resource_names", "namespaces": "namespaces"}
        unknown = set(raw) - set(keys)
        if unknown:
            raise ValueError(f"unknown rule keys {sorted(unknown)}; allowed: {sorted(keys)}")
        kwargs: dict[str, Any] = {}
        for json_key, attr in keys.items():
            if json_key not in raw:
                continue
            value = raw[json_key]
            if attr == "user":
                if not isinstance(value, str) or not value:
                    raise ValueError(f"user must be a non-empty string, got {value!r}")
                kwargs[attr] = value
            elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{json_key} must be a list of strings, got {value!r}")
            else:
                kwargs[attr] = tuple(value)
        return cls(**kwargs)

    def to_json(self) -> Obj:
        return {
            "user": self.user,
            "verbs": list(self.verbs),
            "apiGroups": list(self.api_groups),
            "resources": list(self.resources),
            "resourceNames": list(self.resource_names),
            "namespaces": list(self.namespaces),
        }


# -- records -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Change:
    """One stored change, as a watch sees it: ADDED, MODIFIED or DELETED, with the object before it (`prev`)."""

    rv: int
    type: str
    resource: Resource
    namespace: str
    obj: Obj
    prev: Obj | None = None


@dataclass(frozen=True, kw_only=True)
class Write:
    """One write of one object, for tests (who wrote what, in which order)."""

    rv: int
    verb: str
    user: str
    type: str
    obj: Obj

    def to_json(self) -> Obj:
        return {"resourceVersion": str(self.rv), "verb": self.verb, "user": self.user, "type": self.type}


BOOKMARK = "BOOKMARK"
Delivery = Change | str | None  # a change, BOOKMARK (send one now), or None (the watch ends)


@dataclass(eq=False, kw_only=True)
class Watcher:
    resource: Resource
    namespace: str | None
    queue: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)

    def wants(self, change: Change) -> bool:
        return change.resource is self.resource and self.namespace in (None, change.namespace)


Key = tuple[str, str, str]  # (qualified resource, namespace, name)


def _now_rfc3339(clock: Callable[[], float]) -> str:
    return datetime.datetime.fromtimestamp(int(clock()), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge key by key, null removes, anything else replaces.

    Strategic merge patch differs only for lists with merge keys; Secrets, Events and Leases have none that a
    client patches, so both content types share this.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


# -- the store ---------------------------------------------------------------------------------------------------


class KubeStore:
    """Objects by (resource, namespace, name), the global resourceVersion, the watch history and the watchers."""

    def __init__(
        self,
        *,
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        rules: Iterable[Rule] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if history_limit < 1:
            raise ValueError(f"history_limit must be at least 1, not {history_limit!r}")
        self.clock = clock
        self.resource_version = 1
        # a watch may resume from any RV >= this one; older RVs get 410 Expired
        self.compacted_rv = self.resource_version
        self.rules: tuple[Rule, ...] | None = None if rules is None else tuple(rules)
        self._objects: dict[Key, Obj] = {}
        self._history: deque[Change] = deque()
        self._history_limit = history_limit
        self._watchers: set[Watcher] = set()
        self._tokens: dict[str, str] = {}  # token -> user
        self._user_tokens: dict[str, str] = {}
        self.writes: dict[Key, list[Write]] = {}
        self.calls: deque[Obj] = deque(maxlen=MAX_CALLS)
        self._call_ids = itertools.count(1)

    # -- identities and rules

    def token(self, user: str) -> str:
        """The bearer token of `user`, made on first use; the server maps it back to the user."""
        if not user:
            raise ValueError("user must be a non-empty string")
        if user not in self._user_tokens:
            token = f"kube-{secrets.token_urlsafe(24)}"
            self._user_tokens[user] = token
            self._tokens[token] = user
        return self._user_tokens[user]

    def user_for(self, token: str) -> str | None:
        return self._tokens.get(token)

    def authorize(self, *, user: str, verb: str, resource: Resource, namespace: str | None, name: str | None) -> None:
        """Raise the real server's 403 unless the superuser, no rules at all (RBAC off), or a rule allows it."""
        if user == SUPERUSER or self.rules is None:
            return
        if not any(
            rule.allows(user=user, verb=verb, resource=resource, namespace=namespace, name=name) for rule in self.rules
        ):
            raise forbidden(user=user, verb=verb, resource=resource, namespace=namespace, name=name)

    def record_call(self, call: Obj) -> None:
        self.calls.append({"id": next(self._call_ids), **call})

    # -- reads

    def get(self, resource: Resource, namespace: str, name: str) -> Obj:
        obj = self._objects.get((resource.qualified, namespace, name))
        if obj is None:
            raise not_found(resource, name)
        return copy.deepcopy(obj)

    def list_objects(self, resource: Resource, namespace: str | None, selector: Selector) -> tuple[list[Obj], int]:
        items = [
            copy.deepcopy(obj)
            for (qualified, ns, _), obj in sorted(self._objects.items())
            if qualified == resource.qualified and namespace in (None, ns) and selector.matches(obj)
        ]
        return items, self.resource_version

    def check_list_version(self, asked: int | None, *, match: str | None) -> None:
        """resourceVersionMatch=Exact needs that very snapshot: only the current one is kept here, so an older RV
        answers 410 Expired as a compacted one would; an RV from the future is 504 Too large, as the real server."""
        if asked is None:
            return
        if asked > self.resource_version:
            raise too_large_resource_version(asked, self.resource_version)
        if match == "Exact" and asked != self.resource_version:
            raise expired("The resourceVersion for the provided list is too old.")

    # -- writes

    def _stamp(self, key: Key, verb: str, user: str, kind: str, obj: Obj, prev: Obj | None) -> Obj:
        resource = resource_by_name(key[0])
        self.resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self.resource_version)
        change = Change(
            rv=self.resource_version, type=kind, resource=resource, namespace=key[1], obj=copy.deepcopy(obj), prev=prev
        )
        if kind == "DELETED":
            self._objects.pop(key, None)
        else:
            self._objects[key] = copy.deepcopy(obj)
        self._history.append(change)
        while len(self._history) > self._history_limit:
            self.compacted_rv = self._history.popleft().rv
        self.writes.setdefault(key, []).append(
            Write(rv=self.resource_version, verb=verb, user=user, type=kind, obj=copy.deepcopy(obj))
        )
        for watcher in self._watchers:
            if watcher.wants(change):
                watcher.queue.put_nowait(change)
        return obj

    def _prepare(self, resource: Resource, namespace: str, body: Any) -> Obj:
        if not isinstance(body, dict):
            raise bad_request(f"the body must be a {resource.kind} object")
        obj = copy.deepcopy(body)
        meta = obj.get("metadata")
        if meta is None:
            meta = obj["metadata"] = {}
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if meta.get("namespace") not in (None, "", namespace):
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        meta["namespace"] = namespace
        for key in ("kind", "apiVersion"):
            if obj.get(key) not in (None, "", resource.kind if key == "kind" else resource.api_version):
                raise bad_request(f"{key} {obj[key]!r} does not match the {resource.qualified} resource")
        obj["kind"], obj["apiVersion"] = resource.kind, resource.api_version
        if resource.kind == "Secret":
            _normalize_secret(resource, obj)
        return obj

    def create(self, resource: Resource, namespace: str, body: Any, *, user: str, verb: str = "create") -> Obj:
        obj = self._prepare(resource, namespace, body)
        meta = obj["metadata"]
        name = meta.get("name")
        if not name and meta.get("generateName"):
            name = meta["generateName"] + "".join(secrets.choice(_NAME_ALPHABET) for _ in range(5))
        if not isinstance(name, str) or not name:
            raise invalid(
                resource, "", field_path="metadata.name", detail="Required value: name or generateName is required"
            )
        key = (resource.qualified, namespace, name)
        if key in self._objects:
            raise already_exists(resource, name)
        meta.pop("resourceVersion", None)
        meta.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=_now_rfc3339(self.clock))
        if resource.kind == "Pod":
            meta["generation"] = 1
        return self._stamp(key, verb, user, "ADDED", obj, None)

    def replace(
        self, resource: Resource, namespace: str, name: str, body: Any, *, user: str, verb: str = "update"
    ) -> Obj:
        """PUT: the whole object; a stale metadata.resourceVersion is a 409, an absent one an unconditional update."""
        key = (resource.qualified, namespace, name)
        current = self._objects.get(key)
        if current is None:
            raise not_found(resource, name)
        obj = self._prepare(resource, namespace, body)
        meta = obj["metadata"]
        if meta.get("name", name) != name:
            raise bad_request(f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
        old_meta = current["metadata"]
        asked = meta.get("resourceVersion")
        if asked not in (None, "") and asked != old_meta["resourceVersion"]:
            raise conflict(resource, name, MODIFIED_WHY)
        if meta.get("uid") not in (None, "", old_meta["uid"]):
            why = f"Precondition failed: UID in precondition: {meta['uid']}, UID in object meta: {old_meta['uid']}"
            raise conflict(resource, name, why)
        meta["name"] = name
        for kept in ("uid", "creationTimestamp", "generation"):
            if kept in old_meta:
                meta[kept] = old_meta[kept]
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if obj == current:  # etcd3's GuaranteedUpdate writes nothing when nothing changed: no new RV, no event
            return copy.deepcopy(current)
        return self._stamp(key, verb, user, "MODIFIED", obj, copy.deepcopy(current))

    def patch(self, resource: Resource, namespace: str, name: str, patch: Any, *, user: str) -> Obj:
        """Merge patch; metadata.resourceVersion in the patch is a precondition, exactly as in a PUT."""
        if not isinstance(patch, dict):
            raise bad_request("a merge patch must be a JSON object")
        current = self.get(resource, namespace, name)
        merged = merge_patch(current, patch)
        if not isinstance(merged.get("metadata"), dict):
            raise bad_request("metadata must be an object")
        asked = (patch.get("metadata") or {}).get("resourceVersion")
        merged["metadata"]["resourceVersion"] = asked if asked is not None else current["metadata"]["resourceVersion"]
        return self.replace(resource, namespace, name, merged, user=user, verb="patch")

    def delete(self, resource: Resource, namespace: str, name: str, *, user: str, preconditions: Obj | None) -> Obj:
        key = (resource.qualified, namespace, name)
        current = self.get(resource, namespace, name)
        meta = current["metadata"]
        for field_name, label in (("resourceVersion", "ResourceVersion"), ("uid", "UID")):
            want = (preconditions or {}).get(field_name)
            if want not in (None, "") and want != meta[field_name]:
                why = (
                    f"Precondition failed: {label} in precondition: {want}, {label} in object meta: {meta[field_name]}"
                )
                raise conflict(resource, name, why)
        return self._stamp(key, "delete", user, "DELETED", current, copy.deepcopy(current))

    # -- watches

    def watch(
        self, resource: Resource, namespace: str | None, since: int | None, selector: Selector
    ) -> tuple[Watcher, list[Change]]:
        """Open a watch: the changes to send first, then the live ones through `watcher.queue`.

        No RV (or "0"): synthetic ADDED events for every current object, then changes ("Get State and Start at
        Most Recent"). An RV: the kept changes after it; older than the history -> 410 "too old resource version".
        """
        if since is None:
            initial = [
                Change(
                    rv=int(obj["metadata"]["resourceVersion"]), type="ADDED", resource=resource, namespace=ns, obj=obj
                )
                for obj in self.list_objects(resource, namespace, selector)[0]
                for ns in [obj["metadata"]["namespace"]]
            ]
        elif since > self.resource_version:
            raise too_large_resource_version(since, self.resource_version)
        elif since < self.compacted_rv:
            raise expired(f"too old resource version: {since} ({self.compacted_rv})")
        else:
            probe = Watcher(resource=resource, namespace=namespace)
            initial = [c for c in self._history if c.rv > since and probe.wants(c)]
        watcher = Watcher(resource=resource, namespace=namespace)
        self._watchers.add(watcher)
        return watcher, initial

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    @property
    def watch_count(self) -> int:
        return len(self._watchers)

    def send_bookmarks(self) -> None:
        for watcher in self._watchers:
            watcher.queue.put_nowait(BOOKMARK)

    def close_watches(self) -> int:
        """End every open watch cleanly (the stream ends, as when the server closes it); returns how many."""
        watchers, self._watchers = self._watchers, set()
        for watcher in watchers:
            watcher.queue.put_nowait(None)
        return len(watchers)

    def compact(self) -> int:
        """Forget the watch history, like an etcd compaction: watches from any older RV now get 410."""
        self._history.clear()
        self.compacted_rv = self.resource_version
        return self.compacted_rv

    def history(self, resource: Resource, namespace: str, name: str) -> list[Write]:
        return list(self.writes.get((resource.qualified, namespace, name), []))


def _normalize_secret(resource: Resource, obj: Obj) -> None:
    """stringData is write-only: the server folds it into data (base64); data values must be base64."""
    name = (obj.get("metadata") or {}).get("name") or ""
    data = obj.get("data") or {}
    if not isinstance(data, dict):
        raise invalid(resource, name, field_path="data", detail="Invalid value: must be a map of key to base64 value")
    for key, value in data.items():
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise invalid(
                resource, name, field_path=f"data[{key}]", detail="Invalid value: illegal base64 data"
            ) from None
    for key, value in (obj.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    if data:
        obj["data"] = data
    obj.setdefault("type", "Opaque")
