"""`fuseline ci plan|build|publish`: the steps of the CI workflows (.github/workflows/main.yml, pr.yml) as
commands, so that each step CI runs on GitHub is one the tests run here
(tests/publish/test_publish_build.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from fuseline.cli.publish import ProjectOpt, _fail
from fuseline.publish import ci
from fuseline.publish.errors import PublishError
from fuseline.publish.releases import DEFAULT_CHANNEL

ci_app = typer.Typer(help="What the CI workflows run: plan, build, publish.", no_args_is_help=True)

RemoteArg = Annotated[str, typer.Option("--remote", "-r", help="The shared DVC remote (CI: s3).")]


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


@ci_app.command("plan")
def plan_command(project: ProjectOpt = Path(".")) -> None:
    """Print the templates to rebuild (JSON list); append `templates=<list>` to $GITHUB_OUTPUT and a note to
    $GITHUB_STEP_SUMMARY when they are set."""
    try:
        templates = ci.plan(project.resolve(), _env_path("GITHUB_OUTPUT"), _env_path("GITHUB_STEP_SUMMARY"))
    except PublishError as exc:
        raise _fail(exc) from None
    typer.echo(json.dumps(templates))


@ci_app.command("build")
def build_command(
    templates: Annotated[list[str], typer.Argument(help="Template ids (CI: one per matrix job).")],
    remote: RemoteArg = "s3",
    project: ProjectOpt = Path("."),
) -> None:
    """`dvc repro --pull verify@<id>...` then `dvc push --run-cache` to the remote."""
    try:
        ci.build(project.resolve(), templates, remote)
    except PublishError as exc:
        raise _fail(exc) from None
    typer.echo(f"built and pushed {', '.join(templates)} to remote {remote!r}")


@ci_app.command("publish")
def publish_command(
    remote: RemoteArg = "s3",
    channel: Annotated[str, typer.Option("--channel", "-c", help="Release channel.")] = DEFAULT_CHANNEL,
    commit_lock: Annotated[
        bool, typer.Option("--commit-lock/--no-commit-lock", help="Commit dvc.lock when it changed.")
    ] = True,
    push_lock: Annotated[
        bool, typer.Option("--push-lock/--no-push-lock", help="Push that commit to the branch's upstream.")
    ] = True,
    project: ProjectOpt = Path("."),
) -> None:
    """Restore every stage from the run-cache, drop removed templates, commit dvc.lock, publish."""
    try:
        result = ci.publish_job(project.resolve(), remote, channel, commit=commit_lock, push_commit=push_lock)
    except PublishError as exc:
        raise _fail(exc) from None
    release = result.release
    typer.echo(f"published {release.channel}@{release.created}: {len(release.templates)} templates")


def register(app: typer.Typer) -> None:
    app.add_typer(ci_app, name="ci")
