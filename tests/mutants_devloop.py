"""Weakenings of the first hour of a user: the emulator's proxy config, the CLI's answers, the demo's story
(see tests/mutation.py)."""

from __future__ import annotations

from tests.mutation import Mutant

LOOP = "tests/test_dev_loop.py"
CONFIG = "tests/test_config.py"
DOCS = "tests/test_docs.py"

MUTANTS = [
    Mutant(
        name="proxy_config_without_the_emulator_ca",
        path="proxy/emulator/proxyconfig.py",
        old='    upstream_tls = {"ca_file": emulator.ca_file} if cfg.tls and emulator.ca_file else None',
        new="    upstream_tls = None",
        tests=(f"{LOOP}::test_the_three_line_dev_loop_with_the_default_emulator",),
    ),
    Mutant(
        name="proxy_config_without_tls",
        path="proxy/emulator/main.py",
        old="    if args.tls or args.proxy_config:",
        new="    if args.tls:",
        tests=(f"{LOOP}::test_the_dev_loop_reaches_every_kind_of_emulated_service",),
    ),
    Mutant(
        name="proxy_config_token_routes_on_the_wrong_plane",
        path="proxy/emulator/proxyconfig.py",
        old='        elif sc.api == "v1":',
        new='        elif sc.api == "v2":',
        tests=(f"{LOOP}::test_the_dev_loop_reaches_every_kind_of_emulated_service",),
    ),
    Mutant(
        name="no_config_gets_the_schema_error",
        path="proxy/cli.py",
        old="and args.config is None and not _configured_by_environment():",
        new="and False:",
        tests=(f"{CONFIG}::test_run_and_check_config_without_any_config_say_how_to_give_one",),
    ),
    Mutant(
        name="demo_logs_on_the_screen",
        path="proxy/demo.py",
        old='    with log_path.open("w", encoding="utf-8") as log, contextlib.redirect_stdout(log):',
        new='    with log_path.open("w", encoding="utf-8") as log, contextlib.nullcontext():',
        tests=(f"{DOCS}::test_demo_tells_its_story_in_at_most_60_lines_and_says_what_happened",),
    ),
    Mutant(
        name="demo_prints_running_sums",
        path="proxy/demo.py",
        old="        p50, p95 = (histogram_quantile(metrics, DURATION, labels, q) or 0.0 for q in (0.5, 0.95))",
        new='        p50 = p95 = sample(metrics, DURATION + "_sum", region=region)',
        tests=(f"{DOCS}::test_demo_tells_its_story_in_at_most_60_lines_and_says_what_happened",),
    ),
    Mutant(
        name="a dataclass default drifts from the schema's",
        path="proxy/config/settings.py",
        old="    max_headers: int = 100\n",
        new="    max_headers: int = 99\n",
        tests=(f"{CONFIG}::test_every_default_written_in_a_dataclass_is_the_schemas",),
    ),
    Mutant(
        name="--workers keeps its own range",
        path="proxy/cli.py",
        old="        if not _WORKERS_MIN <= args.workers <= _WORKERS_MAX:",
        new="        if not 0 <= args.workers <= 1000:",
        tests=(f"{CONFIG}::test_the_cli_takes_workers_in_the_schemas_range",),
    ),
    Mutant(
        name="a key the schema gives an auth type is missing from its class",
        path="proxy/config/settings.py",
        old="    token_file: str\n    reload_seconds: float\n",
        new="    token_file: str\n",
        tests=(f"{CONFIG}::test_each_auth_type_holds_exactly_the_schemas_keys_for_it",),
    ),
    Mutant(
        name="the schema lets a key its class requires be absent",
        path="proxy/config/schema.py",
        old="        required_for=(AML_SERVICE_TOKEN,),  # aml-keys needs it with auth.service",
        new="        # aml-keys needs it with auth.service",
        tests=(f"{CONFIG}::test_each_auth_type_holds_exactly_the_schemas_keys_for_it",),
    ),
    Mutant(
        name="a key's doc changed in the schema, the docs table not regenerated",
        path="proxy/config/schema.py",
        old='"Address the proxy port binds to."',
        new='"Address the proxy port listens on."',
        tests=(f"{CONFIG}::test_the_key_tables_of_configuration_md_are_generated_from_the_schema",),
    ),
]
