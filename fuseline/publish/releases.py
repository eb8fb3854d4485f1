"""Release manifests on a remote: publish (push, check every object, then write the channel's release),
read, list and roll back. The history copy `releases/<channel>/<timestamp>.json` is written first and the
channel's pointer `releases/<channel>.json` last, so a reader never finds a release naming missing files and
an interrupted publish leaves the previous release current."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import ValidationError

from fuseline.core.release import (
    RELEASE_ID_PATTERN,
    TIMESTAMP_FORMAT,
    Release,
    history_key,
    object_key,
    release_key,
)
from fuseline.publish.errors import PublishError
from fuseline.publish.project import (
    built_addons,
    built_refiners,
    built_templates,
    git_commit,
    push,
    released_addon,
    released_refiner,
    released_template,
    stale_addons,
    stale_refiners,
    stale_templates,
    unverified_templates,
)
from fuseline.remote.archive import ArchiveReport
from fuseline.remote.stores import ObjectStore, open_store, read_remote_config

DEFAULT_CHANNEL = "main"
OBJECTS_PREFIX = "files/md5/"
RELEASES_PREFIX = "releases/"
CHANNEL_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def dir_listing(store: ObjectStore, dir_md5: str, local_cache: Path | None = None) -> list[dict[str, str]]:
    """The `[{"md5", "relpath"}]` listing of a folder object: from the remote, else from a local cache."""
    data = store.read(object_key(dir_md5))
    if data is None and local_cache is not None:
        path = local_cache / "files/md5" / dir_md5[:2] / dir_md5[2:]
        data = path.read_bytes() if path.is_file() else None
    if data is None:
        raise PublishError(
            "MISSING_OBJECT",
            f"{store.description}: folder listing {object_key(dir_md5)} is missing "
            "(fix: `fuseline publish` again to push it)",
        )
    return json.loads(data)


def missing_objects(store: ObjectStore, dir_md5s: Iterable[str]) -> list[str]:
    """Keys of every object the folders need (their listings and each file) that the remote lacks."""
    present = set(store.keys(OBJECTS_PREFIX))
    missing: list[str] = []
    for dir_md5 in dir_md5s:
        if object_key(dir_md5) not in present:
            missing.append(object_key(dir_md5))
            continue
        for entry in dir_listing(store, dir_md5):
            key = object_key(entry["md5"])
            if key not in present:
                missing.append(key)
    return sorted(set(missing))


# ---------------------------------------------------------------------------------------- releases


def _check_channel(channel: str) -> None:
    if not CHANNEL_PATTERN.match(channel):
        raise PublishError(
            "BAD_CHANNEL",
            f"channel {channel!r}: use lowercase letters, digits and hyphens (it names remote keys)",
        )


# Ids tried after the one asked for, one second apart, before a publish gives up.
MAX_ID_TRIES = 120


def write_release(store: ObjectStore, release: Release) -> Release:
    """History copy first, then the channel pointer: a crash in between leaves the old release current.

    History copies are immutable and their id is their time: the copy is created exclusively
    (`ObjectStore.create`: a hard link on a local remote, a conditional put on S3), so of two publishes
    in the same second (two clones, two CI jobs) exactly one gets the id; the other takes the next free
    second. No check-then-write: the store itself decides. Returns the release as written (`created` is the
    id it got)."""
    start = datetime.strptime(release.created, TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    for offset in range(MAX_ID_TRIES):
        stamp = (start + timedelta(seconds=offset)).strftime(TIMESTAMP_FORMAT)
        candidate = release.model_copy(update={"created": stamp})
        data = candidate.to_json().encode()
        if store.create(history_key(release.channel, stamp), data):
            store.write(release_key(release.channel), data)
            return candidate
    raise PublishError(
        "BUSY",
        f"channel {release.channel!r}: {MAX_ID_TRIES} releases within {MAX_ID_TRIES} s of "
        f"{release.created}; wait and retry",
    )


# Puts every source of the project's build into the remote's source archive (stages.archive.archive_sources,
# passed in by the command line: publishing sits beside the build stages and does not import them).
ArchiveSources = Callable[[Path, ObjectStore], ArchiveReport]


@dataclass(frozen=True)
class PublishResult:
    release: Release
    remote: str
    sources: ArchiveReport | None = None  # what archiving the sources did (None: not archived)


def publish(
    root: Path,
    *,
    remote_name: str | None = None,
    channel: str = DEFAULT_CHANNEL,
    do_push: bool = True,
    now: datetime | None = None,
    archive_sources: ArchiveSources | None = None,
) -> PublishResult:
    """Push the built templates (and the run-cache), check every object is on the remote, put the build's
    sources into the remote's source archive (`archive_sources`, with `do_push`), then write the channel's
    release. Raises PublishError (a RemoteError) with no release written when any step fails."""
    root = Path(root).resolve()
    _check_channel(channel)
    remote = read_remote_config(root, remote_name)
    store = open_store(remote)
    store.check()
    built = built_templates(root)
    addons = built_addons(root)
    stale = stale_templates(root, built) + [f"add-on {name}" for name in stale_addons(root, addons)]
    if stale:
        raise PublishError(
            "STALE",
            f"{root / 'dvc.lock'}: out of date for {', '.join(stale)} "
            "(fix: `dvc repro` (or `dvc repro --pull`) and commit dvc.lock, then publish)",
        )
    unverified = unverified_templates(root, built)
    if unverified:
        raise PublishError(
            "UNVERIFIED",
            f"{root / 'dvc.lock'}: {', '.join(unverified)} not verified (verify stage failed, never ran "
            f"or is out of date) (fix: `dvc repro {' '.join(f'verify@{t}' for t in unverified)}`, "
            "check it passes, commit dvc.lock, then publish)",
        )
    templates = {t: released_template(root, b) for t, b in built.items()}
    released_addons = {name: released_addon(root, b) for name, b in addons.items()}
    refiners_built = built_refiners(root, [t.refiner for t in templates.values() if t.refiner is not None])
    stale = stale_refiners(root, refiners_built)
    if stale:
        raise PublishError(
            "STALE",
            f"{root / 'dvc.lock'}: out of date for refiner(s) {', '.join(stale)} "
            f"(fix: `dvc repro {' '.join(f'convert@{r}' for r in stale)}` and commit dvc.lock, then publish)",
        )
    refiners = {r: released_refiner(root, b) for r, b in refiners_built.items()}
    dir_md5s = sorted({b.dir_md5 for b in [*built.values(), *addons.values(), *refiners_built.values()]})
    if do_push:
        push(root, remote)
    missing = missing_objects(store, dir_md5s)
    if missing:
        # DVC uploads a folder's `.dir` listing after its files and, when the listing is on the remote,
        # takes the whole folder as present. So files missing under a present listing (deleted on the
        # remote) are never re-sent: the listing has to go first.
        orphaned = [d for d in dir_md5s if object_key(d) not in missing and store.exists(object_key(d))]
        lost = [d for d in orphaned if any(object_key(e["md5"]) in missing for e in dir_listing(store, d))]
        fix = (
            f"delete {', '.join(object_key(d) for d in lost)} from the remote so DVC re-sends those folders, "
            "then re-run `fuseline publish`"
            if lost
            else "re-run `fuseline publish`"
        )
        raise PublishError(
            "INCOMPLETE_PUSH",
            f"{store.description}: {len(missing)} objects of the release are not on the remote "
            f"(first: {missing[0]}) (fix: {fix}; the current release is untouched)",
        )
    # Before the release: a released model's sources are in the archive, so it can be rebuilt elsewhere.
    sources = archive_sources(root, store) if archive_sources is not None and do_push else None
    created = (now or datetime.now(UTC)).strftime(TIMESTAMP_FORMAT)
    release = Release(
        channel=channel,
        created=created,
        git_commit=git_commit(root),
        templates=templates,
        # None (absent from the JSON) without add-ons: such a release reads exactly as before the field.
        addons=released_addons or None,
        refiners=refiners,
    )
    return PublishResult(release=write_release(store, release), remote=remote.name, sources=sources)


def load_release(store: ObjectStore, key: str, data: bytes) -> Release:
    """`data` (read from `key`) as a Release; a corrupt or foreign file is a PublishError naming the key."""
    try:
        return Release.from_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(document)"
        fix = (
            "delete it from the remote; the channel's pointer is a separate file"
            if "/" in key[len(RELEASES_PREFIX) :]
            else "`fuseline release rollback --to TIMESTAMP` to a good history copy"
        )
        raise PublishError(
            "BAD_RELEASE",
            f"{store.description}: {key}: not a valid release manifest ({where}: {first['msg']}) "
            f"(fix: {fix})",
        ) from None


def read_release(store: ObjectStore, channel: str) -> Release | None:
    key = release_key(channel)
    data = store.read(key)
    return load_release(store, key, data) if data is not None else None


def release_history(store: ObjectStore, channel: str | None = None) -> list[Release]:
    """Every release in the history (of one channel, or of all), oldest first."""
    prefix = f"{RELEASES_PREFIX}{channel}/" if channel else RELEASES_PREFIX
    releases = []
    for key in store.keys(prefix):
        rel = key[len(RELEASES_PREFIX) :]
        if "/" not in rel or not rel.endswith(".json"):
            continue  # a channel pointer, not a history copy
        data = store.read(key)
        if data is not None:
            releases.append(load_release(store, key, data))
    return sorted(releases, key=lambda r: (r.channel, r.created))


def current_releases(store: ObjectStore) -> dict[str, Release]:
    """The pointer of every channel on the remote."""
    found = {}
    for key in store.keys(RELEASES_PREFIX):
        rel = key[len(RELEASES_PREFIX) :]
        if "/" in rel or not rel.endswith(".json"):
            continue
        data = store.read(key)
        if data is not None:
            release = load_release(store, key, data)
            found[release.channel] = release
    return found


def rollback(store: ObjectStore, channel: str, to: str) -> Release:
    """Make the history release `to` (its timestamp) the channel's current one again, after checking its
    objects are still all on the remote."""
    _check_channel(channel)
    if not RELEASE_ID_PATTERN.match(to):
        # The id names a key under releases/<channel>/: a path (../../x) would name a file outside it.
        raise PublishError(
            "BAD_RELEASE_ID",
            f"{to!r} is not a release id (a UTC time like 20261127T211500Z; fix: pick one from "
            "`fuseline release list`)",
        )
    data = store.read(history_key(channel, to))
    if data is None:
        known = ", ".join(r.created for r in release_history(store, channel)) or "none"
        raise PublishError(
            "NO_SUCH_RELEASE",
            f"{store.description}: no release {to!r} in channel {channel!r} (known: {known}; "
            "fix: pick one from `fuseline release list`)",
        )
    release = load_release(store, history_key(channel, to), data)
    missing = missing_objects(store, release.folder_hashes())
    if missing:
        raise PublishError(
            "INCOMPLETE_RELEASE",
            f"{store.description}: release {to} lacks {len(missing)} objects (first: {missing[0]}); "
            "not rolled back (fix: rebuild and publish instead)",
        )
    store.write(release_key(channel), data)
    return release
