"""Write a directory the way kubelet updates a mounted Secret, so file-watching code meets the real layout.

kubelet's AtomicWriter keeps the payload in a hidden timestamped directory, points `..data` at it, and exposes
each key as `key -> ..data/key`. An update writes a new timestamped directory, points `..data_tmp` at it and
renames `..data_tmp` over `..data` (one atomic step), then fixes the top-level links and removes the old
directory. A reader that opens `path/key` sees either the whole old payload or the whole new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

DATA_DIR = "..data"
DATA_TMP = "..data_tmp"


def _check_key(key: str) -> None:
    if not key or key.startswith("..") or "/" in key or "\\" in key or key in (".", "..") or "\0" in key:
        raise ValueError(f"invalid secret key {key!r}: it must be a plain file name not starting with '..'")


def _timestamp_prefix() -> str:
    now = time.time()
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime(now))
    return f"..{stamp}."


def _current_payload_dir(root: Path) -> str | None:
    try:
        target = os.readlink(root / DATA_DIR)
    except (FileNotFoundError, OSError):
        return None
    return target if target.startswith("..") and "/" not in target else None


def write_private(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write a file that holds a secret: created with mode 0600 (never readable by others, not even briefly)."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def write_secret_dir(path: str | os.PathLike[str], data: Mapping[str, str | bytes], *, file_mode: int = 0o600) -> None:
    """Make `path` hold exactly `data` (key -> content), switching over atomically like kubelet does.

    Files get `file_mode` (0600 by default: these are keys on a developer's machine; kubelet's default is 0644).
    """
    root = Path(path)
    for key in data:
        _check_key(key)
    root.mkdir(parents=True, exist_ok=True)

    old_dir = _current_payload_dir(root)
    old_keys: set[str] = set()
    if old_dir is not None and (root / old_dir).is_dir():
        old_keys = {entry.name for entry in (root / old_dir).iterdir()}

    new_dir = Path(tempfile.mkdtemp(prefix=_timestamp_prefix(), dir=root))
    try:
        new_dir.chmod(0o755)
        for key, content in data.items():
            raw = content.encode() if isinstance(content, str) else bytes(content)
            fd = os.open(new_dir / key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(raw)
            os.chmod(new_dir / key, file_mode)  # the umask may have narrowed it

        tmp_link = root / DATA_TMP
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        os.symlink(new_dir.name, tmp_link)
        os.rename(tmp_link, root / DATA_DIR)
    except BaseException:
        shutil.rmtree(new_dir, ignore_errors=True)
        raise

    for key in data:
        visible = root / key
        if not visible.is_symlink():
            os.symlink(f"{DATA_DIR}/{key}", visible)
    for key in old_keys - set(data):
        visible = root / key
        if visible.is_symlink():
            visible.unlink()

    if old_dir is not None and old_dir != new_dir.name:
        shutil.rmtree(root / old_dir, ignore_errors=True)
