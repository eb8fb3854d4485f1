"""What every stage shares: its command line (an id and the paths dvc.yaml passes), params, the catalog, and
the measurement of each run (structured stage.* log events, wall time, peak RSS, bytes moved, the build
metrics file)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fuseline.core.build_metrics import id_field, stats_path
from fuseline.core.catalog.loading import load_catalog
from fuseline.core.catalog.model import Catalog
from fuseline.core.catalog.problems import CatalogError
from fuseline.core.errors import FuselineError
from fuseline.core.files import atomic_write
from fuseline.core.logs import log_event, setup_logging
from fuseline.core.redact import redact
from stages.errors import StageError

log = logging.getLogger("fuseline.stages")

CATALOG_FILE = "templates.json"
PARAMS_FILE = "params.yaml"


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


# Fields the running stage adds to its metrics file (record_metrics); None outside a measured stage.
_stage_metrics: dict[str, Any] | None = None


def record_metrics(**fields: Any) -> None:
    """Add `fields` to the running stage's metrics file (written only if the stage succeeds). Outside
    measure_stage (a test calling a stage's main directly) there is no file, and this does nothing."""
    if _stage_metrics is None:
        log.debug("record_metrics outside a measured stage: %s dropped", sorted(fields))
        return
    _stage_metrics.update(fields)


def io_counters() -> dict[str, int] | None:
    """This process's /proc/self/io counters (Linux), or None where there is no such file."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return {key: int(value) for key, _, value in (line.partition(": ") for line in text.splitlines())}


def io_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int | None]:
    """Bytes this process moved between two io_counters() snapshots.

    `bytes_read`/`bytes_written` are rchar/wchar: bytes through read()/write() syscalls, from disk or page
    cache alike. That is the data the stage moved, the same on a warm or cold machine, and it covers the
    merge's streaming (plain reads into buffers, plain writes). It does NOT see memory-mapped reads
    (safetensors' own loaders, torch.load(mmap=True): diffusers in convert and verify), and it includes
    imports, pipes and the terminal. `disk_read_bytes`/`disk_write_bytes` are read_bytes/write_bytes: what
    reached the storage layer (mmap page-ins included, page-cache hits not; writes counted when pages are
    dirtied), i.e. real disk traffic, near 0 for reads on a warm cache. Both are reported; neither is
    estimated.

    Scope: the kernel adds a child process's I/O counters to its parent's when the parent waits for it, so
    these figures include every subprocess the stage ran and waited for (none of today's stages does; a
    future one shelling out would have its children's bytes counted here). peak_rss_mb(), by contrast, is
    the stage process alone (VmHWM): a child's memory is not in it."""
    names = {
        "bytes_read": "rchar",
        "bytes_written": "wchar",
        "disk_read_bytes": "read_bytes",
        "disk_write_bytes": "write_bytes",
    }
    if before is None or after is None:
        return dict.fromkeys(names)
    return {name: after.get(key, 0) - before.get(key, 0) for name, key in names.items()}


def _json_safe(value: Any) -> Any:
    """`value` ready for a metrics file: strings redacted, non-finite floats as null (DVC reads strict
    JSON), tuples as lists."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


def write_stage_metrics(
    stage: str, item_id: str, record: dict[str, Any], root: str | os.PathLike[str] = "."
) -> Path:
    """Write `record` as `artifacts/stats/<stage>/<id>.json`, atomically (temporary file, then rename):
    DVC, `fuseline report` and a crash at any moment see the old file, the new one, or none."""
    text = json.dumps(_json_safe(record), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write(stats_path(stage, item_id, root), text)


def stage_ids(stage: str, item_id: str) -> dict[str, str]:
    """The id fields of a stage's events and metrics: `stage`, `id`, and `template` or `checkpoint`."""
    ids = {"stage": stage, "id": item_id}
    kind = id_field(stage)
    if kind is not None:
        ids[kind] = item_id
    return ids


@contextlib.contextmanager
def measure_stage(stage: str, item_id: str) -> Iterator[dict[str, Any]]:
    """Measure one stage run: log `stage.start`, then `stage.done` with wall time, peak RSS and bytes read
    and written, and write them (plus what the stage gave record_metrics) to its metrics file; or log
    `stage.failed` with the error code and write nothing (a failed stage leaves no outputs)."""
    global _stage_metrics
    ids = stage_ids(stage, item_id)
    log_event(log, "stage.start", f"stage {stage}@{item_id} started", **ids)
    reset_peak_rss()
    io_before = io_counters()
    start = time.perf_counter()
    outer, _stage_metrics = _stage_metrics, {}
    extra = _stage_metrics
    try:
        yield extra
    except BaseException as exc:
        wall_ms = round((time.perf_counter() - start) * 1000, 1)
        if isinstance(exc, FuselineError):
            code, message = exc.code, exc.message
        else:  # a bug (its traceback follows from Python) or an interrupt
            code, message = ("INTERNAL" if isinstance(exc, Exception) else "INTERRUPTED"), repr(exc)
        log_event(log, "stage.failed", f"stage {stage}@{item_id} failed: [{code}] {message}",
                  level=logging.ERROR, **ids, code=code, error=message, wall_ms=wall_ms)  # fmt: skip
        raise
    finally:
        _stage_metrics = outer
    measured = {
        "wall_ms": round((time.perf_counter() - start) * 1000, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **io_delta(io_before, io_counters()),
    }
    # The measurement and ids win over a stage's own field of the same name. Cleaned once for both the file
    # and the event (a NaN field would make the JSON formatter drop the whole record).
    extra = _json_safe(extra)
    path = write_stage_metrics(stage, item_id, {**extra, **ids, **measured})
    log_event(
        log,
        "stage.done",
        f"stage {stage}@{item_id} done in {measured['wall_ms'] / 1000:.2f} s,"
        f" peak RSS {measured['peak_rss_mb']:.0f} MiB",
        **ids,
        **measured,
        metrics=path.as_posix(),
        **{k: v for k, v in extra.items() if k not in {*ids, *measured, "metrics", "level"}},
    )


def run_stage(
    stage: str,
    main: Callable[..., Any],
    argv: list[str] | None = None,
    *,
    paths: Sequence[str] = (),
    optional_paths: Sequence[str] = (),
    fixed_id: str | None = None,
) -> None:
    """Entry point of `python -m stages.<stage> <id> --<path> PATH ...`: run main(id, **paths) under
    measure_stage. Every input and output path comes from the command line (dvc.yaml writes each once);
    `paths` are required, `optional_paths` default to None. A stage serving the whole catalog (vae) has
    a `fixed_id` and no id argument.

    A FuselineError exits 1 with its message only; anything else is a bug and keeps its traceback.
    """
    setup_logging()
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}")
    if fixed_id is None:
        parser.add_argument("id", help="the checkpoint or template id (a key of templates.json)")
    for name in paths:
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=Path, required=True, metavar="PATH"
        )
    for name in optional_paths:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, default=None, metavar="PATH")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    item_id = fixed_id if fixed_id is not None else args.id
    options = {name: getattr(args, name) for name in (*paths, *optional_paths)}
    try:
        with measure_stage(stage, item_id):
            main(item_id, **options)
    except FuselineError as exc:
        # One plain line for a person reading `dvc repro` output, beside the stage.failed record.
        print(redact(f"error: stage {stage}@{item_id}: {exc}"), file=sys.stderr)
        raise SystemExit(1) from None
