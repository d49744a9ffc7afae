"""docs/route-kinds.md: every config block on the page passes the config parser (what `check-config` runs), every
route kind has one, and every link of its table leads to a heading of the page."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from proxy.config.reader import parse
from proxy.config.settings import AUTH_TYPES, ConfigError

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "route-kinds.md"
GOOD = "routes:\n  - upstream: https://x.example\n    auth: {type: key, primary_file: /k}\n"
BAD = "routes:\n  - upstream: ftp://x.example\n    auth: {type: key, primary_file: /k}\n"


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```$", text, re.M | re.S)


def block_problems(text: str) -> list[str]:
    """One line per problem of each ```yaml block, prefixed with the block's number (from 1)."""
    problems: list[str] = []
    for number, block in enumerate(yaml_blocks(text), start=1):
        try:
            parse(yaml.safe_load(block), {})
        except (ConfigError, yaml.YAMLError) as exc:
            problems += [f"block {number}: {line}" for line in str(exc).splitlines()]
    return problems


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces to dashes."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


def test_every_config_block_on_the_page_passes_check_config() -> None:
    text = PAGE.read_text(encoding="utf-8")
    blocks = yaml_blocks(text)
    assert len(blocks) == text.count("```yaml") >= 12
    assert block_problems(text) == []


def test_every_route_kind_has_a_config_on_the_page() -> None:
    kinds = {parse(yaml.safe_load(b), {}).routes[0].auth.type for b in yaml_blocks(PAGE.read_text(encoding="utf-8"))}
    assert kinds == set(AUTH_TYPES)


def test_the_tables_links_lead_to_headings_of_the_page() -> None:
    text = PAGE.read_text(encoding="utf-8")
    anchors = {_anchor(h) for h in re.findall(r"^#{2,3} (.+)$", text, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links and set(links) <= anchors, sorted(set(links) - anchors)


def test_the_block_check_finds_a_bad_block_in_any_position() -> None:
    """The check itself: a page whose first, middle or last block is bad is refused, naming that block."""
    for position in range(3):
        blocks = [GOOD, GOOD, GOOD]
        blocks[position] = BAD
        page = "".join(f"text\n\n```yaml\n{block}```\n\n" for block in blocks)
        problems = block_problems(page)
        assert problems and all(p.startswith(f"block {position + 1}: routes[0].upstream") for p in problems), problems


def test_the_page_states_the_v2_and_legacy_facts() -> None:
    text = PAGE.read_text(encoding="utf-8")
    assert "`aad_token` works on managed online endpoints only" in text.replace("**", "")
    assert "2026-06-30" in text and "2025-09-30" in text and "azureml-model-deployment" in text
    for scope in ("https://cognitiveservices.azure.com/.default", "https://ai.azure.com/.default"):
        assert scope in text


def test_the_config_blocks_of_configuration_md_and_the_readme_pass_too() -> None:
    for path in (ROOT / "docs" / "configuration.md", ROOT / "README.md"):
        text = path.read_text(encoding="utf-8")
        assert yaml_blocks(text) and block_problems(text) == [], path.name
