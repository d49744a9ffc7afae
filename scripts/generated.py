"""The write-or-check step of the scripts that generate a committed file from the proxy's schema."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(path: Path, render: Callable[[str], str], *, script: str, argv: list[str] | None = None) -> int:
    """`render(current text) -> wanted text`; write it, or with --check exit 1 when the file differs."""
    parser = argparse.ArgumentParser(description=f"Generate {path.relative_to(ROOT)} from proxy/config/schema.py.")
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs (no write)")
    args = parser.parse_args(argv)
    current = path.read_text(encoding="utf-8")
    wanted = render(current)
    name = path.relative_to(ROOT)
    if args.check:
        if current != wanted:
            print(f"{name} is out of date with proxy/config/schema.py: run {script}", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        path.write_text(wanted, encoding="utf-8")
        print(f"wrote {name}")
    return 0
