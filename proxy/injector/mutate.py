"""What the injector does with one AdmissionReview: pure functions, no I/O.

`review()` takes the decoded AdmissionReview (admission.k8s.io/v1) of a Pod CREATE, the sidecar template (the
chart's container and volumes, `SidecarTemplate`), whether the cluster runs native sidecars, the injector's own
namespace and whether invalid annotations deny the pod, and returns a `Decision`: the AdmissionReview to answer
and what happened (injected, skipped, denied), for the logs, the metrics and an Event.

The rules, in order:
- only a Pod CREATE (not a subresource) is looked at; anything else is allowed untouched;
- never the injector's own namespace or kube-system;
- only pods labelled `aml-auth-proxy.io/inject: "true"` (the webhook's objectSelector already keeps the API
  server from calling for others); the annotation `aml-auth-proxy.io/inject: "false"` opts a labelled pod out;
- a pod that already has the proxy's container (by name, in containers or initContainers) is left alone, so the
  webhook can be called again (reinvocationPolicy IfNeeded) and the pod comes out the same;
- every `aml-auth-proxy.io/*` annotation is checked; any problem means no injection, and with `deny_invalid`
  (failurePolicy Fail) the pod is refused with one message naming each annotation and its problem;
- otherwise the proxy is added as a native sidecar (an init container with restartPolicy: Always, appended) or a
  plain container (appended), with the volumes it mounts (added when absent; a different volume of the same name
  in the pod is a problem), as a JSONPatch.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final

import yaml

from proxy.events import About

PREFIX: Final = "aml-auth-proxy.io/"
LABEL: Final = PREFIX + "inject"  # the label the webhook's objectSelector matches, "true"
INJECT: Final = PREFIX + "inject"  # the annotation: "false" opts out
CONFIG: Final = PREFIX + "config"
SECRET: Final = PREFIX + "secret"
CPU_REQUEST: Final = PREFIX + "cpu-request"
CPU_LIMIT: Final = PREFIX + "cpu-limit"
MEMORY_REQUEST: Final = PREFIX + "memory-request"
MEMORY_LIMIT: Final = PREFIX + "memory-limit"
IMAGE: Final = PREFIX + "image"
INJECTED: Final = PREFIX + "injected"  # written by the injector: "native" or "plain"
ANNOTATIONS: Final = (INJECT, CONFIG, SECRET, CPU_REQUEST, CPU_LIMIT, MEMORY_REQUEST, MEMORY_LIMIT, IMAGE, INJECTED)
RESOURCE_ANNOTATIONS: Final = {
    CPU_REQUEST: ("requests", "cpu"),
    CPU_LIMIT: ("limits", "cpu"),
    MEMORY_REQUEST: ("requests", "memory"),
    MEMORY_LIMIT: ("limits", "memory"),
}
NEVER_NAMESPACES: Final = ("kube-system",)
ADMISSION_VERSION: Final = "admission.k8s.io/v1"
NATIVE_SINCE: Final = (1, 29)  # native sidecars are on by default from Kubernetes 1.29 (beta)
SECRET_MODE_WITHOUT_FS_GROUP: Final = 0o444  # root-owned Secret files the non-root proxy can read

OUTCOMES: Final = ("injected", "skipped", "denied", "error")

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# A container image reference: [registry[:port]/]path[:tag][@digest] (the grammar of distribution/reference).
_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]+)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_PATH}(?:/{_PATH})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
# A Kubernetes quantity (k8s.io/apimachinery resource.Quantity), without a sign: resources are never negative.
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_SUFFIX: Final = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}

Obj = dict[str, Any]


class BadReview(ValueError):
    """The body is not an AdmissionReview the injector can answer (HTTP 400)."""


class TemplateError(ValueError):
    """The sidecar template file is unusable; `problems` has one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


# -- the sidecar template ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One way of adding the proxy: its container and the pod volumes it mounts."""

    container: Obj
    volumes: tuple[Obj, ...]
    config_volume: str  # the name of the configMap volume (the proxy's config)
    secret_volume: str | None  # the name of the secret volume (keys), if the template has one


