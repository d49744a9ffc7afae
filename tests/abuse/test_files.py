"""Files: the proxy writes none (its state is in memory; logs go to stdout), and every file with a secret that the
emulator and the demo write for local development is mode 0600, readable by its owner only."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import aiohttp

from proxy.emulator.kube import start_kube_api
from proxy.emulator.runner import start_emulator
from proxy.emulator.secretdir import write_private, write_secret_dir
from proxy.emulator.tls import make_local_tls
from tests.support.procs import ProxyProcess
from tests.support.session import new_key


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_the_proxy_writes_no_files(tmp_path: Path, key_dir: Any, monkeypatch: Any) -> None:
    home = tmp_path / "home"
    home.mkdir()
    for var in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.chdir(home)
    route = {"name": "files", "upstream": "http://127.0.0.1:9", "auth": key_dir(new_key("files"))}
    proxy = await ProxyProcess.start({"routes": [route], "log_level": "debug"}, tmp_path)
    async with aiohttp.ClientSession() as client:
        for path in ("/score", "/nothing/../x"):
            async with client.post(proxy.proxy_url + path, data=b"x" * 100_000) as resp:
                await resp.read()
        async with client.get(proxy.admin_url + "/metrics") as resp:
            assert resp.status == 200
    assert await proxy.stop() == 0
    assert sorted(p.name for p in home.rglob("*")) == []


async def test_files_with_secrets_written_for_local_development_are_mode_0600(tmp_path: Path) -> None:
    write_secret_dir(tmp_path / "secret", {"primary": "k1", "secondary": "k2"})
    assert {mode((tmp_path / "secret" / name).resolve()) for name in ("primary", "secondary")} == {0o600}

    existing = tmp_path / "was-readable"
    existing.write_text("old")
    existing.chmod(0o644)
    write_private(existing, "secret")
    assert mode(existing) == 0o600

    tls = make_local_tls(tmp_path / "tls")
    assert mode(tls.key_file) == 0o600  # the CA key is never written; it lives only in memory

    emu = await start_emulator(
        {
            "entra": {"federated": {"app": "system:serviceaccount:ns:sa"}},
            "services": [{"name": "s", "api": "v2", "auth_mode": "key", "deployments": {"blue": "echo"}}],
        }
    )
    try:
        assert mode(emu.write_service_account_token("app", tmp_path / "sa-token")) == 0o600
    finally:
        await emu.close()

    kube = await start_kube_api(tls=True)
    try:
        assert mode(kube.write_kubeconfig(tmp_path / "kubeconfig", user="u")) == 0o600
        assert mode(kube.write_incluster(tmp_path / "incluster", user="u").token_file) == 0o600
    finally:
        await kube.close()
