"""Syncing templates: bring `<volume>/models/<template>/` to the version a release names, from the DVC
remote, verified, resumable and safe with many workers starting at once on one network volume; then the
add-on LoRAs offered with those templates, the same way, into `<volume>/addons/<name>/`.

Per template: trust the marker when it names the release's hash (warm start costs one small GET of the
release); otherwise take the template's volume lock, read the folder listing, HEAD the missing objects,
check free space, fetch them (worker/sync/objects.py), build the folder of hard links under a temp name,
rename it into place and switch `models/<id>` atomically; old versions go once no reader lease holds them.
See worker/sync/volume.py for the layout and docs/operations.md ("Volume and sync").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from fuseline.core.errors import ConfigInvalid
from fuseline.core.files import md5_file
from fuseline.core.logs import log_event
from fuseline.core.release import Release, ReleasedAddon, ReleasedFolder, ReleasedTemplate, object_key
from worker.sync.errors import ObjectCorrupt, ReleaseInvalid, SyncError, VolumeError
from worker.sync.locks import VolumeLock
from worker.sync.objects import Transfer, fetch_objects, resumed_bytes
from worker.sync.recipes import recipe_from_release, write_recipe
from worker.sync.remote import open_release, read_release
from worker.sync.settings import SyncSettings
from worker.sync.volume import (
    ADDONS_FOLDER,
    REFINERS,
    Entry,
    Volume,
    check_free_space,
    parse_listing,
    place,
)

log = logging.getLogger("fuseline.worker.sync")

_EMPTY_MD5 = hashlib.md5(b"").hexdigest()
_HASH_BLOCK = 8 << 20


@dataclass
class TemplateResult:
    template: str
    status: str  # "present" | "synced" | "verified" | "repaired" | "kept" | "failed"
    dir_md5: str | None = None
    path: str | None = None
    objects_fetched: int = 0
    bytes_fetched: int = 0
    objects_reused: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("present", "synced", "verified", "repaired")


@dataclass
class SyncReport:
    release: str
    volume: str
    templates: list[TemplateResult] = field(default_factory=list)
    error: str | None = None  # a failure before any template (release unreadable, remote down)
    seconds: float = 0.0
    # Add-on LoRAs offered with the synced templates (`template` holds the add-on's name).
    addons: list[TemplateResult] = field(default_factory=list)
    # The SDXL refiners the synced templates name (`refiners/<id>`), one result each.
    refiners: list[TemplateResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and all(t.ok for t in [*self.templates, *self.addons, *self.refiners])

    @property
    def available(self) -> list[str]:
        """Templates with a complete folder on the volume now (synced, or kept from before)."""
        return [t.template for t in self.templates if t.ok or t.status == "kept"]

    def summary(self) -> dict:
        """The report in numbers, for the worker's `sync.done`/`worker.start` events: failures count the
        templates whose sync failed (kept or not) plus one when the release itself could not be read."""
        folders = [*self.templates, *self.addons, *self.refiners]
        return {
            "release": self.release,
            "seconds": round(self.seconds, 2),
            "bytes": sum(t.bytes_fetched for t in folders),
            "objects": sum(t.objects_fetched for t in folders),
            "failures": sum(1 for t in folders if t.error) + (1 if self.error else 0),
            "templates": {t.template: t.status for t in self.templates},
            **({"addons": {a.template: a.status for a in self.addons}} if self.addons else {}),
            **({"refiners": {r.template: r.status for r in self.refiners}} if self.refiners else {}),
            "error": self.error,
        }

    @property
    def unsynced(self) -> list[str]:
        """Templates served as the volume holds them, not brought to the release (status "kept")."""
        return [t.template for t in self.templates if t.status == "kept"]

    def lines(self) -> list[str]:
        out = [f"release {self.release} -> volume {self.volume} ({self.seconds:.2f} s)"]
        if self.error:
            out.append(f"  error: {self.error}")
        for t in [*self.templates, *self.refiners]:
            out.append("  " + _template_line(t))
        for a in self.addons:
            out.append("  add-on " + _template_line(a))
        return out

    def log(self, logger: logging.Logger) -> None:
        """The report as log events: `sync.template` for each template, `sync.addon` for each add-on, then
        `sync.done` with summary()'s fields (docs/operations.md, "Worker logs"). The worker's start and
        `python -m worker.sync` both log it so: JSON lines off a terminal, every string redacted
        (fuseline.core.logs)."""
        for t in self.templates:
            log_event(
                logger,
                "sync.template",
                _template_line(t),
                level=logging.INFO if t.ok else logging.WARNING,
                template=t.template,
                status=t.status,
                dir_md5=t.dir_md5,
                objects=t.objects_fetched,
                bytes=t.bytes_fetched,
                reused=t.objects_reused,
                error=t.error,
            )
        for a in self.addons:
            log_event(
                logger,
                "sync.addon",
                "add-on " + _template_line(a),
                level=logging.INFO if a.ok else logging.WARNING,
                addon=a.template,
                status=a.status,
                dir_md5=a.dir_md5,
                objects=a.objects_fetched,
                bytes=a.bytes_fetched,
                reused=a.objects_reused,
                error=a.error,
            )
        for r in self.refiners:
            log_event(
                logger,
                "sync.refiner",
                _template_line(r),
                level=logging.INFO if r.ok else logging.WARNING,
                refiner=r.template,
                status=r.status,
                dir_md5=r.dir_md5,
                objects=r.objects_fetched,
                bytes=r.bytes_fetched,
                reused=r.objects_reused,
                error=r.error,
            )
        level = logging.INFO if self.ok else logging.WARNING
        log_event(logger, "sync.done", "\n".join(self.lines()), level=level, **self.summary())


def _template_line(t: TemplateResult) -> str:
    detail = (
        f"{t.objects_fetched} objects / {t.bytes_fetched:,} bytes fetched, {t.objects_reused} reused"
        if t.status in ("synced", "repaired")
        else ""
    )
    line = f"{t.template}: {t.status} {t.dir_md5 or ''} {detail}".rstrip()
    return line + (f"\n    {t.error}" if t.error else "")


@dataclass
class _Ctx(Transfer):
    release: Release
    lock_stale_after: float
    lock_timeout: float | None
    object_grace: float
    # What the folders of this context are, in messages: "template" (models/), "add-on" (addons/) or
    # "refiner" (refiners/).
    kind: str = "template"


# A release entry of a folder: a template's model folder, a refiner's (both ReleasedFolder) or an add-on's.
Released = ReleasedFolder | ReleasedAddon


# ----------------------------------------------------------------------------------------- templates


def _listing(ctx: _Ctx, template: str, dir_md5: str) -> list[Entry]:
    where = f"{ctx.remote.describe(object_key(dir_md5))} ({ctx.kind} {template})"
    stored = ctx.volume.object_path(dir_md5)
    if stored.is_file():
        return parse_listing(stored.read_bytes(), where)
    raw = ctx.remote.read_bytes(object_key(dir_md5))
    if hashlib.md5(raw).hexdigest() != dir_md5.removesuffix(".dir"):
        # DVC names a listing by the md5 of its JSON bytes: a mismatch is damage in transit or storage.
        raw = ctx.remote.read_bytes(object_key(dir_md5))
        if hashlib.md5(raw).hexdigest() != dir_md5.removesuffix(".dir"):
            raise ObjectCorrupt(f"{where}: listing content does not match its md5; republish the release")
    entries = parse_listing(raw, where)
    tmp = ctx.volume.partial / f"{dir_md5}.{os.getpid()}"
    tmp.write_bytes(raw)
    ctx.volume.commit_object(dir_md5, tmp)
    return entries


def _marker(ctx: _Ctx, template: str, released: Released) -> dict:
    identity = (
        {"sha256": released.sha256, "kind": "addon"}
        if isinstance(released, ReleasedAddon)
        else {"spec_hash": released.spec_hash}
    )
    return {
        "template": template,
        "dir_md5": released.dir_md5,
        **identity,
        "size": released.size,
        "nfiles": released.nfiles,
        "channel": ctx.release.channel,
        "release_created": ctx.release.created,
        "synced_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
    }


def _fetch_template(ctx: _Ctx, template: str, released: Released, result: TemplateResult) -> None:
    entries = _listing(ctx, template, released.dir_md5)
    where = f"{ctx.remote.describe(object_key(released.dir_md5))} ({ctx.kind} {template})"
    if len(entries) != released.nfiles:
        raise ReleaseInvalid(f"{where}: listing has {len(entries)} files, the release says {released.nfiles}")
    relpaths: dict[str, list[str]] = {}
    for entry in entries:
        relpaths.setdefault(entry.md5, []).append(entry.relpath)
    missing = [md5 for md5 in relpaths if not ctx.volume.has_object(md5)]
    with ThreadPoolExecutor(ctx.workers, thread_name_prefix="sync-head") as pool:
        sizes = dict(
            zip(
                missing,
                pool.map(lambda m: 0 if m == _EMPTY_MD5 else ctx.remote.size(object_key(m)), missing),
                strict=True,
            )
        )
    stored = {md5: ctx.volume.object_path(md5).stat().st_size for md5 in relpaths if md5 not in sizes}
    for md5 in stored:
        # Reused, not yet linked: a fresh mtime keeps another template's object collection off it.
        with contextlib.suppress(OSError):
            os.utime(ctx.volume.object_path(md5))
    total = sum((sizes | stored)[e.md5] for e in entries)
    if total != released.size:
        raise ReleaseInvalid(
            f"{where}: files add up to {total:,} bytes on the remote, the release says {released.size:,}; "
            "the remote and the release disagree: republish"
        )
    # Bytes still to write: partial files already hold the finished parts of a resumed download.
    needed = sum(size - resumed_bytes(ctx.volume, md5, size, ctx.part_size) for md5, size in sizes.items())
    check_free_space(ctx.volume, needed, f"{ctx.kind} {template} ({len(sizes)} objects to fetch)")
    result.bytes_fetched = fetch_objects(ctx, sizes, relpaths)
    result.objects_fetched = len(sizes)
    result.objects_reused = len(stored)


def _verify_template(ctx: _Ctx, template: str, released: Released, result: TemplateResult) -> None:
    """Re-hash the served folder; refetch damaged objects and swap the files in (each swap atomic)."""
    version = ctx.volume.current_version(template)
    assert version is not None
    entries = _listing(ctx, template, released.dir_md5)
    bad: dict[str, list[str]] = {}
    for entry in entries:
        path = version / entry.relpath
        if not path.is_file() or md5_file(path) != entry.md5:
            bad.setdefault(entry.md5, []).append(entry.relpath)
    if not bad:
        result.status = "verified"
        return
    for md5 in bad:
        with contextlib.suppress(FileNotFoundError):
            ctx.volume.object_path(md5).unlink()
    sizes = {md5: ctx.remote.size(object_key(md5)) for md5 in bad}
    result.bytes_fetched = fetch_objects(ctx, sizes, bad)
    result.objects_fetched = len(bad)
    for md5, paths in bad.items():
        for relpath in paths:
            dest = version / relpath
            tmp = dest.with_name(f".{dest.name}.repair")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            place(ctx.volume.object_path(md5), tmp)
            os.replace(tmp, dest)
    result.status = "repaired"


def _write_recipe(volume: Volume, template: str, released: ReleasedTemplate) -> str | None:
    """The template's recipe for the runtime-LoRA fallback (worker/sync/recipes.py), written before anything
    can fail: it is what serves the template when the fetch below does. Rewritten only when it changes.
    Failing to write it (volume error, or a release entry the recipe refuses: a LoRA sha256 that is not
    64 hex digits, an unknown prediction_type) disables that fallback, nothing else: a warning event, not
    a sync failure. Returns the warning, None when written."""
    try:
        write_recipe(volume.root, recipe_from_release(template, released))
    except (OSError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        warning = (
            f"template {template}: recipe for the runtime-LoRA fallback not written, so no fallback for it "
            f"({type(err).__name__}: {' '.join(str(err).split())})"
        )
        log_event(log, "sync.recipe_not_written", warning, level=logging.WARNING, template=template)
        return warning
    return None


def _sync_template(ctx: _Ctx, template: str, verify: bool) -> TemplateResult:
    released = ctx.release.templates[template]
    _write_recipe(ctx.volume, template, released)  # a failure is a warning event, not the template's error
    return _sync_folder(ctx, template, released, verify)


def _sync_folder(ctx: _Ctx, template: str, released: Released, verify: bool) -> TemplateResult:
    """Bring one folder of `ctx.volume` (a template's, or an add-on's) to the release's version."""
    result = TemplateResult(template, "present", released.dir_md5)
    volume = ctx.volume
    result.path = str(volume.link_path(template))
    if volume.current_release_hash(template) == released.dir_md5 and not verify:
        return result  # warm start: trust the marker (written only after a verified, complete build)
    lock = VolumeLock(volume.lock_path(template), stale_after=ctx.lock_stale_after, timeout=ctx.lock_timeout)
    with lock:
        current = volume.current_release_hash(template)
        if current == released.dir_md5:
            if verify:
                _verify_template(ctx, template, released, result)
            return result  # another worker synced it while we waited
        _fetch_template(ctx, template, released, result)
        lock.check()
        version = volume.build_version(
            template,
            released.dir_md5,
            _listing(ctx, template, released.dir_md5),
            _marker(ctx, template, released),
        )
        lock.check()
        volume.switch(template, version)
        result.status = "synced"
        # Under the lock: outside it, another worker could have built (not yet switched to) a version
        # this would take for an old one. Old versions go once no reader lease holds them, then store
        # objects no folder links to any more (see Volume.collect_objects for the grace period).
        volume.collect_garbage(template)
        volume.collect_objects(ctx.object_grace)
    return result


