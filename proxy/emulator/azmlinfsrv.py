"""Run the real AML scoring server (azmlinfsrv, from azureml-inference-server-http) with the sample model.

The server is a separate install (it pins its own Flask and gunicorn), so it is found through the `executable`
argument, then the AZMLINFSRV environment variable, then PATH. It binds 0.0.0.0 (gunicorn's choice); talk to it
on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import aiohttp

ENTRY_SCRIPT = Path(__file__).resolve().parent / "models" / "score.py"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


class AzmlinfsrvError(RuntimeError):
    """azmlinfsrv could not be found or did not become healthy."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_executable(executable: str | None = None) -> str:
    candidate = executable or os.environ.get("AZMLINFSRV") or shutil.which("azmlinfsrv")
    if not candidate:
        raise AzmlinfsrvError("azmlinfsrv not found: pass executable=, set AZMLINFSRV or put it on PATH")
    if not os.access(candidate, os.X_OK):
        raise AzmlinfsrvError(f"azmlinfsrv at {candidate!r} is not an executable file")
    return candidate


class AzmlinfsrvProcess:
    """A running azmlinfsrv; `url` is its base URL on loopback."""

    def __init__(self, *, process: asyncio.subprocess.Process, port: int, workdir: Path) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.workdir = workdir
        self.log_path = workdir / "azmlinfsrv.log"

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    async def wait_healthy(self, *, within: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + within
        client_timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=client_timeout) as session:
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise AzmlinfsrvError(
                        f"azmlinfsrv exited with {self.process.returncode} before it was healthy:\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    async with session.get(self.url + "/") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise AzmlinfsrvError(f"azmlinfsrv was not healthy within {within:.0f} s:\n{self.log_tail()}")

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL to its process group after STOP_TIMEOUT; removes the model directory."""
        try:
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
                except TimeoutError:
                    # The group is the one this process leads (start_new_session): gunicorn and its workers.
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.process.pid, signal.SIGKILL)
                    await self.process.wait()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _open_log(path: Path) -> BinaryIO:
    # The child inherits the descriptor and keeps writing after the parent closes its copy.
    return path.open("wb")


async def start_azmlinfsrv(*, port: int = 0, executable: str | None = None) -> AzmlinfsrvProcess:
    """Start azmlinfsrv with the packaged sample score.py on `port` (0: a free one) and wait until it is healthy."""
    binary = find_executable(executable)
    if port == 0:
        port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="azmlinfsrv-"))
    model_dir = workdir / "model"
    model_dir.mkdir()
    log_file = _open_log(workdir / "azmlinfsrv.log")
    try:
        process = await asyncio.create_subprocess_exec(
            binary,
            "--entry_script",
            str(ENTRY_SCRIPT),
            "--model_dir",
            str(model_dir),
            "--port",
            str(port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
        )
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        log_file.close()
    server = AzmlinfsrvProcess(process=process, port=port, workdir=workdir)
    try:
        await server.wait_healthy()
    except BaseException:
        await server.stop()
        raise
    return server
