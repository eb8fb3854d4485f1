"""`fuseline report`: a per-template summary of the build metrics (size, build time, LoRAs, placed keys,
verify result) read from the metrics files of the last build (fuseline/core/build_metrics.py says where).

Every stage run (stages.runtime.measure_stage) writes its file: wall time, peak RSS, bytes read and written,
plus what the stage adds (merge: LoRA keys placed per component and per LoRA, model size; verify: result,
timings, preview). dvc.yaml declares them as `metrics:` (cached and pushed like the models, so the
run-cache restores them on any machine), and `dvc metrics show` / `dvc metrics diff` compare builds across
commits (docs/operations.md "Logs and build metrics"). The report needs no DVC, torch or catalog model to
read a few JSON files.
"""

from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fuseline.core.build_metrics import (
    CHECKPOINT_STAGES,
    SHARED_STAGES,
    STATS_DIR,
    TEMPLATE_STAGES,
    repair_advice,
    stage_name,
)
from fuseline.core.catalog.loading import load_catalog
from fuseline.core.catalog.problems import CatalogError
from fuseline.core.redact import redact


def load_stats(root: str | os.PathLike[str] = ".") -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """({stage: {id: metrics}}, problems) from every metrics file under `root`; an unreadable file is a
    problem (named, with the fix), never a crash of the report."""
    stats: dict[str, dict[str, dict[str, Any]]] = {}
    problems: list[str] = []
    base = Path(root) / STATS_DIR
    if not base.is_dir():
        return stats, problems
    for path in sorted(base.glob("*/*.json")):
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: unreadable ({exc}); {repair_advice(path.parent.name, path.stem)}")
            continue
        stats.setdefault(path.parent.name, {})[path.stem] = data
    return stats, problems


# A verify stage writes its metrics file only when it passes, so a template without one was either never
# verified or failed verification; the report cannot tell which, and says so (the stage's `stage.failed` log
# line, under `dvc repro`, says why).
NO_VERIFY_RESULT = "not verified (or failed: see the verify stage's log)"


@dataclass
class TemplateReport:
    template: str
    checkpoint: str | None = None
    built: bool = False
    model_bytes: int | None = None
    build_ms: float | None = None  # the template's own stages (fetch-loras, merge, verify)
    stage_ms: dict[str, float] = field(default_factory=dict)
    loras: list[dict[str, Any]] = field(default_factory=list)
    placed_keys: dict[str, int] = field(default_factory=dict)
    verify: str = NO_VERIFY_RESULT
    preview: str | None = None
    in_catalog: bool = True


@dataclass
class BuildReport:
    root: str
    templates: list[TemplateReport]
    shared_ms: dict[str, float]  # `stage@id` -> wall ms for stages not owned by one template
    problems: list[str]

    @property
    def empty(self) -> bool:
        return not any(t.built or t.stage_ms for t in self.templates) and not self.shared_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "templates": [asdict(t) for t in self.templates],
            "shared_stage_ms": self.shared_ms,
            "problems": self.problems,
        }


def _catalog_templates(root: Path, problems: list[str]) -> dict[str, str]:
    """{template: checkpoint} from the project's templates.json; {} (and a problem) when it cannot be read."""
    path = root / "templates.json"
    if not path.is_file():
        return {}
    try:
        catalog = load_catalog(path)
    except CatalogError as exc:
        problems.append(f"{path}: invalid ({len(exc.errors)} errors; run `fuseline validate {path}`)")
        return {}
    return {tid: template.checkpoint for tid, template in catalog.templates.items()}


def _template_report(
    template: str, stats: dict[str, dict[str, dict[str, Any]]], root: Path
) -> TemplateReport:
    report = TemplateReport(template=template)
    for stage in TEMPLATE_STAGES:
        entry = stats.get(stage, {}).get(template)
        if entry is not None and isinstance(entry.get("wall_ms"), int | float):
            report.stage_ms[stage] = float(entry["wall_ms"])
    if report.stage_ms:
        report.build_ms = round(sum(report.stage_ms.values()), 1)
    merge = stats.get("merge", {}).get(template)
    if merge is not None:
        report.built = True
        report.checkpoint = merge.get("checkpoint")
        report.model_bytes = merge.get("model_bytes")
        loras = merge.get("loras") or {}
        # DVC drops lists from metrics, so the stage writes LoRAs as {"0": ..., "1": ...} in fusing order.
        for key in sorted(loras, key=lambda k: int(k) if str(k).isdigit() else 0):
            lora = loras[key]
            report.loras.append({k: lora.get(k) for k in ("source", "scale", "file_keys", "placed_keys")})
        report.placed_keys = dict(merge.get("placed_keys") or {})
    verify = stats.get("verify", {}).get(template)
    if verify is not None:
        report.verify = str(verify.get("result", "unknown"))
        preview = verify.get("preview")
        if preview and (root / preview).is_file():
            report.preview = str(preview)
    return report


