"""Deliberate weakenings of the proxy, each paired with the tests that must then fail.

Every `tests/**/mutants.py` defines `MUTANTS: list[Mutant]`. `make mutants` (scripts/mutate.py) copies the
checkout, applies one mutant at a time (the `old` text must occur exactly once in `path`), runs the listed
tests against the weakened copy and reports a mutant as killed when they fail. It proves the tests test
something: a test that still passes against a proxy without the behaviour it names is not worth having.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the checkout, e.g. "proxy/forwarding.py"
    old: str  # exact text, present exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the checkout
