"""Secrets read from files (keys, ML Server sign-ins, a JWT, a client secret): the one reader with the rules every
secret obeys, and the signature that tells a changed file (kubelet's atomic symlink swap included) from one left
alone."""

from __future__ import annotations

import os
import stat

MAX_SECRET_BYTES = 16384
FileSignature = tuple[int, int, int, int, int, int]  # dev, inode, mtime (ns), size, ctime (a chmod), mode


class SecretFileError(Exception):
    """A secret file cannot be used; the message never contains the file's content."""


def read_secret_file(path: str) -> str:
    """Read one secret: surrounding whitespace (a trailing newline) trimmed, control characters refused."""
    try:
        # O_NONBLOCK: a FIFO put in the key's place must not block the event loop on open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SecretFileError("not a regular file")
            data = fh.read(MAX_SECRET_BYTES + 1)
    except FileNotFoundError as exc:
        raise SecretFileError("file not found") from exc
    except PermissionError as exc:
        raise SecretFileError("permission denied") from exc
    except IsADirectoryError as exc:
        raise SecretFileError("is a directory") from exc
    except OSError as exc:
        raise SecretFileError(f"cannot read: {exc.strerror}") from exc
    return validate_secret(data)


def validate_secret(data: bytes | str) -> str:
    """The rules every secret obeys, wherever it comes from (a file, a Kubernetes Secret): at most 16 KiB of ASCII,
    surrounding whitespace (a trailing newline) trimmed, not empty, no control characters."""
    if len(data) > MAX_SECRET_BYTES:
        raise SecretFileError(f"larger than {MAX_SECRET_BYTES} bytes")
    try:
        key = (data.decode("ascii") if isinstance(data, bytes) else data.encode("ascii").decode("ascii")).strip()
    except (UnicodeDecodeError, UnicodeEncodeError) as exc:
        raise SecretFileError("not ASCII text") from exc
    if not key:
        raise SecretFileError("empty")
    if not key.isprintable():
        raise SecretFileError("contains control characters")
    return key


def file_signature(path: str) -> FileSignature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns, st.st_mode)