@dataclass(frozen=True)
class SidecarTemplate:
    """The chart's sidecar, as the ConfigMap `<release>-aml-auth-proxy-injector-template` holds it (sidecar.yaml):
    `{native: {container, volumes}, plain: {container, volumes}}`."""

    native: Shape
    plain: Shape

    @property
    def container_name(self) -> str:
        return str(self.native.container["name"])

    @property
    def admin_port(self) -> int | None:
        for port in self.native.container.get("ports") or ():
            if isinstance(port, dict) and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
        return None

    def shape(self, native: bool) -> Shape:
        return self.native if native else self.plain

    @classmethod
    def load(cls, path: str | Path) -> SidecarTemplate:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise TemplateError([f"{path}: cannot be read ({exc.strerror or type(exc).__name__})"]) from None
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise TemplateError([f"{path}: not YAML ({type(exc).__name__})"]) from None
        return cls.from_document(document, where=str(path))

    @classmethod
    def from_document(cls, document: Any, *, where: str = "the sidecar template") -> SidecarTemplate:
        problems: list[str] = []
        if not isinstance(document, dict):
            raise TemplateError([f"{where}: expected a mapping with `native` and `plain`"])
        shapes = {mode: _shape(document.get(mode), f"{where}: {mode}", problems) for mode in ("native", "plain")}
        native, plain = shapes["native"], shapes["plain"]
        if native is not None and plain is not None:
            if native.container.get("name") != plain.container.get("name"):
                problems.append(f"{where}: native and plain name the container differently")
            if native.container.get("restartPolicy") != "Always":
                problems.append(f"{where}: native.container has no restartPolicy: Always")
            if "restartPolicy" in plain.container:
                problems.append(f"{where}: plain.container has a restartPolicy (only init containers may)")
        if problems or native is None or plain is None:
            raise TemplateError(problems)
        return cls(native=native, plain=plain)


def _shape(part: Any, where: str, problems: list[str]) -> Shape | None:
    if not isinstance(part, dict) or not isinstance(part.get("container"), dict):
        problems.append(f"{where}: expected `container` (a mapping) and `volumes` (a list)")
        return None
    container: Obj = part["container"]
    volumes = part.get("volumes")
    if not isinstance(volumes, list) or not all(isinstance(v, dict) and v.get("name") for v in volumes):
        problems.append(f"{where}: `volumes` must be a list of named volumes")
        return None
    if not isinstance(container.get("name"), str) or not container["name"]:
        problems.append(f"{where}: the container has no name")
        return None
    config = [v["name"] for v in volumes if isinstance(v.get("configMap"), dict)]
    secret = [v["name"] for v in volumes if isinstance(v.get("secret"), dict)]
    if len(config) != 1:
        problems.append(f"{where}: expected one configMap volume (the proxy's config), found {len(config)}")
    if len(secret) > 1:
        problems.append(f"{where}: expected at most one secret volume, found {len(secret)}")
    names = {v["name"] for v in volumes}
    for mount in container.get("volumeMounts") or ():
        if isinstance(mount, dict) and mount.get("name") not in names:
            problems.append(f"{where}: the container mounts {mount.get('name')!r}, which is not among the volumes")
    if len(config) != 1 or len(secret) > 1:
        return None
    return Shape(
        container=container,
        volumes=tuple(volumes),
        config_volume=config[0],
        secret_volume=secret[0] if secret else None,
    )


# -- quantities and versions -------------------------------------------------------------------------------------


def parse_quantity(text: str) -> Decimal | None:
    """The value of a Kubernetes quantity ("500m", "1.5", "96Mi", "1e3"), None when it is not one."""
    found = _QUANTITY.match(text)
    if found is None:
        return None
    number, suffix = found.group(1), found.group(2) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number) * Decimal(10) ** int(suffix[1:])
        return Decimal(number) * _SUFFIX[suffix]
    except (InvalidOperation, OverflowError):
        return None


def supports_native_sidecars(git_version: str, major: str = "", minor: str = "") -> bool:
    """Whether an API server of this version (VersionInfo's gitVersion, or major and minor) runs native sidecars:
    1.29 or newer. Providers write "v1.29.4-eks-036c24b", or a minor of "29+"."""
    found = re.match(r"^v?(\d+)\.(\d+)", git_version or "")
    if found is not None:
        version = (int(found.group(1)), int(found.group(2)))
    else:
        digits_major, digits_minor = re.match(r"\d*", major or ""), re.match(r"\d*", minor or "")
        if digits_major is None or digits_minor is None or not digits_major.group() or not digits_minor.group():
            raise ValueError(f"not a Kubernetes version: {git_version!r} ({major!r}, {minor!r})")
        version = (int(digits_major.group()), int(digits_minor.group()))
    return version >= NATIVE_SINCE


