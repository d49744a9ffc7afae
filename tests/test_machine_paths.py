"""No file that runs or builds the project names a place on this machine outside the checkout.

A literal path to a venv in the temp folder, a tool under /opt or a home folder, or to this checkout itself makes
a test pass on the machine where it was written and fail on every other one. The scan covers proxy/, tests/,
bench/, scripts/, the Makefile and .ci/. The image's and the pod's own paths (those the Dockerfile and the chart
define) are not this machine's and may be asserted; so may the paths the operating system itself defines.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("proxy", "tests", "bench", "scripts", "Makefile", ".ci")
SKIPPED_DIRS = {"__pycache__", "results", "build"}  # bench/results holds measured output, not code

# An absolute path: a slash not preceded by anything that makes it part of a URL, a relative path, a variable or
# a template (`http://h/x`, `proxy/x`, `$ROOT/x`, `{base}/x`, `~/x`).
_PATH = re.compile(r"(?<![\w.:/~$@%{}\])>*-])(?:/[\w.@+-]+)+/?")

# Where a machine keeps its own leftovers: the temp folder, add-on software, home folders, mounts. Any path
# below one of these is this machine's, whether or not it exists here.
MACHINE_ROOTS = (
    "/tmp",
    "/var/tmp",
    "/dev/shm",
    "/opt",
    "/home",
    "/root",
    "/Users",
    "/usr/local",
    "/srv",
    "/mnt",
    "/media",
    "/snap",
    "/nix",
    "/private",
)
# Paths the operating system defines the same way on every machine the project supports.
SYSTEM = ("/proc", "/sys", "/dev/null", "/bin", "/usr/bin", "/var/lib/apt/lists", "/etc/ssl/certs")


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def image_paths() -> set[str]:
    """The container's own paths: every absolute path the Dockerfile or the chart's templates name."""
    sources = [ROOT / "Dockerfile", *sorted((ROOT / "charts").rglob("*.yaml")), *(ROOT / "charts").rglob("*.tpl")]
    found: set[str] = set()
    for source in sources:
        found.update(m.group(0).rstrip("/") for m in _PATH.finditer(source.read_text(encoding="utf-8")))
    return found


def machine_roots() -> tuple[str, ...]:
    """MACHINE_ROOTS, and wherever this machine puts its temp folder, its home and the checkout's parent."""
    home = os.path.expanduser("~")
    extra = {tempfile.gettempdir(), str(ROOT.parent)} | ({home} if home not in ("/", "~") else set())
    return MACHINE_ROOTS + tuple(sorted(extra - {"/"}))


def is_machine_path(path: str, *, roots: tuple[str, ...], image: set[str]) -> bool:
    path = path.rstrip("/")
    if os.path.normpath(path or "/") == "/":
        return False  # "/", "/../": a pattern, not a place
    if path in image or any(_under(path, [p]) for p in image if p.count("/") >= 2):
        return False  # the image's own: /opt/aml-auth-proxy/bin/pip (a bare /tmp must match exactly)
    if _under(path, SYSTEM):
        return False
    if any(path.startswith(root.rstrip("/") + "/") for root in roots):
        return True
    # Anywhere else on this machine: a path that names something here (an HTTP path such as /score does not).
    return path not in roots and os.path.lexists(path)


def scanned_files() -> Iterator[Path]:
    for name in SCANNED:
        top = ROOT / name
        if top.is_file():
            yield top
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith(".")]
            for filename in filenames:
                if not filename.endswith((".so", ".c", ".h", ".pyc", ".o")):
                    yield Path(dirpath) / filename


def machine_paths_in(text: str, *, roots: tuple[str, ...], image: set[str]) -> list[tuple[int, str]]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in _PATH.finditer(line):
            if is_machine_path(match.group(0), roots=roots, image=image):
                found.append((number, match.group(0)))
    return found


def test_no_file_names_a_path_of_this_machine_outside_the_checkout() -> None:
    roots, image = machine_roots(), image_paths()
    problems = []
    count = 0
    for path in scanned_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        count += 1
        for number, literal in machine_paths_in(text, roots=roots, image=image):
            problems.append(f"{path.relative_to(ROOT)}:{number}: {literal}")
    assert count > 100, count  # the scan saw the tree, not an empty folder
    assert not problems, "literal paths outside the checkout (use tmp_path, the checkout or a variable):\n" + "\n".join(
        problems
    )


def test_the_scan_catches_the_temp_folder_home_opt_and_the_checkout_itself() -> None:
    roots, image = machine_roots(), image_paths()
    temp = tempfile.gettempdir()
    for literal in (
        f'AZMLINFSRV = "{temp}/amlvenv/bin/azmlinfsrv"',
        'tool = "' + "/opt" + '/tools/helm"',
        "cd " + os.path.expanduser("~") + "/venvs/sdk && ./run",
        f'marker = "{ROOT}/"',
        'ca = "' + "/usr/local" + '/share/ca.pem"',
    ):
        assert machine_paths_in(literal, roots=roots, image=image), literal
    # The image's and the pod's own paths, the OS's, URLs, HTTP paths and relative paths are not this machine's.
    for literal in (
        'assert install_cmd[:2] == ["/opt/aml-auth-proxy/bin/pip", "install"]',
        'assert mounts["tmp"]["mountPath"] == "/tmp"',
        'open(f"/proc/{pid}/maps")',
        "#!/usr/bin/env bash",
        'url = "https://127.0.0.1:8443/api/v1/service/demo"',
        'path = "/api/v1/service/demo/score"',
        'keys = "proxy/emulator/models"',
    ):
        assert not machine_paths_in(literal, roots=roots, image=image), literal
