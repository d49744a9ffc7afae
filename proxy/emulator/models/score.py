"""The AML sample entry script: azmlinfsrv calls init() once, then run() with each request's raw JSON body."""

from __future__ import annotations

import json
from typing import Any

factor: int = 1


def init() -> None:
    global factor
    factor = 2


def run(raw_data: str) -> dict[str, list[Any]]:
    data = json.loads(raw_data)["data"]
    return {"result": [x * factor for x in data]}
