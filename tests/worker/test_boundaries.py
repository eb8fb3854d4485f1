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
    "device",
    "folders",
    "generate",
    "handler",
    "serving",
    "startup",
    "images",
    "inputs",
    "pipelines",
    "prompt_syntax",
    "prompts",
    "schedulers",
    "settings",
    "speed",
    "upload",
    "fallback",
    "telemetry",
    "image_fetch",
    "image_inputs",
    "masks",
    "modes",
    "image_job",
    "mode_pipelines",
)


def test_codes_in_the_serving_source_are_registered() -> None:
    """A `[CODE]` literal written in the serving path must be one of the documented codes."""
    for path in (WORKER / f"{name}.py" for name in SERVING_MODULES):
        # "[CODE] message" in docstrings is the placeholder, not a code.
        for code in set(re.findall(r'"\[([A-Z_]{4,})\]', path.read_text())) - {"CODE"}:
            assert code in ERROR_CODES, f"{path.name}: [{code}]"


def test_every_registered_code_is_raised_somewhere() -> None:
    """A documented code no code path can produce promises callers an answer they never get: each error
    type is raised (or built) outside errors.py, or its `[CODE]` is written as a literal."""
    sources = "\n".join(
        path.read_text() for name in SERVING_MODULES if name != "errors" for path in [WORKER / f"{name}.py"]
    )
    for error in ERROR_TYPES:
        used = re.search(rf"\b{error.__name__}\(", sources) or f'"[{error.code}]' in sources
        assert used, f"{error.__name__} ({error.code}) is raised nowhere in the serving modules"


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def test_worker_source_never_imports_dvc_or_stages() -> None:
    for path in WORKER.rglob("*.py"):
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


def logged_events() -> set[str]:
    """Every event name the worker passes to log_event as a literal, plus job.done/job.failed (chosen at
    run time in telemetry.finish_job)."""
    names = {"job.done", "job.failed"}
    for path in WORKER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "log_event":
                event = node.args[1]
                if isinstance(event, ast.Constant) and isinstance(event.value, str):
                    names.add(event.value)
    return names


def test_every_worker_log_event_and_counter_is_documented() -> None:
    from worker.telemetry import COUNTER_NAMES

    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split("\n## Worker logs\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([a-z_]+\.[a-z_]+)`", section))
    assert len(logged_events()) > 15  # the walk found the calls
    assert logged_events() <= documented, sorted(logged_events() - documented)
    for name in COUNTER_NAMES:
        assert f"`{name}`" in section, name
    for mode in ("generate", "files", "none"):
        assert f"- `{mode}`" in section, mode
    flat = " ".join(section.split())
    assert "exits with status **3**" in flat and "exits with status **1**" in flat  # local vs RunPod
    # Links to the section resolve (GitHub's anchor for "## Worker logs").
    for path in (REPO / "docs" / "operations.md", REPO / "README.md"):
        for anchor in re.findall(r"\(#([a-z-]+)\)", path.read_text()):
            headings = re.findall(r"^#+ (.+)$", text, re.M)
            assert anchor in {h.lower().replace(" ", "-") for h in headings}, f"{path.name}: #{anchor}"


def test_importing_the_sync_loads_no_torch() -> None:
    # `python -X importtime -c "import worker.sync"`: the sync runs before any model is loaded (and as its
    # own CLI); torch and diffusers would cost it seconds for nothing.
    code = "import worker.sync, worker.sync.cli, worker.sync.templates"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "worker.sync.templates" in imported  # the report lists the modules imported
    heavy = {
        name for name in imported if name.split(".")[0] in ("torch", "diffusers", "transformers", "peft")
    }
    assert not heavy, sorted(heavy)[:10]
