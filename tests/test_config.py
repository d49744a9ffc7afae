"""Config: YAML plus environment, `check-config`, and one clear line per problem with exit code 2."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config.reader import load, parse
from proxy.config.schema import ROUTE_LEAVES, TOP_LEAVES, env_name
from proxy.config.settings import ConfigError
from tests.support.tools import proxy_cli

ROOT = Path(__file__).resolve().parent.parent

GOOD = {
    "routes": [
        {
            "name": "scoring",
            "region": "eastus",
            "upstream": "https://my-endpoint.eastus.inference.ml.azure.com",
            "auth": {"type": "key", "primary_file": "/var/run/secrets/aml/primary"},
        }
    ]
}


cli = proxy_cli


def test_defaults_are_safe() -> None:
    settings = parse(GOOD, {})
    assert settings.listen.host == "127.0.0.1" and settings.listen.port == 8080
    assert settings.admin.port == 9090 and settings.shutdown_grace_seconds == 20
    route = settings.routes[0]
    assert route.tls.verify is True and route.keep_caller_credential is False
    assert route.auth.header == "Authorization" and route.auth.template == "Bearer {key}"
    assert route.retry_buffer_bytes == 1024 * 1024 and route.match == "/"


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "config ok: 1 route(s): scoring" in result.stdout


def _route(**changes: object) -> dict[str, object]:
    route = {**GOOD["routes"][0], **changes}  # type: ignore[dict-item]
    return {"routes": [route]}


BROKEN: list[tuple[str, object, list[str]]] = [
    ("not yaml", "routes: [unclosed", ["is not valid YAML at line"]),
    ("no routes", {"listen": {"port": 8080}}, ["routes: None is not allowed; expected a list of at least one route"]),
    ("missing upstream", {"routes": [{"auth": {"primary_file": "/k"}}]}, ["routes[0].upstream: is required"]),
    (
        "key of another auth type",
        _route(auth={"primary_file": "/k", "service": "svc"}),
        ["routes[0].auth.service: is not used with auth.type 'key'; used by: aml-keys, aml-service-token"],
    ),
    (
        "token kind without its fields",
        _route(auth={"type": "aml-endpoint-token", "identity": {"type": "client_secret"}}),
        [
            "routes[0].auth.endpoint: is required with auth.type 'aml-endpoint-token'",
            "routes[0].auth.subscription_id: is required with auth.type 'aml-endpoint-token'",
            "routes[0].auth.identity.client_secret_file: is required with auth.identity.type 'client_secret'",
        ],
    ),
    (
        "plain http for a control plane",
        _route(
            auth={
                "type": "aml-service-token",
                "subscription_id": "s",
                "resource_group": "r",
                "workspace": "w",
                "service": "x",
                "mms_url": "http://eastus.api.azureml.ms",
            }
        ),
        ["routes[0].auth.mms_url: 'http://eastus.api.azureml.ms' is not allowed; expected an https URL"],
    ),
    (
        "token template with {key}",
        _route(auth={"type": "jwt-file", "token_file": "/t", "template": "Bearer {key}"}),
        ["routes[0].auth.template: 'Bearer {key}' is not allowed; it must contain {token} exactly once"],
    ),
    (
        "bad upstream scheme",
        _route(upstream="ftp://x"),
        ["routes[0].upstream: 'ftp://x' is not allowed; expected an http(s) URL"],
    ),
    (
        "credentials in the URL",
        _route(upstream="https://user:pw@x.example/"),
        ["routes[0].upstream: 'https://user:pw@x.example/' is not allowed; no credentials, query or fragment"],
    ),
    (
        "port out of range",
        {**GOOD, "listen": {"port": 70000}},
        ["listen.port: 70000 is out of range; expected a number from 0 to 65535"],
    ),
    (
        "port not a number",
        {**GOOD, "admin": {"port": "x"}},
        ["admin.port: 'x' is not allowed; expected a whole number"],
    ),
    (
        "unknown top-level key",
        {**GOOD, "lisen": {}},
        ["lisen: unknown key; allowed: access_log, admin, kubernetes, limits, listen"],
    ),
    (
        "typo in a nested key",
        _route(timeouts={"conect": 3}),
        ["routes[0].timeouts.conect: unknown key; allowed: connect, read, total"],
    ),
    (
        "bad auth type",
        _route(auth={"type": "token", "primary_file": "/k"}),
        ["routes[0].auth.type: 'token' is not allowed; allowed: key"],
    ),
    (
        "template without {key}",
        _route(auth={"primary_file": "/k", "template": "Bearer"}),
        ["routes[0].auth.template: 'Bearer' is not allowed; it must contain {key} exactly once"],
    ),
    (
        "framing header as key header",
        _route(auth={"primary_file": "/k", "header": "Content-Length"}),
        ["routes[0].auth.header: 'Content-Length' is not allowed; it is a framing or reserved header"],
    ),
    (
        "negative timeout",
        _route(timeouts={"read": -1}),
        ["routes[0].timeouts.read: -1.0 is out of range; expected a number >= 0.001"],
    ),
    (
        "bad log level",
        {**GOOD, "log_level": "loud"},
        ["log_level: 'loud' is not allowed; allowed: debug, info, warning, error"],
    ),
    (
        "duplicate route names and prefixes",
        {"routes": [{**GOOD["routes"][0], "match": "/a"}, {**GOOD["routes"][0], "match": "/a"}]},  # type: ignore[dict-item]
        [
            "routes[1].name: 'scoring' is already used by routes[0]",
            "routes[1].match: '/a' is already used by routes[0]",
        ],
    ),
    (
        "several routes without match",
        {"routes": [GOOD["routes"][0], {**GOOD["routes"][0], "name": "b"}]},  # type: ignore[dict-item]
        ["routes[0].match: is required when there is more than one route"],
    ),
    ("bad route name", _route(name="Bad Name!"), ["routes[0].name: 'Bad Name!' is not allowed; use a-z, 0-9"]),
    (
        "bool as string",
        _route(strip_prefix="yes please"),
        ["routes[0].strip_prefix: 'yes please' is not allowed; expected true or false"],
    ),
    (
        "header injection in deployment",
        _route(deployment="blue\r\nX-Evil: 1"),
        ["routes[0].deployment: 'blue\\r\\nX-Evil: 1' is not allowed; CR, LF and NUL"],
    ),
]


@pytest.mark.parametrize(("case", "document", "expected"), BROKEN, ids=[c[0] for c in BROKEN])
def test_check_config_names_each_problem_and_exits_2(
    tmp_path: Path, case: str, document: object, expected: list[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 2, (case, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    for want in expected:
        assert any(want in line for line in lines), (want, lines)
    assert all(line.startswith("config error: ") for line in lines)
    assert "Traceback" not in result.stderr


def test_several_problems_give_one_line_each() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"listen": {"port": -1}, "routes": [{"upstream": "nope", "auth": {}}]}, {})
    assert info.value.problems == [
        "listen.port: -1 is out of range; expected a number from 0 to 65535",
        "routes[0].auth.primary_file: is required with auth.type 'key'",
        "routes[0].upstream: 'nope' is not allowed; expected an http(s) URL",
    ]


def test_run_with_a_bad_config_exits_2_before_starting(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("routes: []\n")
    result = cli("run", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith("config error: routes: [] is not allowed")


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    result = cli("check-config", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_environment_alone_defines_a_single_route() -> None:
    env = {
        "AML_AUTH_PROXY_ROUTE_UPSTREAM": "http://127.0.0.1:5001/api/v1/service/demo",
        "AML_AUTH_PROXY_ROUTE_AUTH_PRIMARY_FILE": "/keys/primary",
        "AML_AUTH_PROXY_ROUTE_TIMEOUTS_READ": "2.5",
        "AML_AUTH_PROXY_ROUTE_STRIP_PREFIX": "true",
        "AML_AUTH_PROXY_LISTEN_PORT": "18080",
        "AML_AUTH_PROXY_SHUTDOWN_GRACE_SECONDS": "5",
    }
    settings = load(None, env)
    route = settings.routes[0]
    assert str(route.upstream) == "http://127.0.0.1:5001/api/v1/service/demo"
    assert route.timeouts.read == 2.5 and route.strip_prefix is True
    assert settings.listen.port == 18080 and settings.shutdown_grace_seconds == 5


def test_environment_overrides_the_file_and_errors_name_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    settings = load(str(path), {"AML_AUTH_PROXY_ROUTE_REGION": "westeurope"})
    assert settings.routes[0].region == "westeurope"
    result = cli("check-config", "--config", str(path), env={"AML_AUTH_PROXY_ROUTE_TIMEOUTS_CONNECT": "soon"})
    assert result.returncode == 2
    assert "routes[0].timeouts.connect (from AML_AUTH_PROXY_ROUTE_TIMEOUTS_CONNECT): 'soon'" in result.stderr
    result = cli("check-config", "--config", str(path), env={"AML_AUTH_PROXY_ROUTE_TIMEOUT": "1"})
    assert "AML_AUTH_PROXY_ROUTE_TIMEOUT: unknown environment variable" in result.stderr


def test_the_build_and_runtime_switches_are_not_unknown_configuration_variables(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    env = {"AML_AUTH_PROXY_COMPILE": "0", "AML_AUTH_PROXY_PURE_PYTHON": "1"}
    assert load(str(path), env).routes[0].name == load(str(path), {}).routes[0].name
    result = cli("check-config", "--config", str(path), env=env)
    assert result.returncode == 0, result.stderr


def test_route_variables_need_exactly_one_route() -> None:
    doc = {"routes": [{**GOOD["routes"][0], "match": "/a"}, {**GOOD["routes"][0], "name": "b", "match": "/b"}]}  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="need exactly one route"):
        parse(doc, {"AML_AUTH_PROXY_ROUTE_REGION": "x"})


def test_example_config_in_the_repo_is_valid() -> None:
    result = cli("check-config", "--config", str(ROOT / "docs" / "example-config.yaml"))
    assert result.returncode == 0, result.stderr


def test_run_and_check_config_without_any_config_say_how_to_give_one() -> None:
    for command in ("run", "check-config"):
        result = cli(command)
        assert result.returncode == 2, command
        (line,) = result.stderr.splitlines()
        assert line.startswith("config error: no config given: pass --config FILE"), line
        assert "AML_AUTH_PROXY_ROUTE_UPSTREAM" in line and "emulator --proxy-config" in line
    # The build and debugging switches are not a config: they alone still get the same answer.
    result = cli("check-config", env={"AML_AUTH_PROXY_PURE_PYTHON": "1"})
    assert result.returncode == 2 and "no config given" in result.stderr


def test_help_is_written_for_users_with_defaults_and_examples() -> None:
    top = cli("--help")
    assert top.returncode == 0
    assert "Only wiring" not in top.stdout and "credentials to scoring calls" in top.stdout
    for command in ("run", "check-config", "emulator", "demo"):
        assert re.search(rf"^    {command}\s+\S", top.stdout, re.M) or f"    {command}\n" in top.stdout, command
    assert "examples:" in top.stdout
    # Every flag of every command says its default, and each command shows an example.
    for command in ("run", "check-config", "emulator", "demo"):
        result = cli(command, "--help")
        assert result.returncode == 0, command
        flags = re.findall(r"^  (--[a-z-]+)", result.stdout, re.M)
        assert flags, command
        options = result.stdout.split("options:", 1)[1].split("\nexample", 1)[0]
        for chunk in re.split(r"\n  (?=--)", options)[1:]:
            assert "default" in chunk, (command, chunk)
        assert re.search(r"^examples?:\n  \S", result.stdout, re.M), command
    run = cli("run", "--help").stdout
    settings = parse(GOOD, {})
    assert (
        f"{settings.listen.host}:{settings.listen.port}" in run
        and f"{settings.admin.host}:{settings.admin.port}" in run
    )


def test_every_default_written_in_a_dataclass_is_the_schemas() -> None:
    """The schema (TOP_LEAVES, ROUTE_LEAVES) is where a default lives; a settings dataclass that also writes one must
    write the same value, so code that builds settings without the parser behaves as a config file would."""
    import dataclasses

    from proxy.config import settings as config
    from proxy.config.schema import Leaf

    sections: list[tuple[type, str, tuple[Leaf, ...]]] = [
        (config.Settings, "", TOP_LEAVES),
        (config.Limits, "limits.", TOP_LEAVES),
        (config.Kubernetes, "kubernetes.", TOP_LEAVES),
        (config.Timeouts, "timeouts.", ROUTE_LEAVES),
        (config.Pool, "pool.", ROUTE_LEAVES),
        (config.Tls, "tls.", ROUTE_LEAVES),
        (config.RefreshPolicy, "auth.refresh.", ROUTE_LEAVES),
    ]
    renamed = {"admin_allow_remote_refresh": "admin.allow_remote_refresh"}
    # kubernetes.events: the schema's None means "decide from the downward API", which the parser resolves.
    resolved_by_the_parser = {"kubernetes.events"}
    checked = 0
    for cls, prefix, leaves in sections:
        by_key = {leaf.key: leaf for leaf in leaves}
        for f in dataclasses.fields(cls):
            key = renamed.get(f.name, prefix + f.name)
            leaf = by_key.get(key)
            if leaf is None or f.default is dataclasses.MISSING or key in resolved_by_the_parser:
                continue
            assert f.default == leaf.default, (
                f"{cls.__name__}.{f.name} = {f.default!r}, the schema says {leaf.default!r}"
            )
            checked += 1
    assert checked >= 12


def test_the_cli_takes_workers_in_the_schemas_range(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy import cli
    from proxy.cli import main
    from proxy.config.schema import top_leaf

    async def served(*_args: object, **_kw: object) -> int:
        return 0  # were the value taken, `run` would serve: here it returns at once, and the test fails

    monkeypatch.setattr(cli, "serve", served)
    monkeypatch.setattr(cli, "_install_uvloop", lambda: None)
    monkeypatch.setattr(cli, "setup_logging", lambda *_a, **_k: None)  # the session's log capture stays

    leaf = top_leaf("workers")
    config_file = tmp_path / "c.yaml"
    (tmp_path / "key").write_text("k\n")
    config_file.write_text(
        f"routes: [{{name: r, upstream: 'http://127.0.0.1:9', auth: {{primary_file: {tmp_path / 'key'}}}}}]\n"
    )
    assert main(["run", "--config", str(config_file), "--workers", str(int(leaf.maximum or 0) + 1)]) == 2
    assert f"expected {int(leaf.minimum or 0)} to {int(leaf.maximum or 0)}" in capsys.readouterr().err


def test_each_auth_type_holds_exactly_the_schemas_keys_for_it() -> None:
    """One class per auth.type, its fields the auth.* keys the schema gives that type: a key added to the schema
    for a type, or a field added to its class, without the other fails here. A field that may be None is one the
    schema lets be absent; one that may not is required for the type or has a default."""
    import dataclasses

    from proxy.config.settings import AUTH_CLASSES, AUTH_TYPES

    assert sorted(AUTH_CLASSES) == sorted(AUTH_TYPES)
    for auth_type, cls in AUTH_CLASSES.items():
        assert cls.type == auth_type
        leaves = [
            leaf
            for leaf in ROUTE_LEAVES
            if leaf.key.startswith("auth.")
            and leaf.key != "auth.type"
            and (leaf.auth_types is None or auth_type in leaf.auth_types)
        ]
        schema_fields = {leaf.key.split(".")[1] for leaf in leaves}
        class_fields = {f.name: f for f in dataclasses.fields(cls)}
        assert set(class_fields) == schema_fields, (auth_type, sorted(set(class_fields) ^ schema_fields))
        for leaf in leaves:
            name = leaf.key.split(".")[1]
            if leaf.key != f"auth.{name}" or name == "template":
                continue  # a section (identity, refresh, *_secret_ref), or the template the parser completes
            optional = "None" in str(class_fields[name].type)
            may_be_absent = leaf.default is None and (auth_type not in leaf.required_for or bool(leaf.required_unless))
            assert optional == may_be_absent, (auth_type, name, class_fields[name].type, leaf.default)


def test_a_route_gets_its_auth_types_class_with_every_key_read() -> None:
    from proxy.config.settings import AmlKeysAuth, KeyAuth

    key = parse(GOOD, {}).routes[0].auth
    assert isinstance(key, KeyAuth) and key.template == "Bearer {key}" and key.reload_seconds == 1.0
    raw = {
        "routes": [
            {
                "upstream": "https://example.invalid/score",
                "auth": {
                    "type": "aml-keys",
                    "subscription_id": "s",
                    "resource_group": "g",
                    "workspace": "w",
                    "endpoint": "e",
                    "refetch_seconds": 120,
                    "identity": {"type": "managed", "client_id": "c"},
                    "refresh": {"timeout_seconds": 3},
                },
            }
        ]
    }
    auth = parse(raw, {}).routes[0].auth
    assert isinstance(auth, AmlKeysAuth)
    assert (auth.subscription_id, auth.resource_group, auth.workspace, auth.endpoint, auth.service) == (
        "s",
        "g",
        "w",
        "e",
        None,
    )
    assert auth.refetch_seconds == 120.0 and auth.identity.client_id == "c" and auth.refresh.timeout_seconds == 3.0
    assert auth.template == "Bearer {key}" and auth.secret_refs() == ()


def load_script(name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_key_tables_of_configuration_md_are_generated_from_the_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/configuration.md's tables are what scripts/config_doc.py writes from the schema: every key with its
    default, variable, auth types and doc. A key added to the schema and not regenerated fails here."""
    from proxy.config.schema import Leaf

    generator = load_script("config_doc")
    current = generator.DOC_FILE.read_text(encoding="utf-8")
    assert generator.render(current) == current, "docs/configuration.md is out of date: run scripts/config_doc.py"
    for leaf in (*TOP_LEAVES, *ROUTE_LEAVES):
        assert env_name(leaf.key, route=leaf in ROUTE_LEAVES) in current
    added = Leaf("auth.audience", "optstr", None, "Audience of the token.", auth_types=("aad",))
    monkeypatch.setattr(generator, "ROUTE_LEAVES", (*ROUTE_LEAVES, added))
    regenerated = generator.render(current)
    assert regenerated != current and "`routes[].auth.audience` | null | `AML_AUTH_PROXY_ROUTE_AUTH_AUDIENCE`" in (
        regenerated
    )
