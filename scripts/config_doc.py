"""Generate docs/configuration.md's key tables from the proxy's schema (proxy/config/schema.py).

Each table sits between `<!-- config-table:top -->` (or `:routes`) and `<!-- /config-table -->`; everything
else in the page is written by hand and kept as it is. A row: the key, its default (or which auth types require
it), its environment variable, which auth types use it, and its doc from the schema, with the allowed values
and a link to the section that says more.

    python scripts/config_doc.py          # rewrite docs/configuration.md's tables
    python scripts/config_doc.py --check  # exit 1 when the page differs from what would be written
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.config.schema import REQUIRED, ROUTE_LEAVES, TOP_LEAVES, Leaf, env_name  # noqa: E402
from scripts import generated  # noqa: E402

DOC_FILE = ROOT / "docs" / "configuration.md"
_TABLE = re.compile(r"(<!-- config-table:(top|routes) -->\n)(.*?)(<!-- /config-table -->)", re.S)


def default_text(leaf: Leaf) -> str:
    if leaf.doc_default is not None:
        return leaf.doc_default
    if leaf.default is REQUIRED:
        return "required"
    if leaf.default is None and leaf.required_for:
        return "required for " + ", ".join(leaf.required_for)
    if leaf.default is None:
        return "null"
    if isinstance(leaf.default, bool):
        return "true" if leaf.default else "false"
    return f"`{leaf.default}`"


def meaning(leaf: Leaf) -> str:
    text = leaf.doc
    if leaf.choices:
        text += f" Allowed: {', '.join(leaf.choices)}."
    if leaf.see:
        text += f" See {leaf.see}."
    return text.replace("|", "\\|")


def table(section: str) -> str:
    lines: list[str]
    row: tuple[str, ...]
    if section == "top":
        lines = ["| key | default | environment variable | meaning |", "|---|---|---|---|"]
        for leaf in TOP_LEAVES:
            row = (f"`{leaf.key}`", default_text(leaf), f"`{env_name(leaf.key, route=False)}`", meaning(leaf))
            lines.append("| " + " | ".join(row) + " |")
    else:
        lines = [
            "| key | default | environment variable | used by auth types | meaning |",
            "|---|---|---|---|---|",
        ]
        for leaf in ROUTE_LEAVES:
            used_by = "all" if leaf.auth_types is None else ", ".join(leaf.auth_types)
            row = (
                f"`routes[].{leaf.key}`",
                default_text(leaf),
                f"`{env_name(leaf.key, route=True)}`",
                used_by,
                meaning(leaf),
            )
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def render(current: str) -> str:
    """The whole page with each generated table replaced."""
    found = {m.group(2) for m in _TABLE.finditer(current)}
    if found != {"top", "routes"}:
        raise ValueError(f"{DOC_FILE.name}: expected the markers of the top and routes tables, found {sorted(found)}")
    return _TABLE.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(4), current)


def main(argv: list[str] | None = None) -> int:
    return generated.main(DOC_FILE, render, script="scripts/config_doc.py", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
