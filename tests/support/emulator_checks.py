"""Checks shared by the emulator's own tests (tests/test_emulator*.py)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config.settings import ConfigError
from proxy.emulator.runner import parse_config


def config_problems(raw: Any, *fragments: str) -> str:
    """The emulator refuses the config `raw` with problems that name every one of `fragments`; returns their text."""
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    text = "\n".join(info.value.problems)
    for fragment in fragments:
        assert fragment in text, fragment
    return text
