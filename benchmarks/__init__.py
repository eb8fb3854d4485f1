"""Benchmarks at real SDXL scale (not part of `make test`; its tests run their --quick modes). See
docs/benchmarks.md for what each measures and the figures recorded so far."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_summary(summary: dict[str, Any], json_out: Path | None) -> str:
    """The run's summary as indented JSON; also written to `json_out` (folders made) when given."""
    text = json.dumps(summary, indent=2, sort_keys=True)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    return text
