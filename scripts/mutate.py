"""Run every deliberate weakening in tests/**/mutants*.py and check that its tests fail (see tests/mutation.py).

Each mutant is applied to a fresh copy of the checkout (never to the checkout itself); the listed tests run there
with the copy first on PYTHONPATH, so proxy subprocesses import the weakened code too. Exit 1 when a mutant
survives (its tests still pass) or no longer applies (its `old` text is gone or ambiguous).

    python scripts/mutate.py [-k SUBSTRING] [--list]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.mutation import Mutant  # noqa: E402

_COPY = ("proxy", "tests", "pyproject.toml", "charts", "docs", "README.md", "Dockerfile", "CHANGELOG.md")


def load_mutants() -> list[tuple[str, Mutant]]:
    found: list[tuple[str, Mutant]] = []
    for path in sorted(ROOT.glob("tests/**/mutants*.py")):
        spec = importlib.util.spec_from_file_location(f"_mutants_{len(found)}_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found.extend((str(path.relative_to(ROOT)), m) for m in module.MUTANTS)
    return found


def make_copy(dest: Path) -> None:
    for name in _COPY:
        src = ROOT / name
        if src.is_dir():
            # No compiled modules: they would shadow the mutated sources (the copy runs pure Python).
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        elif src.exists():
            shutil.copy2(src, dest / name)


def run_one(m: Mutant, work: Path) -> tuple[str, float]:
    """'killed', 'SURVIVED' or 'STALE: why'; and the seconds taken."""
    target = work / m.path
    text = target.read_text()
    count = text.count(m.old)
    if count != 1:
        return f"STALE: the old text occurs {count} times in {m.path}", 0.0
    original = text
    target.write_text(text.replace(m.old, m.new))
    env = dict(os.environ, PYTHONPATH=str(work), PYTHONDONTWRITEBYTECODE="1")
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        return "killed (timed out)", time.monotonic() - started
    finally:
        target.write_text(original)
    elapsed = time.monotonic() - started
    if proc.returncode == 1:
        return "killed", elapsed
    if proc.returncode == 0:
        return "SURVIVED", elapsed
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return f"STALE: pytest exit {proc.returncode}: {' | '.join(tail)}", elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only mutants whose name or mutants file contains this")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args()
    mutants = [(src, m) for src, m in load_mutants() if args.k in m.name or args.k in src]
    if args.list:
        for src, m in mutants:
            print(f"{src}: {m.name}  [{m.path}] -> {', '.join(m.tests)}")
        return 0
    bad = 0
    with tempfile.TemporaryDirectory(prefix="aml-auth-proxy-mutants-") as tmp:
        work = Path(tmp)
        make_copy(work)
        print(f"{len(mutants)} mutants, each against a copy in {work}")
        for src, m in mutants:
            verdict, elapsed = run_one(m, work)
            bad += not verdict.startswith("killed")
            print(f"{verdict:<9} {elapsed:6.1f}s  {m.name}  ({src})", flush=True)
    print(f"{len(mutants) - bad} of {len(mutants)} mutants killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