def sync_templates(
    release_location: str,
    volume: Path | str,
    template_ids: Iterable[str] | None = None,
    *,
    settings: SyncSettings | None = None,
    verify: bool = False,
    part_size: int | None = None,
    workers: int | None = None,
    lock_stale_after: float | None = None,
    lock_timeout: float | None = None,
) -> SyncReport:
    """Sync `template_ids` (default: every template of the release) onto `volume`, then the release's add-on
    LoRAs offered with any of them (`report.addons`).

    `settings`: the FUSELINE_SYNC_* values the process parsed at its start; without them they are read
    from the environment here, and a bad one is the report's CONFIG_INVALID error. The keyword values
    override single settings (tests, benchmarks).

    Never raises for a template's failure: each lands in the report (`report.ok`, `report.available`).
    With the remote down, templates already on the volume are reported "kept" and stay served."""
    started = time.monotonic()
    location = release_location or ""
    vol = Volume(volume)
    report = SyncReport(release=location, volume=str(vol.root))
    wanted = list(template_ids) if template_ids else None
    try:
        settings = settings or SyncSettings.from_env()
        if not location:
            raise ReleaseInvalid("no release given: pass --release or set FUSELINE_RELEASE")
        try:
            vol.ensure()
        except OSError as err:
            raise VolumeError(
                f"volume {vol.root}: {err.strerror or err}; check that it is mounted and writable"
            ) from None
        remote, key = open_release(location)
        release = read_release(remote, key)
    except (SyncError, ConfigInvalid) as err:
        report.error = str(err)
        names = wanted
        if names is None:
            try:
                names = sorted(p.name for p in vol.models.iterdir() if not p.name.startswith("."))
            except OSError:  # no models folder (a fresh volume), or one this user cannot list
                names = []
        for name in names:
            present = vol.current_release_hash(name)
            status = "kept" if present or vol.current_version(name) else "failed"
            report.templates.append(
                TemplateResult(name, status, present, error=None if present else str(err))
            )
        report.seconds = time.monotonic() - started
        return report
    ctx = _Ctx(
        remote=remote,
        volume=vol,
        release=release,
        part_size=part_size or settings.part_size,
        workers=workers or settings.workers,
        lock_stale_after=lock_stale_after or settings.lock_stale_after,
        lock_timeout=lock_timeout,
        object_grace=settings.object_grace,
    )
    synced: list[str] = []
    for template in wanted if wanted is not None else sorted(release.templates):
        if template not in release.templates:
            report.templates.append(
                TemplateResult(
                    template,
                    "failed",
                    error=f"template {template!r} is not in release {location} "
                    f"(it has: {', '.join(sorted(release.templates)) or 'none'})",
                )
            )
            continue
        synced.append(template)
        report.templates.append(_sync_guarded(ctx, template, lambda t: _sync_template(ctx, t, verify)))
    # The add-ons a job on these templates may ask for, into addons/ (same store, versions and locks).
    addons = replace(ctx, volume=Volume(vol.root, ADDONS_FOLDER), kind="add-on")
    for name in release.addons_for(synced) if synced else []:
        assert release.addons is not None
        entry = release.addons[name]
        report.addons.append(
            _sync_guarded(addons, name, lambda n, e=entry: _sync_folder(addons, n, e, verify))
        )
    # The refiners the synced templates name, each once, into refiners/<id> (same store, own locks).
    refiners = replace(ctx, volume=Volume(vol.root, REFINERS), kind="refiner")
    named = sorted({r for t in synced if (r := release.templates[t].refiner) is not None})
    if named:
        refiners.volume.ensure()
    for refiner in named:
        entry = release.refiners[refiner]
        report.refiners.append(
            _sync_guarded(refiners, refiner, lambda n, e=entry: _sync_folder(refiners, n, e, verify))
        )
    report.seconds = time.monotonic() - started
    return report


def _sync_guarded(ctx: _Ctx, name: str, sync) -> TemplateResult:
    """`sync(name)`'s result, or its failure as a result: a failed update leaves the version already there
    in service (reported `kept`)."""
    try:
        return sync(name)
    except (SyncError, OSError) as err:
        if not isinstance(err, SyncError):
            err = VolumeError(f"volume {ctx.volume.root}: {err}; check that it is mounted and writable")
        present = ctx.volume.current_release_hash(name)
        status = "kept" if present else "failed"
        return TemplateResult(name, status, present, error=str(err))
