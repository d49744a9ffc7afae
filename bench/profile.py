"""`--profile`: sample the proxy with py-spy during a GET load; summarise own time per function and per package."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*)\)$")


def py_spy_argv(py_spy: str, pid: int, out: Path, seconds: float, *, native: bool) -> list[str]:
    argv = [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "250"]
    argv += ["--format", "raw", "--nolineno", "--output", str(out)]
    return [*argv, "--native"] if native else argv


_CHECKOUT = str(Path(__file__).resolve().parent.parent) + "/"
_COMPILED = re.compile(r"^CPy(?:Def|Py)_(?P<module>[a-z_]+?)___(?P<rest>\w+)$")


def _frame(func: str, file: str) -> tuple[str, str]:
    """(function, file) of a frame; a function compiled by mypyc (a C symbol such as
    CPyDef_upstream___UpstreamPool____head) is named as in its source: UpstreamPool._head in proxy/upstream.py."""
    match = _COMPILED.match(func)
    if match is None or not file.endswith((".c", ".so", ".h")):
        return func, file
    return match.group("rest").replace("___", "."), f"proxy/{match.group('module')}.py, compiled"


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3.", _CHECKOUT):
        if marker in file:
            file = file.split(marker, 1)[1]
            if marker == "/lib/python3.":
                file = "stdlib:" + file.split("/", 1)[1]
            break
    return file


def _package(file: str) -> str:
    short = _short(file)
    if short.startswith("stdlib:"):
        return "stdlib " + short[7:].split("/", 1)[0].removesuffix(".py")
    if "/" in short:
        return short.split("/", 1)[0]
    if short.endswith(".py"):
        return short.removesuffix(".py")
    return short or "?"


def _stacks(collapsed: Path) -> Iterator[tuple[str, int]]:
    """(stack "a;b;c", samples) per line of py-spy's raw output."""
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            yield stack, int(count_text)


def summarise(collapsed: Path, top: int = 15) -> tuple[list[tuple[str, float]], list[tuple[str, float]], int]:
    """(top functions by own time, own time per package, samples) from py-spy's raw (collapsed stack) output."""
    own: Counter[str] = Counter()
    per_package: Counter[str] = Counter()
    total = 0
    for stack, count in _stacks(collapsed):
        leaf = stack.rsplit(";", 1)[-1]
        match = _FRAME.match(leaf)
        func, file = _frame(match.group("func"), match.group("file")) if match else (leaf, "?")
        own[f"{func} ({_short(file)})"] += count
        per_package[_package(file)] += count
        total += count
    if not total:
        return [], [], 0
    shares = [(name, 100.0 * n / total) for name, n in own.most_common(top)]
    packages = [(name, 100.0 * n / total) for name, n in per_package.most_common(12)]
    return shares, packages, total


def summarise_inclusive(collapsed: Path, marker: str, top: int = 12) -> list[tuple[str, float]]:
    """Share of samples with each function whose file contains `marker` anywhere on the stack."""
    inclusive: Counter[str] = Counter()
    total = 0
    for stack, count in _stacks(collapsed):
        total += count
        for frame in set(stack.split(";")):
            match = _FRAME.match(frame)
            if match is None:
                continue
            func, file = _frame(match.group("func"), match.group("file"))
            if marker in file:
                inclusive[f"{func} ({_short(file)})"] += count
    return [(name, 100.0 * n / total) for name, n in inclusive.most_common(top)] if total else []


def record(argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