# -- JSONPatch ---------------------------------------------------------------------------------------------------


def pointer(*parts: str) -> str:
    """A JSON Pointer (RFC 6901) to these keys: "~" becomes "~0" and "/" becomes "~1" in each."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def _append(ops: list[Obj], spec: Mapping[str, Any], key: str, items: Sequence[Obj]) -> None:
    """Ops adding `items` to the list spec[key]: the whole list when the pod has none, else one `/-` each."""
    if not items:
        return
    if not isinstance(spec.get(key), list):
        ops.append({"op": "add", "path": pointer("spec", key), "value": list(items)})
        return
    ops.extend({"op": "add", "path": pointer("spec", key) + "/-", "value": item} for item in items)


# -- the decision ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    outcome: str  # injected, skipped or denied (OUTCOMES; "error" is the server's, for a review it cannot answer)
    review: Obj  # the AdmissionReview to answer with
    reason: str  # a short why, for the log line
    namespace: str = ""
    pod: str = ""  # the pod's name, or its generateName followed by "*"
    mode: str | None = None  # native or plain, when injected
    problems: tuple[str, ...] = ()
    subject: About | None = None  # the pod's controller, or the pod: where an Event about a refusal goes
    dry_run: bool = False


def review(
    document: Any,
    *,
    template: SidecarTemplate,
    native: bool,
    own_namespace: str,
    deny_invalid: bool,
) -> Decision:
    """Answer one AdmissionReview. Raises BadReview when `document` is not one."""
    request = _request(document)
    uid: str = request["uid"]
    namespace = str(request.get("namespace") or "")
    pod = request.get("object")
    dry_run = request.get("dryRun") is True

    def decision(outcome: str, reason: str, response: Obj, **more: Any) -> Decision:
        answer = {"apiVersion": ADMISSION_VERSION, "kind": "AdmissionReview", "response": {"uid": uid, **response}}
        return Decision(outcome, answer, reason, namespace=namespace, dry_run=dry_run, **more)

    allowed: Obj = {"allowed": True}
    if not _is_pod_create(request):
        return decision("skipped", "not a pod create", allowed)
    if not isinstance(pod, dict):
        raise BadReview("request.object: a Pod CREATE without the pod")
    meta = _dict(pod.get("metadata"))
    namespace = namespace or str(meta.get("namespace") or "")
    name = _pod_name(meta)
    if namespace == own_namespace or namespace in NEVER_NAMESPACES:
        return decision("skipped", f"namespace {namespace} is never injected", allowed, pod=name)
    labels = _dict(meta.get("labels"))
    annotations = _dict(meta.get("annotations"))
    if labels.get(LABEL) != "true":
        return decision("skipped", f'not labelled {LABEL}: "true"', allowed, pod=name)
    if annotations.get(INJECT) == "false":
        return decision("skipped", f'{INJECT}: "false"', allowed, pod=name)
    spec = pod.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list):
        raise BadReview("request.object.spec.containers: a pod without containers")
    present = [c.get("name") for key in ("initContainers", "containers") for c in spec.get(key) or () if c]
    if template.container_name in present:
        return decision("skipped", "already injected", allowed, pod=name)

    shape = template.shape(native)
    container, volumes, problems = _build(shape, template, annotations, namespace, spec)
    subject = _subject(meta, namespace, name)
    if problems:
        message = _denial(name, namespace, problems)
        if deny_invalid:
            status = {"code": 400, "reason": "BadRequest", "message": message}
            response = {"allowed": False, "status": status}
        else:
            response = {"allowed": True, "warnings": [p[:240] for p in problems]}
        return decision("denied", "invalid annotations", response, pod=name, problems=tuple(problems), subject=subject)

    mode = "native" if native else "plain"
    ops: list[Obj] = []
    if not annotations and not isinstance(meta.get("annotations"), dict):
        ops.append({"op": "add", "path": pointer("metadata", "annotations"), "value": {INJECTED: mode}})
    else:
        ops.append({"op": "add", "path": pointer("metadata", "annotations", INJECTED), "value": mode})
    _append(ops, spec, "initContainers" if native else "containers", [container])
    _append(ops, spec, "volumes", volumes)
    patch = base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode("ascii")
    response = {"allowed": True, "patchType": "JSONPatch", "patch": patch}
    warnings = _warnings(native, spec, template.admin_port)
    if warnings:
        response["warnings"] = warnings
    return decision("injected", f"injected ({mode})", response, pod=name, mode=mode, subject=subject)


def _dict(value: Any) -> Obj:
    return value if isinstance(value, dict) else {}


def _request(document: Any) -> Obj:
    if not isinstance(document, dict):
        raise BadReview("not a JSON object")
    if document.get("apiVersion") != ADMISSION_VERSION or document.get("kind") != "AdmissionReview":
        found = f"{document.get('apiVersion')!r} {document.get('kind')!r}"
        raise BadReview(f"expected an {ADMISSION_VERSION} AdmissionReview, got {found}")
    request = document.get("request")
    if not isinstance(request, dict):
        raise BadReview("request: missing")
    if not isinstance(request.get("uid"), str) or not request["uid"]:
        raise BadReview("request.uid: missing")
    return request


def _is_pod_create(request: Obj) -> bool:
    kind = _dict(request.get("kind"))
    return (
        request.get("operation") == "CREATE"
        and kind.get("group", "") == ""
        and kind.get("kind") == "Pod"
        and not request.get("subResource")
    )


def _pod_name(meta: Obj) -> str:
    if meta.get("name"):
        return str(meta["name"])
    return f"{meta.get('generateName') or ''}*"


def _subject(meta: Obj, namespace: str, name: str) -> About:
    owners = [o for o in meta.get("ownerReferences") or () if isinstance(o, dict) and o.get("name") and o.get("kind")]
    owner = next((o for o in owners if o.get("controller") is True), owners[0] if owners else None)
    if owner is not None:
        return About(
            kind=str(owner["kind"]),
            api_version=str(owner.get("apiVersion") or "v1"),
            name=str(owner["name"]),
            namespace=namespace,
            uid=str(owner["uid"]) if owner.get("uid") else None,
        )
    return About(kind="Pod", api_version="v1", name=name.rstrip("*") or "unnamed", namespace=namespace)


def _denial(name: str, namespace: str, problems: Sequence[str]) -> str:
    return f"aml-auth-proxy was not injected into pod {namespace}/{name}: " + "; ".join(problems)


def _warnings(native: bool, spec: Obj, admin_port: int | None) -> list[str]:
    policy = spec.get("restartPolicy") or "Always"
    if native or policy == "Always":
        return []
    port = admin_port or 9090
    return [
        f"aml-auth-proxy is a plain container here (Kubernetes before 1.29): with restartPolicy {policy} the pod "
        f"completes only after the app calls POST http://127.0.0.1:{port}/quitquitquit when it is done"
    ]


def _build(
    shape: Shape, template: SidecarTemplate, annotations: Mapping[str, Any], namespace: str, spec: Obj
) -> tuple[Obj, list[Obj], list[str]]:
    """The pod's container and the volumes to add, from the template and the annotations; or the problems."""
    problems: list[str] = []
    container = copy.deepcopy(shape.container)
    volumes = [copy.deepcopy(v) for v in shape.volumes]

    for key in sorted(k for k in annotations if isinstance(k, str) and k.startswith(PREFIX) and k not in ANNOTATIONS):
        known = ", ".join(a.removeprefix(PREFIX) for a in ANNOTATIONS if a != INJECTED)
        problems.append(f"{key}: unknown annotation (known: {known})")
    inject = annotations.get(INJECT)
    if inject is not None and inject != "true":
        problems.append(f'{INJECT}: {inject!r} is neither "true" nor "false"')

    config = annotations.get(CONFIG)
    if config is None or config == "":
        problems.append(f"{CONFIG}: required: the name of a ConfigMap in namespace {namespace} with the config.yaml")
    elif not _is_name(config):
        problems.append(f"{CONFIG}: {config!r} is not a ConfigMap name (lower case letters, digits, '-' and '.')")
    else:
        for volume in volumes:
            if volume["name"] == shape.config_volume:
                volume["configMap"]["name"] = config

    secret = annotations.get(SECRET)
    if secret is not None and not _is_name(secret):
        problems.append(f"{SECRET}: {secret!r} is not a Secret name (lower case letters, digits, '-' and '.')")
    elif shape.secret_volume is not None:
        if secret:
            no_fs_group = not isinstance(spec.get("securityContext"), dict) or "fsGroup" not in spec["securityContext"]
            for volume in volumes:
                if volume["name"] == shape.secret_volume:
                    volume["secret"]["secretName"] = secret
                    if no_fs_group:  # root-owned files: 0440 would keep the non-root proxy out
                        volume["secret"]["defaultMode"] = SECRET_MODE_WITHOUT_FS_GROUP
        else:
            volumes = [v for v in volumes if v["name"] != shape.secret_volume]
            mounts = container.get("volumeMounts") or []
            container["volumeMounts"] = [m for m in mounts if m.get("name") != shape.secret_volume]
    elif secret:
        problems.append(f"{SECRET}: the sidecar template mounts no Secret")

    image = annotations.get(IMAGE)
    if image is not None:
        if not isinstance(image, str) or len(image) > 1024 or not _IMAGE.match(image):
            problems.append(f"{IMAGE}: {image!r} is not an image reference (registry/name:tag or @sha256:...)")
        else:
            container["image"] = image

    problems.extend(_resources(container, annotations))
    problems.extend(_port_clashes(template, spec))
    volumes, clashes = _new_volumes(volumes, spec)
    problems.extend(clashes)
    return container, volumes, problems


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 253 and bool(_DNS_SUBDOMAIN.match(value))


