"""Every deliberate weakening that `make mutants` applies still applies: its `old` text occurs exactly once in
its file. (Running each mutant's tests is `make mutants`; this keeps the list from going stale in `make test`.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_mutant_still_applies_to_exactly_one_place() -> None:
    spec = importlib.util.spec_from_file_location("_mutate", ROOT / "scripts" / "mutate.py")
    assert spec is not None and spec.loader is not None
    mutate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutate)
    mutants = mutate.load_mutants()
    assert len(mutants) >= 80
    stale = [
        f"{src}: {m.name} ({(ROOT / m.path).read_text().count(m.old)} matches in {m.path})"
        for src, m in mutants
        if (ROOT / m.path).read_text().count(m.old) != 1
    ]
    assert not stale, stale
    for _src, m in mutants:
        for test in m.tests:
            assert (ROOT / test.split("::")[0]).is_file(), test
