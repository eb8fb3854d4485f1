"""What the worker promises about itself: documented error codes, and no build-side imports."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from worker.errors import ERROR_CODES, ERROR_TYPES

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "worker"


def test_every_error_code_is_documented() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split("## Error codes", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", section, re.M))
    assert documented == set(ERROR_CODES)


def test_every_error_type_has_a_known_code() -> None:
    assert {error.code for error in ERROR_TYPES} == set(ERROR_CODES)


# The modules a job's output passes through (volume sync runs at start and has codes of its own).
SERVING_MODULES = (
    "errors",
    "generate",
    "handler",
    "images",
    "inputs",
    "pipelines",
    "prompt_syntax",
    "prompts",
    "schedulers",
    "settings",
)


def test_codes_in_the_serving_source_are_registered() -> None:
    """A `[CODE]` literal written in the serving path must be one of the documented codes."""
    for path in (WORKER / f"{name}.py" for name in SERVING_MODULES):
        # "[CODE] message" in docstrings is the placeholder, not a code.
        for code in set(re.findall(r'"\[([A-Z_]{4,})\]', path.read_text())) - {"CODE"}:
            assert code in ERROR_CODES, f"{path.name}: [{code}]"


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def test_worker_source_never_imports_dvc_or_stages() -> None:
    for path in WORKER.glob("*.py"):
        for module in imported_modules(path):
            top = module.split(".")[0]
            assert top not in ("dvc", "stages", "dvc_s3", "dvc_data"), f"{path.name} imports {module}"


def test_importing_the_handler_pulls_in_no_build_side_module() -> None:
    code = (
        "import sys, worker.handler, worker.generate, worker.pipelines, worker.prompts\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dvc', 'stages', 'peft'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == ""