def build_report(root: str | os.PathLike[str] = ".") -> BuildReport:
    """The per-template summary of the build metrics under `root` (a DVC project folder)."""
    root = Path(root)
    stats, problems = load_stats(root)
    catalog = _catalog_templates(root, problems)
    built = set(stats.get("merge", {})) | {t for s in TEMPLATE_STAGES for t in stats.get(s, {})}
    templates = []
    for template in sorted(set(catalog) | built):
        report = _template_report(template, stats, root)
        report.checkpoint = report.checkpoint or catalog.get(template)
        report.in_catalog = not catalog or template in catalog
        templates.append(report)
    shared = {
        stage_name(stage, item_id): float(entry["wall_ms"])
        for stage in (*CHECKPOINT_STAGES, *SHARED_STAGES)
        for item_id, entry in sorted(stats.get(stage, {}).items())
        if isinstance(entry.get("wall_ms"), int | float)
    }
    return BuildReport(root=str(root), templates=templates, shared_ms=shared, problems=problems)


def _size(num: int | None) -> str:
    if num is None:
        return "-"
    value = float(num)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"  # unreachable; keeps type checkers content


def _seconds(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.1f} s"


def _lora_name(source: str | None) -> str:
    """A LoRA source shortened for a table cell: a file's name, anything else as written (redacted)."""
    text = redact(source or "?")
    if text.startswith(("file:", "https://", "http://", "s3://")):
        return text.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or text
    return text


COMPONENT_ORDER = ("unet", "text_encoder", "text_encoder_2")


def _placed_cell(t: TemplateReport) -> str:
    if not t.built:
        return "-"
    order = [c for c in COMPONENT_ORDER if c in t.placed_keys] + sorted(
        c for c in t.placed_keys if c not in COMPONENT_ORDER and c != "total"
    )
    parts = ", ".join(f"{c} {t.placed_keys[c]}" for c in order if t.placed_keys[c])
    return f"{t.placed_keys.get('total', 0)} ({parts or 'none'})"


def render_table(report: BuildReport) -> Any:
    """The report as a rich Table. Every cell is escaped: ids, file names and paths are data, and rich would
    otherwise read `[red]` in a LoRA's file name as markup and drop it."""
    table = Table(title=f"fuseline build metrics ({report.root})", title_justify="left")
    for column in ("Template", "Checkpoint", "Size", "Build", "LoRAs", "Placed keys", "Verify", "Preview"):
        table.add_column(column, overflow="fold")
    for t in report.templates:
        loras = ", ".join(f"{_lora_name(lora['source'])} x{lora['scale']}" for lora in t.loras)
        cells = (
            t.template + ("" if t.in_catalog else " (not in catalog)"),
            t.checkpoint or "-",
            _size(t.model_bytes),
            _seconds(t.build_ms),
            f"{len(t.loras)}: {loras}" if t.loras else ("0" if t.built else "-"),
            _placed_cell(t),
            t.verify if t.built or t.verify != NO_VERIFY_RESULT else "not built",
            t.preview or "-",
        )
        table.add_row(*(escape(cell) for cell in cells))
    return table


def render_text(report: BuildReport, console: Any = None) -> str:
    """The report as text: the table, the shared stages' times, any problems. Without a `console` (output
    piped or captured) it is plain: no colour codes, and wide enough that no cell wraps."""
    buffer = io.StringIO()
    console = console or Console(file=buffer, width=1000, highlight=False, color_system=None)
    console.print(render_table(report))
    if report.shared_ms:
        shared = ", ".join(f"{name} {_seconds(ms)}" for name, ms in report.shared_ms.items())
        console.print(
            f"Shared stages (not in a template's build time): {shared}", soft_wrap=True, markup=False
        )
    for problem in report.problems:
        console.print(f"problem: {problem}", soft_wrap=True, markup=False, highlight=False)
    return buffer.getvalue()


def register(app: typer.Typer) -> None:
    """Add `fuseline report` to the main typer app (fuseline/cli/__init__.py calls this)."""

    @app.command("report")
    def report_command(
        project: Annotated[Path, typer.Option("--project", help="The DVC project's root folder.")] = Path(
            "."
        ),
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    ) -> None:
        """Per-template build metrics of the last build (size, build time, LoRAs, placed keys, verify)."""
        report = build_report(project)
        if as_json:
            typer.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
            return
        if report.empty:
            typer.echo(
                f"nothing built yet: no build metrics under {project / STATS_DIR} "
                "(run `dvc repro`, or `dvc repro --pull` to restore a build from the remote)"
            )
            for problem in report.problems:
                typer.echo(f"problem: {problem}")
            return
        if sys.stdout.isatty():  # a person at a terminal: its width, colours
            render_text(report, Console(highlight=False))
        else:
            typer.echo(render_text(report), nl=False)
