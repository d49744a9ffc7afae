"""The layers of proxy/ ([tool.importlinter] in pyproject.toml, README "Layout"): `make lint` runs lint-imports on
the tree; here the contract is shown to hold today and to break on an import that runs back up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.tools import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports with `tree`'s pyproject.toml, importing `proxy` from `tree` (it puts its working folder first)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def copy_tree(dest: Path) -> Path:
    shutil.copytree(ROOT / "proxy", dest / "proxy", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_layers_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_import_that_runs_back_up_breaks_the_contract_and_is_named(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    upstream = tree / "proxy" / "upstream.py"
    text = upstream.read_text()
    upstream.write_text(text.replace("import httptools\n", "import httptools\n\nimport proxy.credentials.base\n", 1))
    result = lint_imports(tree)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "proxy.upstream is not allowed to import proxy.credentials" in result.stdout
    # The copy without the planted import is clean: it is the import that breaks it, not the copy.
    upstream.write_text(text)
    assert lint_imports(tree).returncode == 0
