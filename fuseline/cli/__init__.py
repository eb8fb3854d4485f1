"""The `fuseline` command line: one typer app, one subcommand per task (validate, lock, schema, publish,
release, gc, report); `python -m fuseline.cli` runs it too."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from fuseline.cli.ci import register as register_ci_commands
from fuseline.cli.publish import register as register_publish_commands
from fuseline.cli.report import register as register_report_command
from fuseline.core.catalog.loading import load_catalog
from fuseline.core.catalog.model import Catalog, catalog_json_schema
from fuseline.core.catalog.problems import CatalogError, Problem

app = typer.Typer(
    name="fuseline",
    help="Bake LoRAs into SDXL templates with DVC and serve them on RunPod serverless.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """fuseline: build and serve SDXL templates described by templates.json."""
    # A callback keeps typer in "group" mode, so `fuseline validate` stays a subcommand even while it is
    # the only one, and other commands can be added next to it.


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _print_problems(problems: list[Problem]) -> None:
    # rich only on a terminal: piped output stays plain, unwrapped and free of escape codes, one problem
    # per line, so it can be grepped and read in CI logs.
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.markup import escape

        console = Console(highlight=False)
        for problem in problems:
            style = "red" if problem.severity == "error" else "yellow"
            where = f"{problem.file}: {problem.path}: " if problem.path else f"{problem.file}: "
            fix = f" [dim](fix: {escape(problem.hint)})[/dim]" if problem.hint else ""
            console.print(
                f"[{style}]{problem.severity}[/{style}] {escape(where)}{escape(problem.message)}{fix}"
            )
    else:
        for problem in problems:
            typer.echo(str(problem))


def _summary(catalog: Catalog) -> str:
    return f"{_plural(len(catalog.checkpoints), 'checkpoint')}, {_plural(len(catalog.templates), 'template')}"


@app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="The catalog to check.", show_default=True)] = Path(
        "templates.json"
    ),
) -> None:
    """Check a templates.json and report every problem at once (exit 1 when it has errors)."""
    try:
        catalog = load_catalog(path)
    except CatalogError as exc:
        _print_problems(exc.problems)
        errors, warnings = len(exc.errors), len(exc.warnings)
        tail = f", {_plural(warnings, 'warning')}" if warnings else ""
        typer.echo(f"{path}: invalid: {_plural(errors, 'error')}{tail}")
        raise typer.Exit(1) from None
    _print_problems(catalog.warnings)
    tail = f", {_plural(len(catalog.warnings), 'warning')}" if catalog.warnings else ""
    typer.echo(f"{path}: valid ({_summary(catalog)}{tail})")


@app.command()
def lock(
    path: Annotated[Path, typer.Argument(help="The catalog to pin.", show_default=True)] = Path(
        "templates.json"
    ),
    verify: Annotated[
        bool, typer.Option("--verify", help="Also check existing pins against the metadata.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report only; write nothing.")] = False,
) -> None:
    """Fill missing sha256 pins of civitai: and hf: sources from their metadata, editing the catalog in
    place (formatting kept); exit 1 on an error or a pin that disagrees with the metadata."""
    # Imported here: the sources library (requests, huggingface_hub) is build-side; `validate` and
    # `schema` stay light.
    from fuseline.core.errors import FuselineError
    from fuseline.core.logs import setup_logging
    from fuseline.core.redact import install_redaction, redact
    from stages.settings import BuildSettings
    from stages.sources.download import RetryPolicy
    from stages.sources.lock import lock_catalog

    # The filter goes on handlers, and a bare root logger has none (its records would reach Python's
    # unfiltered last-resort handler): give it the stages' stderr handler first.
    setup_logging()
    install_redaction()
    if not path.is_file():
        typer.echo(f"{path}: no such file; give the catalog's path (default templates.json)")
        raise typer.Exit(1)
    try:
        # FUSELINE_DOWNLOAD_* govern the metadata requests too: parsed once, here (CONFIG_INVALID if bad).
        policy = RetryPolicy.from_settings(BuildSettings.from_env())
        report = lock_catalog(path, verify=verify, dry_run=dry_run, policy=policy)
    except FuselineError as exc:
        typer.echo(f"{path}: lock failed: {redact(exc)}")
        raise typer.Exit(1) from None
    typer.echo(redact(report.format()))
    if report.mismatches:
        typer.echo(
            f"{path}: {_plural(len(report.mismatches), 'pin')} disagree with the metadata; "
            "check those sources and fix the pins by hand (lock never overwrites a pin)"
        )
        raise typer.Exit(1)


@app.command()
def schema() -> None:
    """Print the JSON Schema of templates.json (committed as fuseline/schema/templates.schema.json)."""
    typer.echo(json.dumps(catalog_json_schema(), indent=2))


# Publishing commands (publish, release list|rollback, gc) live in their own module.
register_publish_commands(app)
register_ci_commands(app)
# `fuseline report`: per-template build metrics (fuseline/cli/report.py).
register_report_command(app)
