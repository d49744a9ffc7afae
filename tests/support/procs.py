"""The proxy as users run it: the `aml-auth-proxy` console script in a subprocess, logs to a scanned file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.support.session import subprocess_log
from tests.support.tools import ROOT

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("aml-auth-proxy"))


class ProxyProcess:
    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.proxy_url = ""
        self.admin_url = ""
        self.config: dict[str, Any] = {}  # what start() wrote, for tests that need to know the upstreams

    @classmethod
    async def start(
        cls,
        config: dict[str, Any],
        tmp_path: Path,
        *,
        name: str = "proxy",
        argv_prefix: tuple[str, ...] = (),
        args: tuple[str, ...] = (),
    ) -> ProxyProcess:
        # One process unless the caller asks for workers: tests measure a process's RSS and fds.
        doc = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "workers": 1,
            **config,
        }
        config_path = tmp_path / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(doc))
        process = await cls.start_file(config_path, name=name, argv_prefix=argv_prefix, args=args)
        process.config = doc
        return process

    @classmethod
    async def start_file(
        cls,
        config_path: Path,
        *,
        name: str = "proxy",
        argv_prefix: tuple[str, ...] = (),
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> ProxyProcess:
        """`aml-auth-proxy run --config config_path`, with `env` added to the environment; waits until listening."""
        log_path = subprocess_log(name)
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *argv_prefix,
                CONSOLE_SCRIPT,
                "run",
                "--config",
                str(config_path),
                *args,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        self = cls(process, log_path)
        async with asyncio.timeout(30):
            while not self.proxy_url:
                if process.returncode is not None:
                    raise RuntimeError(f"proxy exited {process.returncode}: {self.log_path.read_text()[-2000:]}")
                for event in self.events():
                    if event.get("event") == "started":
                        self.proxy_url = "http://" + event["listen"]
                        self.admin_url = "http://" + event["admin"]
                await asyncio.sleep(0.05)
        return self

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "non-json", "line": line})
        return out

    @property
    def port(self) -> int:
        return int(self.proxy_url.rsplit(":", 1)[1])

    def status_kib(self, field: str) -> int:
        """A /proc/PID/status field in KiB (VmRSS now, VmHWM peak)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    async def metric(self, name: str, **labels: str) -> float:
        async with aiohttp.ClientSession() as client, client.get(self.admin_url + "/metrics") as resp:
            text = await resp.text()
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def stop(self, sig: int = signal.SIGTERM, *, within: float = 30) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        return await self.wait(within=within)

    async def wait(self, *, within: float = 30) -> int:
        try:
            async with asyncio.timeout(within):
                return await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise


async def start_emulator_process(
    config: dict[str, Any] | None, tmp_path: Path, *args: str, name: str = "emulator"
) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    """`aml-auth-proxy emulator --config <config as YAML> *args` (no --config for None); returns the process and
    its ready line."""
    argv: list[str] = []
    if config is not None:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = ["--config", str(path)]
    with subprocess_log(name).open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            CONSOLE_SCRIPT,
            "emulator",
            *argv,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    assert process.stdout is not None
    async with asyncio.timeout(30):
        line = await process.stdout.readline()
    ready: dict[str, Any] = json.loads(line)
    assert ready["event"] == "emulator_ready", ready
    return process, ready


@contextlib.asynccontextmanager
async def emulator_main(*args: str, cwd: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`proxy.emulator.main` with `args`, run by this Python from the checkout (PYTHONPATH) in `cwd`, stdout and
    stderr piped to the test; killed after the block if it is still running."""
    code = "import sys; from proxy.emulator.main import main; sys.exit(main(sys.argv[1:]))"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=cwd,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def first_line(process: asyncio.subprocess.Process) -> bytes:
    """The process's first stdout line, within 15 s."""
    assert process.stdout is not None
    async with asyncio.timeout(15):
        return await process.stdout.readline()


async def sigterm(process: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    """SIGTERM, then the rest of stdout and stderr once the process has exited, within 15 s."""
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        return await process.communicate()
