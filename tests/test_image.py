"""The container image, checked without Docker: hadolint on the Dockerfile, the wheel it installs built the same
way into a clean venv, and its exact ENTRYPOINT + CMD command line serving a request."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import aiohttp
import yaml

from proxy.emulator.echo import create_echo_app
from proxy.emulator.secretdir import write_secret_dir
from tests.support.servers import start_app
from tests.support.session import remember, subprocess_log
from tests.support.tools import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def build_stage_env(steps: list[tuple[str, str]]) -> dict[str, str]:
    """The ENV settings of the build stage (KEY=VALUE pairs), which its RUN sees."""
    froms = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    env: dict[str, str] = {}
    for word, args in steps[froms[0] : froms[1]]:
        if word == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(args))  # type: ignore[arg-type]
    return env


def build_context(steps: list[tuple[str, str]], into: Path) -> Path:
    """What the build stage's COPY lines put in its working directory, copied from the checkout into `into`
    without what git ignores (a stale build/ of setuptools, compiled modules, caches): the image builds from
    that, never from the checkout as a whole."""
    import shutil

    froms = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for word, args in steps[froms[0] : froms[1]]:
        if word != "COPY" or args.startswith("--"):
            continue
        *sources, target = shlex.split(args)
        for source in sources:
            if source.endswith("/"):
                shutil.copytree(ROOT / source, into / target, ignore=ignore)
            else:
                (into / target).mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / source, into / target / source)
    return into


def compiled_list() -> list[str]:
    """setup.py's COMPILED list, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets):
            value = ast.literal_eval(node.value)
            assert isinstance(value, list) and value
            return value
    raise AssertionError("setup.py has no COMPILED list")


def test_the_build_compiles_when_it_can_and_says_why_not_when_it_cannot() -> None:
    def setup(mode: str, cc: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, AML_AUTH_PROXY_COMPILE=mode, CC=cc)
        return subprocess.run(
            [sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )

    required = setup("1", "/nonexistent/cc")
    assert (
        required.returncode != 0 and "AML_AUTH_PROXY_COMPILE=1 but no C compiler (/nonexistent/cc)" in required.stderr
    )
    fallback = setup("auto", "/nonexistent/cc")
    assert fallback.returncode == 0, fallback.stderr
    assert "building pure Python: no C compiler" in fallback.stderr and fallback.stdout.strip() == "0.1.0"
    bad = setup("yes", "cc")
    assert bad.returncode != 0 and "AML_AUTH_PROXY_COMPILE must be auto, 0 or 1, not 'yes'" in bad.stderr


def imported_files(venv: Path, env: dict[str, str]) -> list[str]:
    """The files proxy.forwarding and proxy.server are imported from by the venv's Python under `env`."""
    code = "import proxy.forwarding as m, proxy.server as s; print(m.__file__, s.__file__)"
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
        env=env,
        timeout=60,
    )
    return result.stdout.split()


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_stages_numeric_non_root_user_and_the_cli_as_entrypoint() -> None:
    steps = instructions()
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS build")
    assert any(word == "COPY" and args.startswith("--from=build /opt/aml-auth-proxy") for word, args in steps)
    user = next(args for word, args in steps if word == "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 10000 and gid.isdigit()
    final_stage = steps[[i for i, (w, _) in enumerate(steps) if w == "FROM"][1] :]
    assert not any(word == "RUN" for word, _ in final_stage)  # the runtime stage only copies the venv
    assert json.loads(next(args for word, args in steps if word == "ENTRYPOINT")) == ["aml-auth-proxy"]


async def test_the_entrypoint_from_a_clean_venv_with_only_the_wheel_serves_a_request(tmp_path: Path) -> None:
    steps = instructions()
    run = next(args for word, args in steps if word == "RUN")
    commands = [shlex.split(part) for part in run.split("&&")]
    wheel_cmd, venv_cmd, install_cmd = commands[0], commands[1], commands[2]
    assert wheel_cmd[:4] == ["python", "-m", "pip", "wheel"] and venv_cmd[:3] == ["python", "-m", "venv"]
    wheels = tmp_path / "wheels"
    venv = tmp_path / "venv"
    # The Dockerfile's commands, with its paths moved into tmp_path.
    wheel_args = [a if a != "/wheels" else str(wheels) for a in wheel_cmd[4:]]
    context = build_context(steps, tmp_path / "context")
    wheel_args = [str(context) if a == "." else a for a in wheel_args]
    build_env = dict(os.environ, **build_stage_env(steps))
    assert build_env["AML_AUTH_PROXY_COMPILE"] == "1"  # the image never ships the pure-Python request path
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", *wheel_args], check=True, timeout=600, env=build_env)
    built = sorted(wheels.glob("aml_auth_proxy-*.whl"))
    assert len(built) == 1
    with zipfile.ZipFile(built[0]) as wheel:
        names = wheel.namelist()
    for module in compiled_list():
        assert any(n.startswith(module.removesuffix(".py") + ".cpython-") and n.endswith(".so") for n in names), module
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    assert install_cmd[:2] == ["/opt/aml-auth-proxy/bin/pip", "install"]
    pip_flags = [a for a in install_cmd[2:] if a.startswith("--")]
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *pip_flags, str(built[0])], check=True, timeout=600)
    loaded = imported_files(venv, {"PATH": "/usr/bin:/bin"})
    assert all(path.endswith(".so") and path.startswith(str(venv)) for path in loaded), loaded
    pure = imported_files(venv, {"AML_AUTH_PROXY_PURE_PYTHON": "1", "PATH": "/usr/bin:/bin"})
    assert [Path(p).name for p in pure] == ["forwarding.py", "server.py"], pure  # the switch back to the sources

    runner, upstream = await start_app(create_echo_app())
    keys = tmp_path / "secret"
    write_secret_dir(keys, {"primary": "image-test-key-000001\n"})
    remember("image-test-key-000001")
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": 0},
                "admin": {"host": "127.0.0.1", "port": 0},
                "routes": [{"upstream": upstream, "auth": {"primary_file": str(keys / "primary")}}],
            }
        )
    )
    entrypoint = json.loads(next(args for word, args in steps if word == "ENTRYPOINT"))
    cmd = json.loads(next(args for word, args in steps if word == "CMD"))
    assert cmd[-2] == "--config"
    argv = [*entrypoint, *cmd[:-1], str(config)]  # the image's command line, pointed at the test config
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "TMPDIR": str(tmp_path),
    }
    before = sorted(p for p in venv.rglob("*"))
    log_path = subprocess_log("image-entrypoint")
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log, env=env, cwd="/")
    try:
        listen = None
        for _ in range(200):
            for line in log_path.read_text().splitlines():
                if '"event":"started"' in line:
                    listen = json.loads(line)["listen"]
            if listen or process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert listen, log_path.read_text()[-2000:]
        async with aiohttp.ClientSession() as client, client.post(f"http://{listen}/score", json={"data": [1, 2]}) as r:
            assert r.status == 200 and await r.json() == {"result": [2, 4]}
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0
        await runner.cleanup()
    assert sorted(p for p in venv.rglob("*")) == before  # nothing written next to the code (read-only root FS)
    assert os.access(ROOT / "Dockerfile", os.R_OK)
