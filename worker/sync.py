"""Worker model sync: bring `<volume>/models/<template>/` to the version a release names, from the DVC
remote, verified, resumable and safe with many workers starting at once on one network volume.

    python -m worker.sync --release s3://bucket/prefix/releases/main.json --volume /runpod-volume
    python -m worker.sync                      # FUSELINE_RELEASE, FUSELINE_VOLUME (default /runpod-volume)

Per template: trust the marker when it names the release's hash (warm start costs one small GET of the
release); otherwise take the template's volume lock, read the folder listing, HEAD the missing objects,
check free space, fetch them in parallel ranged GETs into partial files (a journal records finished ranges,
so a killed sync resumes), verify md5 and size, store each object once, build the folder of hard links
under a temp name, rename it into place and switch `models/<id>` atomically; old versions go once no
reader lease holds them. See worker/volume.py for the layout and docs/operations.md ("Volume and sync").
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fuseline.release import Release, ReleasedTemplate, object_key
from worker.locks import DEFAULT_STALE_AFTER, LockLost, LockTimeout, VolumeLock
from worker.remote import (
    ReleaseInvalid,
    Remote,
    RemoteUnavailable,
    SyncError,
    open_release,
    read_release,
)
from worker.volume import (
    OBJECT_GRACE,
    Entry,
    ListingUnsafe,
    Volume,
    VolumeFull,
    check_free_space,
    parse_listing,
    place,
)

__all__ = [
    "ListingUnsafe",
    "LockLost",
    "LockTimeout",
    "ObjectCorrupt",
    "ReleaseInvalid",
    "RemoteUnavailable",
    "SyncError",
    "SyncReport",
    "TemplateResult",
    "VolumeError",
    "VolumeFull",
    "main",
    "sync_templates",
]

DEFAULT_VOLUME = "/runpod-volume"
DEFAULT_PART_SIZE = 64 << 20  # ranged-GET size: big enough to amortise a request, small enough to resume
DEFAULT_WORKERS = 8
_EMPTY_MD5 = hashlib.md5(b"").hexdigest()
_HASH_BLOCK = 8 << 20


class ObjectCorrupt(SyncError):
    code = "OBJECT_CORRUPT"


class VolumeError(SyncError):
    code = "VOLUME_ERROR"


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

    @property
    def ok(self) -> bool:
        return self.error is None and all(t.ok for t in self.templates)

    @property
    def available(self) -> list[str]:
        """Templates with a complete folder on the volume now (synced, or kept from before)."""
        return [t.template for t in self.templates if t.ok or t.status == "kept"]

    def lines(self) -> list[str]:
        out = [f"release {self.release} -> volume {self.volume} ({self.seconds:.2f} s)"]
        if self.error:
            out.append(f"  error: {self.error}")
        for t in self.templates:
            detail = (
                f"{t.objects_fetched} objects / {t.bytes_fetched:,} bytes fetched, {t.objects_reused} reused"
                if t.status in ("synced", "repaired")
                else ""
            )
            line = f"  {t.template}: {t.status} {t.dir_md5 or ''} {detail}".rstrip()
            out.append(line + (f"\n    {t.error}" if t.error else ""))
        return out


@dataclass
class _Ctx:
    remote: Remote
    volume: Volume
    release: Release
    part_size: int
    workers: int
    lock_stale_after: float
    lock_timeout: float | None
    object_grace: float = OBJECT_GRACE


# ------------------------------------------------------------------------------------------ fetching


def _md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _journal(volume: Volume, md5: str) -> Path:
    return volume.partial / f"{md5}.parts"


def _parts(size: int, part_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + part_size, size)) for start in range(0, size, part_size)]


def _read_journal(volume: Volume, md5: str, size: int, part_size: int) -> set[int] | None:
    """Finished part indices, or None when there is no journal for this size and part size."""
    try:
        text = _journal(volume, md5).read_text(encoding="ascii")
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    # Only lines ended by a newline count: a kill may have cut the last one short ("1" of "12\n").
    lines = text.split("\n")[:-1]
    if not lines or lines[0] != f"v1 {size} {part_size}" or not volume.partial_path(md5).exists():
        return None
    count = len(_parts(size, part_size))
    return {int(line) for line in lines[1:] if line.isdigit() and int(line) < count}


def _done_parts(volume: Volume, md5: str, size: int, part_size: int) -> set[int]:
    """Finished part indices from the journal; without a usable journal, fetch every part again.

    Never truncates: another template's sync (another lock) may share this partial and be hashing it
    or moving it into the store right now; zeroing it there would store zeros under a verified md5.
    Parts fetched again are the same bytes of the same content-addressed object, so rewriting them over
    what is there is harmless; the file is only extended to its final size."""
    done = _read_journal(volume, md5, size, part_size)
    if done is None:
        _journal(volume, md5).write_text(f"v1 {size} {part_size}\n", encoding="ascii")
        fd = os.open(volume.partial_path(md5), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return set()
    return done


def _resumed_bytes(volume: Volume, md5: str, size: int, part_size: int) -> int:
    """Bytes of `md5` already on the volume from an interrupted download."""
    parts = _parts(size, part_size)
    return sum(parts[i][1] - parts[i][0] for i in _read_journal(volume, md5, size, part_size) or ())


def _fetch_part(ctx: _Ctx, md5: str, index: int, start: int, end: int) -> int:
    key = object_key(md5)
    try:
        fd = os.open(ctx.volume.partial_path(md5), os.O_WRONLY)
    except FileNotFoundError:
        # Another template's sync (another lock) finished this shared object and stored it.
        if ctx.volume.has_object(md5):
            return 0
        raise
    try:
        got = ctx.remote.read_range_into(key, start, end, fd)
        if got != end - start:
            raise RemoteUnavailable(
                f"{ctx.remote.describe(key)}: got {got} of {end - start} bytes for range {start}-{end - 1}; "
                "the transfer broke off (run sync again to resume)"
            )
        os.fdatasync(fd)
    finally:
        os.close(fd)
    # O_APPEND of one short line is atomic: the journal never claims a part whose bytes are not on disk.
    try:
        jfd = os.open(_journal(ctx.volume, md5), os.O_WRONLY | os.O_APPEND)
    except FileNotFoundError:
        return got  # finished and stored by another process meanwhile (see above)
    try:
        os.write(jfd, f"{index}\n".encode())
    finally:
        os.close(jfd)
    return got


def _finish_object(ctx: _Ctx, md5: str, size: int) -> str | None:
    """Verify a fully fetched partial; store it and return None, or discard it and return its md5."""
    # Concurrency (syncs of templates sharing this object hold different locks): the journal goes only
    # after the partial has moved into the store, so while it still sits under partial/ a concurrent
    # sync finds the journal and resumes (writes nothing: every part is done) instead of starting over;
    # and starting over never truncates (see _done_parts). Between our hash and the move, the only
    # writes another sync can make are the remote's bytes for parts it fetches, the same bytes.
    partial = ctx.volume.partial_path(md5)
    try:
        actual_size = partial.stat().st_size
        actual = _md5_file(partial)
        if actual != md5 or actual_size != size:
            partial.unlink()
            with contextlib.suppress(FileNotFoundError):
                _journal(ctx.volume, md5).unlink()
            return actual
        ctx.volume.commit_object(md5, partial)
    except FileNotFoundError:
        # Another template's sync fetched the same shared object and stored it first.
        if not ctx.volume.has_object(md5):
            raise
    with contextlib.suppress(FileNotFoundError):
        _journal(ctx.volume, md5).unlink()
    return None


def fetch_objects(ctx: _Ctx, sizes: dict[str, int], relpaths: dict[str, list[str]]) -> int:
    """Fetch every object of `sizes` (md5 -> bytes) into the store; a corrupt one is refetched once.
    Returns bytes transferred."""
    transferred = 0
    pending = dict(sizes)
    for attempt in (1, 2):
        tasks: list[tuple[str, int, int, int]] = []
        for md5, size in pending.items():
            if ctx.volume.has_object(md5):
                continue  # stored meanwhile by another template's sync: _finish_object finds it
            if size == 0:
                ctx.volume.partial_path(md5).write_bytes(b"")
                continue
            done = _done_parts(ctx.volume, md5, size, ctx.part_size)
            tasks += [(md5, i, s, e) for i, (s, e) in enumerate(_parts(size, ctx.part_size)) if i not in done]
        # Large objects first, so their parts spread over the pool while small files fill the gaps.
        tasks.sort(key=lambda t: -pending[t[0]])
        with ThreadPoolExecutor(ctx.workers, thread_name_prefix="sync-get") as pool:
            transferred += sum(pool.map(lambda t: _fetch_part(ctx, *t), tasks))
            results = [(m, _finish_object(ctx, m, size)) for m, size in pending.items()]
        bad = {md5: actual for md5, actual in results if actual is not None}
        if not bad:
            return transferred
        if attempt == 2:
            md5, actual = next(iter(bad.items()))
            raise ObjectCorrupt(
                f"{ctx.remote.describe(object_key(md5))} (file {', '.join(relpaths.get(md5, ['?']))}): "
                f"content has md5 {actual}, expected {md5}, also after fetching it again; the remote copy "
                f"is damaged: push it again from the build (dvc push) or republish"
            )
        pending = {md5: pending[md5] for md5 in bad}
    return transferred


# ----------------------------------------------------------------------------------------- templates


def _listing(ctx: _Ctx, template: str, dir_md5: str) -> list[Entry]:
    where = f"{ctx.remote.describe(object_key(dir_md5))} (template {template})"
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


def _marker(ctx: _Ctx, template: str, released: ReleasedTemplate) -> dict:
    return {
        "template": template,
        "dir_md5": released.dir_md5,
        "spec_hash": released.spec_hash,
        "size": released.size,
        "nfiles": released.nfiles,
        "channel": ctx.release.channel,
        "release_created": ctx.release.created,
        "synced_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
    }


def _fetch_template(ctx: _Ctx, template: str, released: ReleasedTemplate, result: TemplateResult) -> None:
    entries = _listing(ctx, template, released.dir_md5)
    where = f"{ctx.remote.describe(object_key(released.dir_md5))} (template {template})"
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
    needed = sum(size - _resumed_bytes(ctx.volume, md5, size, ctx.part_size) for md5, size in sizes.items())
    check_free_space(ctx.volume, needed, f"template {template} ({len(sizes)} objects to fetch)")
    result.bytes_fetched = fetch_objects(ctx, sizes, relpaths)
    result.objects_fetched = len(sizes)
    result.objects_reused = len(stored)


def _verify_template(ctx: _Ctx, template: str, released: ReleasedTemplate, result: TemplateResult) -> None:
    """Re-hash the served folder; refetch damaged objects and swap the files in (each swap atomic)."""
    version = ctx.volume.current_version(template)
    assert version is not None
    entries = _listing(ctx, template, released.dir_md5)
    bad: dict[str, list[str]] = {}
    for entry in entries:
        path = version / entry.relpath
        if not path.is_file() or _md5_file(path) != entry.md5:
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


def _sync_template(ctx: _Ctx, template: str, verify: bool) -> TemplateResult:
    released = ctx.release.templates[template]
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


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SyncError(f"environment variable {name}={raw!r} is not a number; unset or fix it") from None


def sync_templates(
    release_location: str | None = None,
    volume: Path | str | None = None,
    template_ids: Iterable[str] | None = None,
    *,
    verify: bool = False,
    part_size: int | None = None,
    workers: int | None = None,
    lock_stale_after: float | None = None,
    lock_timeout: float | None = None,
) -> SyncReport:
    """Sync `template_ids` (default: every template of the release) onto `volume`.

    Never raises for a template's failure: each lands in the report (`report.ok`, `report.available`).
    With the remote down, templates already on the volume are reported "kept" and stay served."""
    started = time.monotonic()
    location = release_location or os.environ.get("FUSELINE_RELEASE", "")
    vol = Volume(volume or os.environ.get("FUSELINE_VOLUME", DEFAULT_VOLUME))
    report = SyncReport(release=location, volume=str(vol.root))
    wanted = list(template_ids) if template_ids else None
    try:
        if not location:
            raise ReleaseInvalid("no release given: pass --release or set FUSELINE_RELEASE")
        vol.ensure()
        remote, key = open_release(location)
        release = read_release(remote, key)
    except SyncError as err:
        report.error = str(err)
        names = wanted
        if names is None:
            names = (
                sorted(p.name for p in vol.models.iterdir() if not p.name.startswith("."))
                if vol.models.is_dir()
                else []
            )
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
        part_size=part_size or int(_env_float("FUSELINE_SYNC_PART_SIZE", DEFAULT_PART_SIZE)),
        workers=workers or int(_env_float("FUSELINE_SYNC_WORKERS", DEFAULT_WORKERS)),
        lock_stale_after=lock_stale_after or _env_float("FUSELINE_SYNC_LOCK_STALE", DEFAULT_STALE_AFTER),
        lock_timeout=lock_timeout,
        object_grace=_env_float("FUSELINE_SYNC_OBJECT_GRACE", OBJECT_GRACE),
    )
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
        try:
            report.templates.append(_sync_template(ctx, template, verify))
        except (SyncError, OSError) as err:
            if not isinstance(err, SyncError):
                err = VolumeError(f"volume {vol.root}: {err}; check that it is mounted and writable")
            # A failed update leaves the version already there in service: report it as kept.
            present = vol.current_release_hash(template)
            status = "kept" if present else "failed"
            report.templates.append(TemplateResult(template, status, present, error=str(err)))
    report.seconds = time.monotonic() - started
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.sync", description=__doc__.splitlines()[0])
    parser.add_argument("--release", default=os.environ.get("FUSELINE_RELEASE"), help="s3://… or a path")
    parser.add_argument("--volume", default=os.environ.get("FUSELINE_VOLUME", DEFAULT_VOLUME))
    parser.add_argument("--template", action="append", dest="templates", help="repeatable; default: all")
    parser.add_argument("--verify", action="store_true", help="re-hash folders already present")
    parser.add_argument(
        "--workers", type=int, default=None, help=f"parallel GETs (default {DEFAULT_WORKERS})"
    )
    args = parser.parse_args(argv)
    report = sync_templates(
        args.release, args.volume, args.templates, verify=args.verify, workers=args.workers
    )
    print("\n".join(report.lines()), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 2


if __name__ == "__main__":
    raise SystemExit(main())
