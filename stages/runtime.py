"""What every stage shares: argument handling, params, the catalog, atomic outputs, timing and peak RSS."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fuseline.catalog import Catalog, CatalogError, load_catalog

log = logging.getLogger("fuseline.stages")

CATALOG_FILE = "templates.json"
PARAMS_FILE = "params.yaml"


class StageError(Exception):
    """A failure the user can fix: printed as one clear message, no traceback, exit status 1."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


def load_project_catalog(path: str | os.PathLike[str] = CATALOG_FILE) -> Catalog:
    """The catalog in the stage's working directory (DVC runs stages from the folder holding dvc.yaml)."""
    try:
        return load_catalog(path)
    except CatalogError as exc:
        raise StageError(
            "CATALOG_INVALID", f"{path} is invalid; run `fuseline validate {path}`:\n{exc}"
        ) from exc


def load_params(section: str, path: str | os.PathLike[str] = PARAMS_FILE) -> dict[str, Any]:
    """One stage's section of params.yaml (each stage reads and tracks only its own section)."""
    import yaml

    params_path = Path(path)
    if not params_path.is_file():
        raise StageError(
            "PARAMS_MISSING", f"{params_path} not found; the stage needs its `{section}` section"
        )
    data = yaml.safe_load(params_path.read_text()) or {}
    if section not in data or not isinstance(data[section], dict):
        raise StageError("PARAMS_MISSING", f"{params_path}: no `{section}:` section; add it (see README)")
    return data[section]


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; rename it into place only if the block succeeds.

    On any error the temporary folder is removed and `final` is absent, so a failed stage never
    leaves a half-written model behind (DVC removes a stage's outputs before running it).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        raise


def reset_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux): ru_maxrss survives exec, so a stage started by DVC or
    pytest would otherwise report its parent's peak. Writing 5 to clear_refs resets VmHWM."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset_peak_rss(), in MiB."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; no /proc elsewhere


def setup_logging() -> None:
    level = os.environ.get("FUSELINE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def run_stage(stage: str, main: Callable[[str], Any], argv: list[str] | None = None) -> None:
    """Entry point of `python -m stages.<stage> <id>`: run main(id), log wall time and peak RSS.

    A StageError exits 1 with its message only; anything else is a bug and keeps its traceback.
    """
    setup_logging()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m stages.{stage} <id>", file=sys.stderr)
        raise SystemExit(2)
    item_id = args[0]
    reset_peak_rss()
    start = time.perf_counter()
    try:
        main(item_id)
    except StageError as exc:
        print(f"error: stage {stage}@{item_id}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    log.info(
        "stage %s@%s done in %.2f s, peak RSS %.0f MiB",
        stage,
        item_id,
        time.perf_counter() - start,
        peak_rss_mb(),
    )
