"""`aml-auth-proxy emulator`: the command line of the emulator (proxy/emulator/runner.py starts it; the config
file's keys are described there), and the proxy config it writes with `--proxy-config` (proxyconfig.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proxy.config.settings import ConfigError
from proxy.emulator.proxyconfig import with_dev_client, write_proxy_config
from proxy.emulator.runner import (
    ECHO_BACKEND,
    EmulatorConfig,
    _read_yaml,
    default_config,
    parse_config,
    start_emulator,
)

EMULATOR_EXAMPLES = """\
examples:
  aml-auth-proxy emulator --proxy-config dev/proxy.yaml     one AML v1 service 'demo', and a proxy config for it
  aml-auth-proxy run --config dev/proxy.yaml                (another terminal) the proxy on that config
  curl -d '{"data": [1, 2, 3]}' http://127.0.0.1:8080/demo/score
  aml-auth-proxy emulator --config proxy/emulator/emulator.example.yaml --proxy-config dev/proxy.yaml

The first stdout line is JSON (event emulator_ready) with every URL, the CA file and the proxy config's path.
The config file's keys are described at the top of proxy/emulator/runner.py; stop with SIGTERM or Ctrl-C."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aml-auth-proxy emulator",
        description="Local stand-ins for the AML scoring front ends, the v1 and v2 control planes, Entra ID, IMDS "
        "and ML Server, for development and tests. Listens on 127.0.0.1 only unless told otherwise.",
        epilog=EMULATOR_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML config file (default: one v1 service 'demo' in eastus, echo model)"
    )
    parser.add_argument("--host", help="listen address (default: 127.0.0.1, or the config's listen.host)")
    parser.add_argument(
        "--scoring-port", type=int, metavar="PORT", help="v1 scoring front end port (default: 0, any free port)"
    )
    parser.add_argument(
        "--control-port", type=int, metavar="PORT", help="control plane port (default: 0, any free port)"
    )
    parser.add_argument(
        "--backend", metavar="URL", help="model URL for the default service, without --config (default: built-in echo)"
    )
    parser.add_argument(
        "--keys-dir",
        metavar="DIR",
        help="mirror every service's keys into DIR/<service>/{primary,secondary} (default: none)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve the control planes, scoring front ends and ML Server over HTTPS too, with the emulator's own "
        "CA (ca_file in the ready line; default: plain HTTP, Entra ID is always HTTPS)",
    )
    parser.add_argument(
        "--proxy-config",
        metavar="FILE",
        help="write a ready proxy config to FILE once listening: a route /<service> per service (key files, or a "
        "token from the control plane), /mlserver for ML Server; keys and sign-in secrets go to --keys-dir "
        "(default: FILE's folder, <FILE name>-secrets/); implies --tls",
    )
    return parser


def default_secrets_dir(proxy_config: Path) -> Path:
    """Where `--proxy-config FILE` mirrors keys when no --keys-dir is given: FILE's folder, `<stem>-secrets/`."""
    return proxy_config.with_name(proxy_config.stem + "-secrets")


def _build_config(args: argparse.Namespace) -> EmulatorConfig:
    raw: dict[str, Any]
    if args.config:
        if args.backend:
            raise ConfigError(["--backend: only used without --config; set deployments in the config file"])
        loaded = _read_yaml(args.config)
        if not isinstance(loaded, Mapping):
            raise ConfigError([f"{args.config}: must hold a mapping at the top level"])
        raw = dict(loaded)
    else:
        raw = default_config(backend=args.backend or ECHO_BACKEND)
    listen = raw.get("listen") or {}
    if isinstance(listen, Mapping):  # otherwise parse_config reports it
        overrides = {"host": args.host, "scoring_port": args.scoring_port, "control_port": args.control_port}
        raw["listen"] = {**listen, **{k: v for k, v in overrides.items() if v is not None}}
    if args.keys_dir is not None:
        raw["keys_dir"] = args.keys_dir
    if args.tls or args.proxy_config:  # the proxy sends control-plane credentials over HTTPS only
        raw["tls"] = True
    cfg = parse_config(raw)
    if args.proxy_config and cfg.keys_dir is None:
        cfg = dataclasses.replace(cfg, keys_dir=default_secrets_dir(Path(args.proxy_config)))
    return cfg


async def _run_until_signalled(cfg: EmulatorConfig, *, proxy_config: Path | None = None) -> int:
    client_secret = secrets.token_urlsafe(24)
    if proxy_config is not None:
        cfg = with_dev_client(cfg, client_secret)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        try:
            emulator = await start_emulator(cfg)
        except OSError as exc:
            print(f"emulator: cannot listen: {exc}", file=sys.stderr)
            return 1
        try:
            if proxy_config is not None:
                try:
                    write_proxy_config(emulator, cfg, proxy_config, client_secret=client_secret)
                except OSError as exc:
                    print(f"emulator: cannot write the proxy config: {exc}", file=sys.stderr)
                    return 1
            ready = {
                "event": "emulator_ready",
                "scoring_url": emulator.scoring_url,
                "control_url": emulator.control_url,
                "services": sorted(emulator.state.services),
                "service_urls": emulator.service_urls,
                "entra_url": emulator.entra_url,
                "imds_url": emulator.imds_url,
                "mlserver_url": emulator.mlserver_url,
                "ca_file": emulator.ca_file,
                "tenant": emulator.tenant,
                "control_plane_token": emulator.control_plane_token,  # a made-up dev token, not a key
                "keys_dir": None if cfg.keys_dir is None else str(cfg.keys_dir),
                "proxy_config": None if proxy_config is None else str(proxy_config),
            }
            print(json.dumps(ready), flush=True)
            await stop.wait()
        finally:
            await emulator.close()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


def main(argv: list[str]) -> int:
    """`aml-auth-proxy emulator ...`: run until SIGTERM/SIGINT. Exit 0 when stopped, 2 on a bad config."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        cfg = _build_config(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"emulator config: {problem}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        proxy_config = Path(args.proxy_config) if args.proxy_config else None
        return asyncio.run(_run_until_signalled(cfg, proxy_config=proxy_config))
    return 0
