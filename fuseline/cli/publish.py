"""`fuseline publish`, `fuseline release list|rollback` and `fuseline gc`: the command line over
fuseline.publish.

`register(app)` adds the commands to the main typer app (fuseline/cli/__init__.py calls it). Every failure is
one line on stderr naming the cause and the fix, exit code 1; nothing prints a secret.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fuseline.publish.gc import find_local_garbage, find_remote_garbage, remove_local_garbage
from fuseline.publish.releases import DEFAULT_CHANNEL, current_releases, publish, release_history, rollback
from fuseline.remote.errors import RemoteError
from fuseline.remote.stores import open_store, read_remote_config

RemoteOpt = Annotated[
    str | None, typer.Option("--remote", "-r", help="DVC remote name (default: the config's default remote).")
]
ChannelOpt = Annotated[str, typer.Option("--channel", "-c", help="Release channel.")]
ProjectOpt = Annotated[Path, typer.Option("--project", help="The DVC project's root folder.")]


def _fail(exc: RemoteError) -> typer.Exit:
    typer.echo(f"error [{exc.code}]: {exc}", err=True)
    return typer.Exit(1)


def publish_command(
    remote: RemoteOpt = None,
    channel: ChannelOpt = DEFAULT_CHANNEL,
    project: ProjectOpt = Path("."),
    no_push: Annotated[
        bool,
        typer.Option(
            "--no-push",
            help="Only check the remote and write the release (objects pushed, sources archived already).",
        ),
    ] = False,
) -> None:
    """Push the built templates, the run-cache and the build's sources (the source archive) to the remote,
    then write the channel's release manifest (only once every object it names is on the remote)."""
    # The build side (the download cache, the sources library), imported only here: the other commands
    # stay light.
    from fuseline.core.errors import ConfigInvalid
    from stages.archive import archive_sources
    from stages.settings import BuildSettings

    try:
        settings = BuildSettings.from_env()  # FUSELINE_CACHE_DIR: where the build's sources are
    except ConfigInvalid as exc:
        typer.echo(f"error [{exc.code}]: {exc.message}", err=True)
        raise typer.Exit(1) from None
    try:
        result = publish(
            project,
            remote_name=remote,
            channel=channel,
            do_push=not no_push,
            archive_sources=lambda root, store: archive_sources(root, store, settings),
        )
    except RemoteError as exc:
        raise _fail(exc) from None
    release = result.release
    typer.echo(
        f"published {release.channel}@{release.created} to remote {result.remote!r}: "
        f"{len(release.templates)} templates, commit {release.git_commit or '(not a git repo)'}"
    )
    for template, entry in sorted(release.templates.items()):
        typer.echo(f"  {template}  {entry.dir_md5}  {entry.nfiles} files  {entry.size} bytes")
    for name, addon in sorted((release.addons or {}).items()):
        typer.echo(f"  add-on {name}  {addon.dir_md5}  {addon.nfiles} files  {addon.size} bytes")
    for refiner, entry in sorted(release.refiners.items()):
        typer.echo(f"  refiner {refiner}  {entry.dir_md5}  {entry.nfiles} files  {entry.size} bytes")
    if result.sources is not None:
        sources = result.sources
        typer.echo(
            f"sources archived in {sources.archive}: {len(sources.uploaded)} files uploaded "
            f"({sources.uploaded_bytes} bytes), {len(sources.present)} already there"
        )


release_app = typer.Typer(help="Inspect and roll back release manifests on a remote.", no_args_is_help=True)


@release_app.command("list")
def release_list(
    remote: RemoteOpt = None,
    channel: Annotated[str | None, typer.Option("--channel", "-c", help="Only this channel.")] = None,
    project: ProjectOpt = Path("."),
) -> None:
    """List every release in the history, oldest first; `*` marks each channel's current one."""
    try:
        store = open_store(read_remote_config(project.resolve(), remote))
        history = release_history(store, channel)
        current = current_releases(store)
    except RemoteError as exc:
        raise _fail(exc) from None
    if not history:
        typer.echo(f"no releases on {store.description}")
        return
    for release in history:
        mark = "*" if current.get(release.channel) == release else " "
        typer.echo(
            f"{mark} {release.channel}  {release.created}  {len(release.templates)} templates  "
            f"commit {release.git_commit or '-'}"
        )


@release_app.command("rollback")
def release_rollback(
    channel: Annotated[str, typer.Option("--channel", "-c", help="Channel to roll back.")],
    to: Annotated[str, typer.Option("--to", help="Timestamp of the release to restore (`release list`).")],
    remote: RemoteOpt = None,
    project: ProjectOpt = Path("."),
) -> None:
    """Make an earlier release of the channel current again."""
    try:
        store = open_store(read_remote_config(project.resolve(), remote))
        release = rollback(store, channel, to)
    except RemoteError as exc:
        raise _fail(exc) from None
    typer.echo(f"{channel} now serves the release of {release.created} ({len(release.templates)} templates)")


def gc_command(
    remote: Annotated[
        str | None,
        typer.Option(
            "--remote",
            "-r",
            help="Also delete this remote's objects that no release in the history and no output references.",
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete; without it, only list.")] = False,
    project: ProjectOpt = Path("."),
) -> None:
    """Remove the outputs and dvc.lock entries of templates (and checkpoints) no longer in the catalog;
    with --remote, unreferenced remote objects too. A dry run unless --yes."""
    root = project.resolve()
    verb = "removing" if yes else "would remove"
    try:
        local = find_local_garbage(root)
        for stage in local.stages:
            typer.echo(f"{verb} dvc.lock entry {stage}")
        for path in local.paths:
            typer.echo(f"{verb} {path}")
        remote_garbage: list[str] = []
        store = None
        if remote is not None:
            store = open_store(read_remote_config(root, remote))
            store.check()
            remote_garbage = find_remote_garbage(root, store)
            for key in remote_garbage:
                typer.echo(f"{verb} {store.description.split(' at ')[0].rstrip('/')}/{key}")
        if yes:
            remove_local_garbage(root, local)
            if store is not None:
                store.delete(remote_garbage)
    except RemoteError as exc:
        raise _fail(exc) from None
    total = len(local.stages) + len(local.paths) + len(remote_garbage)
    if not total:
        typer.echo("nothing to collect")
    elif not yes:
        typer.echo(f"dry run: {total} items; re-run with --yes to delete them")


def register(app: typer.Typer) -> None:
    """Add `publish`, `release list|rollback` and `gc` to the fuseline app."""
    app.command("publish")(publish_command)
    app.add_typer(release_app, name="release")
    app.command("gc")(gc_command)
