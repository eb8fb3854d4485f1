"""Benchmarks at real SDXL scale (not part of `make test`; its tests run their --quick modes). See
docs/benchmarks.md for what each measures and the figures recorded so far."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# What a figure depends on, for `code_version` (the build side, the worker, the benchmarks themselves).
CODE_PATHS = ("stages", "worker", "fuseline", "benchmarks", "dvc.yaml", "params.yaml", ".dvc")


def code_version(paths: tuple[str, ...] = CODE_PATHS) -> dict[str, Any]:
    """The repo's HEAD and which of `paths` differ from it: the code a figure was measured on."""

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        # Not stripped on the left: porcelain status lines start with a space for unstaged changes.
        return proc.stdout.rstrip() if proc.returncode == 0 else ""

    modified = [line[3:] for line in git("status", "--porcelain", "--", *paths).splitlines()]
    return {"head": git("rev-parse", "--short", "HEAD").strip(), "modified": modified}


def machine_load() -> dict[str, Any]:
    """The load averages and the time now: every figure is reported with the load it was measured under."""
    return {
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def save_summary(summary: dict[str, Any], json_out: Path | None) -> str:
    """The run's summary as indented JSON; also written to `json_out` (folders made) when given."""
    text = json.dumps(summary, indent=2, sort_keys=True)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    return text
