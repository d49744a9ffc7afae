"""Generate the `config` part of the Helm chart's values.schema.json from the proxy's own schema.

The chart value `config` is the proxy's config file, so its JSON schema is derived from the tables the proxy
validates with (`TOP_LEAVES` and `ROUTE_LEAVES` in proxy/config/schema.py): one nested object per dotted key prefix,
unknown keys refused at every level (as the proxy refuses them), JSON types from the leaf kinds, enums, ranges
and descriptions from the leaves. A few differences are the chart's own (CHART_OMITTED, CHART_OVERRIDES). The
rest of values.schema.json, everything outside `properties.config`, is written by hand and kept as it is.

    python scripts/chart_schema.py          # rewrite charts/aml-auth-proxy/values.schema.json
    python scripts/chart_schema.py --check  # exit 1 when the file differs from what would be written
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.config.schema import REQUIRED, ROUTE_LEAVES, TOP_LEAVES, Leaf  # noqa: E402
from scripts import generated  # noqa: E402

SCHEMA_FILE = ROOT / "charts" / "aml-auth-proxy" / "values.schema.json"

Schema = dict[str, Any]

# Keys of the proxy that the chart refuses: it sets `kubernetes.events` itself from `events.enabled`
# (templates/_helpers.tpl, "aml-auth-proxy.configFile"), which would overwrite a value given under `config`.
CHART_OMITTED = frozenset({"kubernetes.events"})

# Where the chart is stricter than the proxy, replacing what the leaf gives. A pod needs fixed ports (the app, the
# probes, the Services and Prometheus use them), so port 0 (any free port) is refused; the Secrets' namespace is
# a Kubernetes namespace name.
CHART_OVERRIDES: dict[str, Schema] = {
    "listen.port": {
        "minimum": 1,
        "description": "Proxy port; the app in the pod calls http://127.0.0.1:<port>.",
    },
    "admin.port": {
        "minimum": 1,
        "description": "Admin port (/healthz, /readyz, /metrics), reached by the kubelet probes and Prometheus.",
    },
    "kubernetes.namespace": {
        "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        "maxLength": 63,
    },
}

# Descriptions of the objects that have no leaf of their own ("" is `config` itself).
SECTION_DESCRIPTIONS: dict[str, str] = {
    "": "The proxy's config file (docs/configuration.md).",
    "kubernetes": "The proxy's kubernetes.* keys (docs/configuration.md); events comes from events.enabled.",
    "routes": "The proxy's routes (docs/configuration.md); the proxy checks what depends on auth.type.",
}

# JSON types of the leaf kinds; an "opt" kind also allows null.
_JSON_TYPES = {"str": "string", "enum": "string", "int": "integer", "float": "number", "bool": "boolean"}


def leaf_schema(leaf: Leaf) -> Schema:
    """The JSON schema of one value, as `_convert` in proxy/config/reader.py checks it."""
    nullable = leaf.value_type.startswith("opt")
    base = leaf.value_type[3:] if nullable else leaf.value_type
    if base not in _JSON_TYPES:
        raise ValueError(f"{leaf.key}: kind {leaf.value_type!r} has no JSON type; add it to _JSON_TYPES")
    json_type = _JSON_TYPES[base]
    schema: Schema = {"type": [json_type, "null"] if nullable else json_type}
    if base == "enum":
        schema["enum"] = list(leaf.choices)
    if base == "str":
        schema["minLength"] = 1  # the proxy refuses an empty string
    if base in ("int", "float"):
        if leaf.minimum is not None:
            schema["minimum"] = leaf.minimum
        if leaf.maximum is not None:
            schema["maximum"] = leaf.maximum
    schema["description"] = leaf.doc
    return schema


def object_schema(leaves: tuple[Leaf, ...], *, prefix: str, omitted: frozenset[str]) -> Schema:
    """A closed object (the proxy refuses unknown keys at every level) holding the leaves' dotted keys.

    `prefix` is the dotted path of the object in `config`, used for CHART_OVERRIDES, CHART_OMITTED and
    SECTION_DESCRIPTIONS. Properties keep the order of first appearance in the table.
    """
    groups: dict[str, list[Leaf]] = {}
    for leaf in leaves:
        if prefix + leaf.key in omitted:
            continue
        head = leaf.key.split(".", 1)[0]
        groups.setdefault(head, []).append(leaf)
    properties: Schema = {}
    required: list[str] = []
    for head, members in groups.items():
        path = prefix + head
        if len(members) == 1 and members[0].key == head:
            leaf = members[0]
            value = {**leaf_schema(leaf), **CHART_OVERRIDES.get(path, {})}
            value["description"] = value.pop("description")  # last, after the constraints
            properties[head] = value
            if leaf.default is REQUIRED:
                required.append(head)
            continue
        if any(leaf.key == head for leaf in members):
            raise ValueError(f"{path} is both a value and a section")
        inner = tuple(dataclasses.replace(leaf, key=leaf.key.split(".", 1)[1]) for leaf in members)
        properties[head] = object_schema(inner, prefix=path + ".", omitted=omitted)
    schema: Schema = {"type": "object", "additionalProperties": False}
    description = SECTION_DESCRIPTIONS.get(prefix.rstrip("."))
    if description is not None:
        schema["description"] = description
    schema["properties"] = properties
    if required:
        schema["required"] = required
    return schema


def config_schema(
    top_leaves: tuple[Leaf, ...] | None = None,
    route_leaves: tuple[Leaf, ...] | None = None,
) -> Schema:
    """The schema of the chart value `config`: the top-level keys, then `routes`, a list of routes.

    The leaves default to the proxy's tables (looked up at each call). The list of routes may be empty here: the
    chart's own `fail` says that a route is needed, more readably.
    """
    schema = object_schema(TOP_LEAVES if top_leaves is None else top_leaves, prefix="", omitted=CHART_OMITTED)
    route_table = ROUTE_LEAVES if route_leaves is None else route_leaves
    route = object_schema(route_table, prefix="routes.", omitted=CHART_OMITTED)
    route.pop("description", None)
    schema["properties"]["routes"] = {
        "type": "array",
        "description": SECTION_DESCRIPTIONS["routes"],
        "items": route,
    }
    return schema


def render(current: str, config: Schema) -> str:
    """The whole values.schema.json: `current` with its `properties.config` replaced, in the file's format."""
    document = json.loads(current)
    if not isinstance(document.get("properties"), dict) or "config" not in document["properties"]:
        raise ValueError("values.schema.json has no properties.config to replace")
    document["properties"]["config"] = config  # keeps its place among the hand-written properties
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    return generated.main(
        SCHEMA_FILE, lambda current: render(current, config_schema()), script="scripts/chart_schema.py", argv=argv
    )


if __name__ == "__main__":
    sys.exit(main())
