"""The package layers (pyproject.toml [tool.importlinter], run by `make lint`): the tree keeps every
contract, and an import that crosses one breaks the lint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")
PACKAGES = ("fuseline", "stages", "worker", "testkit")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy's packages, not the editable install's
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_tree_keeps_every_contract() -> None:
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("worker/sync/volume.py", "import torch", "The worker's sync imports no torch or diffusers"),
        ("fuseline/core/manifest.py", "import stages.runtime", "The core imports nothing above it"),
        ("worker/folders.py", "import worker.serving", "The worker's arrows point one way"),
        ("worker/settings.py", "import stages.errors", "The worker imports nothing from the build side"),
        ("stages/merge.py", "import testkit.models", "Nothing outside tests, benchmarks and the demo"),
        ("stages/sources/errors.py", "import stages.runtime", "The sources library imports no stage"),
        ("fuseline/publish/errors.py", "import stages.errors", "Packages stand on the core"),
    ],
)
def test_an_import_crossing_a_contract_breaks_the_lint(tmp_path: Path, module: str, line: str, contract: str):
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / module).open("a") as handle:
        handle.write(f"\n{line}  # noqa\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout[-4000:]
    # The broken contract heads the report's "Broken contracts" section, with the offending import.
    assert "Broken contracts" in proc.stdout, proc.stdout[-4000:]
    report = " ".join(proc.stdout.split("Broken contracts", 1)[-1].split())
    assert contract in report and line.split()[-1] in report, proc.stdout[-4000:]
