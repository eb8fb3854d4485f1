"""Where build metrics live: `artifacts/stats/<stage>/<id>.json`, one file per stage run.

The stage runner (stages/runtime.py) writes them, dvc.yaml declares them as each stage's `metrics:` (cached
and pushed like the models), and `fuseline report` reads them without DVC: three parties that must agree,
so the layout is written here once (tests/stages/test_metrics.py checks dvc.yaml against it).
"""

from __future__ import annotations

import os
from pathlib import Path

# Under artifacts/ with the other build products (DVC outputs, so git ignores them).
STATS_DIR = Path("artifacts/stats")
# Stages whose id is a template, or a checkpoint; the others (vae, fetch-vae) serve the whole catalog.
TEMPLATE_STAGES = ("fetch-loras", "merge", "verify")
CHECKPOINT_STAGES = ("fetch-checkpoint", "convert")
SHARED_STAGES = ("fetch-vae", "vae")
# Stages whose id is an add-on's name.
ADDON_STAGES = ("addon",)


def stats_path(stage: str, item_id: str, root: str | os.PathLike[str] = ".") -> Path:
    """Where the metrics of `stage@item_id` live (dvc.yaml declares the same path)."""
    return Path(root) / STATS_DIR / stage / f"{item_id}.json"


def id_field(stage: str) -> str | None:
    """The name the stage's id also goes by in logs and metrics: `template`, `checkpoint`, `addon` or
    None."""
    if stage in TEMPLATE_STAGES:
        return "template"
    if stage in CHECKPOINT_STAGES:
        return "checkpoint"
    if stage in ADDON_STAGES:
        return "addon"
    return None


def stage_name(stage: str, item_id: str) -> str:
    """The stage's name in dvc.yaml: `merge@t1` for a foreach stage, plain `vae` for a shared one."""
    return stage if stage in SHARED_STAGES else f"{stage}@{item_id}"


def repair_advice(stage: str, item_id: str) -> str:
    """How to get a damaged metrics file back. It is a cached output of its stage, so `dvc checkout` of that
    one path restores it from the cache; `dvc repro` of that one stage (no `-f`, which would also re-run
    every stage upstream of it) re-runs it only if the cache cannot."""
    relative = (STATS_DIR / stage / f"{item_id}.json").as_posix()
    name = stage_name(stage, item_id)
    return (
        f"restore it with `dvc checkout {relative}` (a cached output of stage `{name}`); if the cache lacks "
        f"it, `dvc pull {relative}` or `dvc repro {name}`"
    )
