"""Scratch DVC projects: a copy of the repo's pipeline wiring (dvc.yaml, params.yaml, stages/, fuseline/)
with its own templates.json, driven by the real `dvc` CLI in a subprocess. Used by the tests and the demo."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# What a stage process needs from the repo; tests/ and the kit (testkit/, outside fuseline/) stay behind.
COPIED = ("dvc.yaml", "params.yaml", ".dvcignore", "stages", "fuseline")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")
RUNNING_STAGE = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment stage commands run in: this venv's `python` first on PATH, nothing online."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        {
            "DVC_NO_ANALYTICS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "DIFFUSERS_OFFLINE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    env.pop("PYTHONPATH", None)
    env.update(extra or {})
    return env


@dataclass
class DvcProject:
    root: Path
    env: dict[str, str] = field(default_factory=dvc_env)

    def dvc(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(VENV_BIN / "dvc"), *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"`dvc {' '.join(args)}` exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    def repro(self, *targets: str) -> list[str]:
        """Run `dvc repro`; return the stages that actually ran (DVC prints 'Running stage' only for those;
        skipped ones say 'didn't change')."""
        proc = self.dvc("repro", *targets)
        return RUNNING_STAGE.findall(proc.stdout)

    def status(self) -> dict[str, Any]:
        """`dvc status --json`: {stage: [changes]} for every stage that would run; {} when up to date."""
        return json.loads(self.dvc("status", "--json").stdout or "{}")

    @property
    def catalog_path(self) -> Path:
        return self.root / "templates.json"

    def read_catalog(self) -> dict[str, Any]:
        return json.loads(self.catalog_path.read_text())

    def write_catalog(
        self, catalog: dict[str, Any], *, indent: int | None = 2, sort_keys: bool = False
    ) -> None:
        self.catalog_path.write_text(json.dumps(catalog, indent=indent, sort_keys=sort_keys) + "\n")

    def edit_catalog(self, edit: Callable[[dict[str, Any]], None]) -> None:
        catalog = self.read_catalog()
        edit(catalog)
        self.write_catalog(catalog)

    def set_params(self, section: str, **values: Any) -> None:
        path = self.root / "params.yaml"
        params = yaml.safe_load(path.read_text())
        params.setdefault(section, {}).update(values)
        path.write_text(yaml.safe_dump(params, sort_keys=False))

    def lock(self) -> dict[str, Any]:
        """dvc.lock as data (the hashes DVC recorded for each stage's deps and outs)."""
        return yaml.safe_load((self.root / "dvc.lock").read_text())


def make_dvc_project(
    root: Path, catalog: dict[str, Any], params: dict[str, dict[str, Any]] | None = None
) -> DvcProject:
    """A DVC project (no git) at `root` with the repo's pipeline and `catalog` as templates.json.
    `params` overrides keys of params.yaml sections (e.g. {"merge": {"shard_size_mb": 1}}).

    When `root` already holds a project, its pipeline files are replaced by the repo's current ones and
    the catalog and params rewritten, while .dvc/ (cache, config), dvc.lock and artifacts/ stay: DVC
    compares file contents and parsed values, so an unchanged pipeline re-runs nothing."""
    root.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src, dst = REPO / name, root / name
        if src.is_dir():
            # Replaced whole, so a file removed from the repo does not linger as a stale stage module.
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=IGNORED)
        else:
            shutil.copy2(src, dst)
    project = DvcProject(root)
    if not (root / ".dvc").is_dir():
        project.dvc("init", "--no-scm", "-q")
        project.dvc("config", "core.analytics", "false")
    project.write_catalog(catalog)
    for section, values in (params or {}).items():
        project.set_params(section, **values)
    return project
