"""Command line: `run`, `check-config`, `emulator`, `demo`. Only wiring; the pieces live elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import signal
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.config import ConfigError, Settings, load
from proxy.logs import event
from proxy.logs import setup as setup_logging

log = logging.getLogger("aml_auth_proxy.cli")

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aml-auth-proxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"aml-auth-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", help="YAML config file (optional when AML_AUTH_PROXY_* variables set it all)")
    run.add_argument(
        "--workers",
        type=int,
        help="proxy processes sharing the port (overrides the `workers` key; 0 = one per CPU the container may use)",
    )
    check = sub.add_parser("check-config", help="validate a config without starting")
    check.add_argument("--config", help="YAML config file")
    sub.add_parser("emulator", help="run the local AML emulator (see `emulator --help`)", add_help=False)
    demo = sub.add_parser("demo", help="emulator + proxy + a few scoring calls, then stop")
    demo.add_argument("--azmlinfsrv", help="path of the azmlinfsrv executable (default: echo model)")
    demo.add_argument("--token-seconds", type=float, default=8.0, help="how long the token part sends requests")
    return parser


def _load(path: str | None) -> Settings | None:
    try:
        return load(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"config error: {line}", file=sys.stderr)
        return None


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the fallback is the standard loop
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(settings: Settings, *, config_path: str | None = None) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully. Returns the exit code.

    With more than one worker this is the primary process: it also starts, feeds and stops the workers."""
    from proxy.app import ProxyService
    from proxy.workers import WorkerPool, resolve_workers

    workers = resolve_workers(settings.workers)
    service = ProxyService(settings, reuse_port=workers > 1)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except OSError as exc:
        event(log, logging.ERROR, "start_failed", reason=str(exc))
        await service.stop()
        return 1
    if workers > 1:
        pool = WorkerPool(service, count=workers - 1, config_path=config_path)
        service.lifecycle.workers = pool
        await pool.start()
    # Everything built at start-up lives for the whole run: keep it out of the collector's scans, and collect
    # the young generation less often (a request allocates many short-lived objects, few cycles).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    await stop.wait()
    await service.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["emulator"]:
        from proxy.emulator.runner import main as emulator_main

        return emulator_main(args_list[1:])
    if args_list[:1] == ["worker"]:  # hidden: started by the primary process (proxy/workers.py)
        return _worker(args_list[1:])
    args = _parser().parse_args(args_list)
    if args.command == "check-config":
        settings = _load(args.config)
        if settings is None:
            return EXIT_CONFIG
        names = ", ".join(f"{r.name} ({r.match} -> {r.upstream})" for r in settings.routes)
        print(f"config ok: {len(settings.routes)} route(s): {names}")
        return 0
    if args.command == "demo":
        from proxy.demo import main as demo_main

        return demo_main(azmlinfsrv=args.azmlinfsrv, token_seconds=args.token_seconds)
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    if args.workers is not None:
        if not 0 <= args.workers <= 256:
            print(f"config error: --workers: {args.workers} is out of range; expected 0 to 256", file=sys.stderr)
            return EXIT_CONFIG
        settings = dataclasses.replace(settings, workers=args.workers)
    setup_logging(settings.log_level)
    _install_uvloop()
    code = asyncio.run(serve(settings, config_path=args.config))
    # Shutdown is complete: a repeated SIGTERM (kubelet, a supervisor) must not turn exit 0 into a kill.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code


def _worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aml-auth-proxy worker")
    parser.add_argument("--config")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    setup_logging(settings.log_level)
    _install_uvloop()
    from proxy.workers import run_worker

    code = asyncio.run(run_worker(settings, fd=args.fd, port=args.port, index=args.index))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code
