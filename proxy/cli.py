"""aml-auth-proxy: a sidecar that adds Azure Machine Learning credentials to scoring calls.

The command line: `run`, `check-config`, `injector`, `emulator` and `demo` (and the hidden `worker`, started by
`run`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.config.reader import load
from proxy.config.schema import top_default, top_leaf
from proxy.config.settings import ENV_PREFIX, NOT_CONFIG_ENV, ConfigError, Settings
from proxy.logs import event
from proxy.logs import setup as setup_logging

log = logging.getLogger("aml_auth_proxy.cli")

EXIT_CONFIG = 2

DESCRIPTION = (
    "A sidecar that adds Azure Machine Learning credentials to scoring calls: your service sends plain HTTP to "
    "localhost, the proxy forwards it with a key or a token that it keeps fresh."
)
EXAMPLES = """\
examples:
  aml-auth-proxy run --config config.yaml           serve the routes in config.yaml
  aml-auth-proxy check-config --config config.yaml  validate it without starting
  aml-auth-proxy emulator --proxy-config dev/proxy.yaml
                                                    local AML stand-ins, and a proxy config that reaches them
  aml-auth-proxy demo                               the whole loop in one process, then stop
  aml-auth-proxy injector --tls-cert tls.crt --tls-key tls.key --sidecar-template sidecar.yaml
                                                    the sidecar injector (a mutating admission webhook)

Configuration reference: docs/configuration.md. Every key can also be set by an AML_AUTH_PROXY_* variable."""
_WORKERS = top_leaf("workers")  # --workers takes the config key's range
_WORKERS_MIN, _WORKERS_MAX = int(_WORKERS.minimum or 0), int(_WORKERS.maximum or 0)
_PROXY_AT = f"{top_default('listen.host')}:{top_default('listen.port')}"
_ADMIN_AT = f"{top_default('admin.host')}:{top_default('admin.port')}"
RUN_EXAMPLES = f"""\
examples:
  aml-auth-proxy run --config config.yaml
  aml-auth-proxy run --config config.yaml --workers 1
  AML_AUTH_PROXY_ROUTE_UPSTREAM=https://my-endpoint.eastus.inference.ml.azure.com \\
  AML_AUTH_PROXY_ROUTE_AUTH_PRIMARY_FILE=/var/run/secrets/aml/primaryKey aml-auth-proxy run

It listens on {_PROXY_AT} (the proxy) and {_ADMIN_AT} (/healthz, /readyz, /metrics) unless the config
says otherwise, and stops gracefully on SIGTERM or SIGINT."""
CHECK_EXAMPLES = """\
example:
  aml-auth-proxy check-config --config config.yaml

Exit code 0 and one line naming the routes when the config is valid; 2 and one line per problem otherwise.
Key files are not read: a missing key makes the route unready at run time instead."""
INJECTOR_EXAMPLES = """\
examples:
  aml-auth-proxy injector --tls-cert /etc/tls/tls.crt --tls-key /etc/tls/tls.key \\
      --sidecar-template /etc/template/sidecar.yaml          (what the Helm chart runs, with injector.enabled)
  POD_NAMESPACE=aml-auth-proxy aml-auth-proxy injector ... --native false --failure-policy Ignore