def _resources(container: Obj, annotations: Mapping[str, Any]) -> list[str]:
    """Apply the resource annotations over the template's resources; the problems (a bad quantity, a limit below
    its request, which the API server would refuse less clearly)."""
    problems: list[str] = []
    resources = _dict(container.get("resources"))
    resources = {k: dict(v) for k, v in resources.items() if isinstance(v, dict)}
    source: dict[tuple[str, str], str] = {}
    for annotation, (kind, resource) in RESOURCE_ANNOTATIONS.items():
        value = annotations.get(annotation)
        if value is None:
            continue
        amount = parse_quantity(value) if isinstance(value, str) else None
        if amount is None:
            problems.append(f"{annotation}: {value!r} is not a Kubernetes quantity (e.g. 100m, 0.5, 128Mi, 1Gi)")
            continue
        if kind == "limits" and amount == 0:
            problems.append(f"{annotation}: a limit of 0 would leave the proxy nothing")
            continue
        resources.setdefault(kind, {})[resource] = value
        source[(kind, resource)] = annotation
    for resource in ("cpu", "memory"):
        request = resources.get("requests", {}).get(resource)
        limit = resources.get("limits", {}).get(resource)
        if request is None or limit is None:
            continue
        low, high = parse_quantity(str(request)), parse_quantity(str(limit))
        if low is None or high is None or low <= high:
            continue
        said = {k: source.get((k, resource), f"the chart's resources.{k}.{resource}") for k in ("requests", "limits")}
        if ("limits", resource) in source:
            problems.append(
                f"{source[('limits', resource)]}: {limit} is below the {resource} request {request} "
                f"({said['requests']}); Kubernetes refuses a limit below its request"
            )
        else:
            problems.append(
                f"{source[('requests', resource)]}: {request} is above the {resource} limit {limit} "
                f"({said['limits']}); set {PREFIX}{resource}-limit too"
            )
    if resources:
        container["resources"] = {k: v for k, v in resources.items() if v}
    return problems


def _port_clashes(template: SidecarTemplate, spec: Obj) -> list[str]:
    port = template.admin_port
    if port is None:
        return []
    out = []
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or ():
            if isinstance(c, dict) and any(
                isinstance(p, dict) and p.get("containerPort") == port for p in c.get("ports") or ()
            ):
                out.append(
                    f"container {c.get('name')!r} declares port {port}, the proxy's admin port (probes, /metrics): "
                    f"the containers of a pod share its ports"
                )
    return out


def _new_volumes(volumes: list[Obj], spec: Obj) -> tuple[list[Obj], list[str]]:
    """The proxy's volumes the pod lacks; a volume of the pod with one of their names but other content is a
    problem (its containers would mount the wrong thing, or the proxy would)."""
    existing = {v.get("name"): v for v in spec.get("volumes") or () if isinstance(v, dict)}
    new, problems = [], []
    for volume in volumes:
        found = existing.get(volume["name"])
        if found is None:
            new.append(volume)
        elif found != volume:
            problems.append(
                f"the pod already has a volume named {volume['name']!r} that is not the proxy's; rename it "
                f"(the proxy's volumes: {', '.join(v['name'] for v in volumes)})"
            )
    return new, problems
