"""Weakenings of AKS identity bindings and of the route-kinds page's check (see tests/mutation.py)."""

from __future__ import annotations

from tests.mutation import Mutant

BINDING = "tests/test_identity_binding.py"
KINDS = "tests/test_route_kinds_doc.py"

MUTANTS = [
    Mutant(
        name="identity_binding_switch_not_passed_to_azure_identity",
        path="proxy/credentials/identity.py",
        old='            kwargs["enable_azure_proxy"] = True\n',
        new='            kwargs["enable_azure_proxy"] = False\n',
        tests=(f"{BINDING}::test_azure_proxy_gets_the_token_through_the_identity_binding_proxy_with_its_sni",),
    ),
    Mutant(
        name="identity_binding_old_azure_identity_not_refused",
        path="proxy/config/checks.py",
        old="    if version is None or _release(version) < AZURE_PROXY_MIN_IDENTITY:\n",
        new="    if False:\n",
        tests=(f"{BINDING}::test_an_azure_identity_without_enable_azure_proxy_is_a_config_error",),
    ),
    Mutant(
        name="route_kinds_doc_check_skips_a_block",
        path="tests/test_route_kinds_doc.py",
        old="    for number, block in enumerate(yaml_blocks(text), start=1):\n",
        new="    for number, block in enumerate(yaml_blocks(text)[:-1], start=1):\n",
        tests=(f"{KINDS}::test_the_block_check_finds_a_bad_block_in_any_position",),
    ),
]