Serves POST /mutate (admission.k8s.io/v1 AdmissionReview), GET /healthz, /readyz and /metrics over HTTPS, and the
last three over HTTP on --admin. Pods opt in with the label aml-auth-proxy.io/inject: "true"; annotations choose
the config ConfigMap, the Secret, resources and image (charts/aml-auth-proxy/README.md, "Injection by
annotation"). The certificate is re-read when its files change. Exit code 2 and one line per problem when an
option is wrong; 0 after SIGTERM or SIGINT."""
DEMO_EXAMPLES = """\
example:
  make demo      (the same, with the real AML scoring server as the model: --azmlinfsrv .tools/...)"""
NO_CONFIG = (
    "no config given: pass --config FILE (reference: docs/configuration.md), or set the single route by "
    "environment (AML_AUTH_PROXY_ROUTE_UPSTREAM and AML_AUTH_PROXY_ROUTE_AUTH_PRIMARY_FILE, ...). To try the "
    "proxy locally: `aml-auth-proxy emulator --proxy-config dev/proxy.yaml`, then `--config dev/proxy.yaml`."
)


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="aml-auth-proxy", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=formatter
    )
    parser.add_argument("--version", action="version", version=f"aml-auth-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run the proxy until SIGTERM or SIGINT",
        description="Run the proxy until SIGTERM or SIGINT.",
        epilog=RUN_EXAMPLES,
        formatter_class=formatter,
    )
    run.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config file (default: none; then AML_AUTH_PROXY_* variables must set the route)",
    )
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=f"proxy processes sharing the port, {_WORKERS_MIN} to {_WORKERS_MAX} (default: the `workers` key, "
        f"whose default {_WORKERS.default} means one per CPU the container may use)",
    )
    check = sub.add_parser(
        "check-config",
        help="validate a config without starting",
        description="Validate a config (file and AML_AUTH_PROXY_* variables) without starting the proxy.",
        epilog=CHECK_EXAMPLES,
        formatter_class=formatter,
    )
    check.add_argument("--config", metavar="FILE", help="YAML config file (default: none; variables only)")
    sub.add_parser(
        "emulator",
        help="run local stand-ins for AML, Entra ID and ML Server (see `emulator --help`)",
        add_help=False,
    )
    _injector_parser(sub, formatter)
    demo = sub.add_parser(
        "demo",
        help="emulator, proxy and a few scoring calls in one process, then stop",
        description="Start the emulator and the proxy, show key rotation and token renewal, then stop.",
        epilog=DEMO_EXAMPLES,
        formatter_class=formatter,
    )
    demo.add_argument(
        "--azmlinfsrv", metavar="PATH", help="azmlinfsrv executable to use as the model (default: the echo model)"
    )
    demo.add_argument(
        "--token-seconds",
        type=float,
        default=8.0,
        metavar="S",
        help="how long the token part sends requests (default: 8)",
    )
    return parser


def _injector_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], formatter: type[argparse.HelpFormatter]
) -> None:
    from proxy.injector import CERT_POLL_SECONDS  # the package alone: no aiohttp for the other commands

    injector = sub.add_parser(
        "injector",
        help="the sidecar injector: a mutating admission webhook adding the proxy to labelled pods",
        description="Serve the sidecar injector: a Kubernetes mutating admission webhook over HTTPS that adds the "
        'proxy to pods labelled aml-auth-proxy.io/inject: "true".',
        epilog=INJECTOR_EXAMPLES,
        formatter_class=formatter,
    )
    injector.add_argument("--tls-cert", required=True, metavar="FILE", help="serving certificate (PEM; required)")
    injector.add_argument("--tls-key", required=True, metavar="FILE", help="its private key (PEM; required)")
    injector.add_argument(
        "--sidecar-template",
        required=True,
        metavar="FILE",
        help="the chart's sidecar template (ConfigMap <release>-aml-auth-proxy-injector-template, key sidecar.yaml; "
        "required)",
    )
    injector.add_argument(
        "--listen", default="0.0.0.0:8443", metavar="HOST:PORT", help="HTTPS address (default: %(default)s)"
    )
    injector.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="plain-HTTP address for /healthz, /readyz and /metrics (default: none; they are on --listen too)",
    )
    injector.add_argument(
        "--native",
        choices=("auto", "true", "false"),
        default="auto",
        help="native sidecars (an init container with restartPolicy: Always): auto asks the API server's version "
        "once at start and uses them from Kubernetes 1.29 (default: %(default)s)",
    )
    injector.add_argument(
        "--namespace",
        metavar="NS",
        help="the injector's own namespace, never injected (default: POD_NAMESPACE)",
    )
    injector.add_argument(
        "--failure-policy",
        choices=("Fail", "Ignore"),
        default="Fail",
        help="the webhook's failurePolicy: with Fail a pod with invalid annotations is refused, with Ignore it "
        "starts without the proxy (default: %(default)s)",
    )
    injector.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info", help="(default: %(default)s)"
    )
    injector.add_argument(
        "--cert-poll-seconds",
        type=float,
        default=CERT_POLL_SECONDS,
        metavar="S",
        help="how often the certificate files are checked for a change (default: %(default)g)",
    )


def _injector(args: argparse.Namespace) -> int:
    from proxy.injector.main import Options, run

    options = Options(
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        sidecar_template=args.sidecar_template,
        listen=args.listen,
        admin=args.admin,
        native=args.native,
        namespace=args.namespace,
        failure_policy=args.failure_policy,
        log_level=args.log_level,
        cert_poll_seconds=args.cert_poll_seconds,
    )
    return run(options)


def _configured_by_environment() -> bool:
    return any(name.startswith(ENV_PREFIX) and name not in NOT_CONFIG_ENV for name in os.environ)


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
        from proxy.emulator.main import main as emulator_main

        return emulator_main(args_list[1:])
    if args_list[:1] == ["worker"]:  # hidden: started by the primary process (proxy/workers.py)
        return _worker(args_list[1:])
    args = _parser().parse_args(args_list)
    if args.command in ("check-config", "run") and args.config is None and not _configured_by_environment():
        print(f"config error: {NO_CONFIG}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        settings = _load(args.config)
        if settings is None:
            return EXIT_CONFIG
        names = ", ".join(f"{r.name} ({r.match} -> {r.upstream})" for r in settings.routes)
        print(f"config ok: {len(settings.routes)} route(s): {names}")
        return 0
    if args.command == "injector":
        return _injector(args)
    if args.command == "demo":
        from proxy.demo import main as demo_main

        return demo_main(azmlinfsrv=args.azmlinfsrv, token_seconds=args.token_seconds)
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    if args.workers is not None:
        if not _WORKERS_MIN <= args.workers <= _WORKERS_MAX:
            print(
                f"config error: --workers: {args.workers} is out of range; expected {_WORKERS_MIN} to {_WORKERS_MAX}",
                file=sys.stderr,
            )
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
    from proxy.app import run_worker

    code = asyncio.run(run_worker(settings, fd=args.fd, port=args.port, index=args.index))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code
