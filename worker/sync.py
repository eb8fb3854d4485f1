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
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fuseline.core.release import Release, ReleasedTemplate, object_key
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

    def summary(self) -> dict:
        """The report in numbers, for the worker's `sync.done`/`worker.start` events: failures count the
        templates whose sync failed (kept or not) plus one when the release itself could not be read."""
        return {
            "release": self.release,
            "seconds": round(self.seconds, 2),
            "bytes": sum(t.bytes_fetched for t in self.templates),
            "objects": sum(t.objects_fetched for t in self.templates),
            "failures": sum(1 for t in self.templates if t.error) + (1 if self.error else 0),
            "templates": {t.template: t.status for t in self.templates},
            "error": self.error,
        }

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
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


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


def _finish_object(ctx: _Ctx, md5: str, size: int, actual: str | None = None) -> str | None:
    """Verify a fully fetched partial; store it and return None, or discard it and return its md5.

    `actual`: the partial's md5 when the caller already hashed it while it arrived (_ObjectHasher);
    without it the file is hashed here."""
    # Concurrency (syncs of templates sharing this object hold different locks): the journal goes only
    # after the partial has moved into the store, so while it still sits under partial/ a concurrent
    # sync finds the journal and resumes (writes nothing: every part is done) instead of starting over;
    # and starting over never truncates (see _done_parts). Between our hash and the move, the only
    # writes another sync can make are the remote's bytes for parts it fetches, the same bytes.
    partial = ctx.volume.partial_path(md5)
    try:
        actual_size = partial.stat().st_size
        if actual is None:
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


class _ObjectHasher:
    """md5 of one object computed while its parts arrive, so hashing overlaps the downloads instead of
    re-reading every object after the last byte (B4: a serial pass at ~650 MB/s on one core was half of a
    cold sync). md5 must see the bytes in order: whenever the next part in order has landed, one drain
    (never two at once) hashes it and every consecutive landed part after it, reading them back from the
    partial file (fresh in the page cache; hashlib releases the GIL on large buffers); after the last
    part it verifies and stores the object (_finish_object).

    Bytes hashed are bytes on disk: a part counts as landed only after `_fetch_part` wrote and fdatasynced
    it (or the journal of an interrupted run says so), exactly what a hash of the whole file would read.
    A concurrent sync of another template may rewrite a part we already hashed, but only with the same
    remote bytes (see _done_parts); a part we could not read back whole makes the digest wrong, so the
    object is discarded and fetched again, as a mismatch always was."""

    def __init__(self, ctx: _Ctx, md5: str, size: int, done: set[int]) -> None:
        self.ctx = ctx
        self.md5 = md5
        self.size = size
        self.parts = _parts(size, ctx.part_size)
        self.landed = set(done)
        self.next = 0  # first part not hashed yet; only the one running drain moves it
        self.draining = False
        self.finished = False
        self.result: str | None = None  # _finish_object's answer: None stored, else the actual md5
        self._digest = hashlib.md5()
        self._lock = threading.Lock()

    def landed_part(self, index: int | None, submit: Callable[[Callable[[], None]], None]) -> None:
        """Record part `index` as on disk (None: nothing new, just check) and start a drain if the next
        part in order is now there and no drain is running."""
        with self._lock:
            if index is not None:
                self.landed.add(index)
            if self.draining or self.finished:
                return
            if self.next < len(self.parts) and self.next not in self.landed:
                return
            self.draining = True
        submit(self._drain)

    def _drain(self) -> None:
        buffer = bytearray(_HASH_BLOCK)
        fd: int | None = None
        try:
            while True:
                with self._lock:
                    if self.next == len(self.parts):
                        break
                    if self.next not in self.landed:
                        self.draining = False
                        return
                    start, end = self.parts[self.next]
                if fd is None:
                    fd = os.open(self.ctx.volume.partial_path(self.md5), os.O_RDONLY)
                self._hash_range(fd, buffer, start, end)
                with self._lock:
                    self.next += 1
        except FileNotFoundError:
            # Another template's sync (another lock) finished this shared object and stored it.
            if not self.ctx.volume.has_object(self.md5):
                raise
            self.result, self.finished = None, True
            return
        finally:
            if fd is not None:
                os.close(fd)
        self.result = _finish_object(self.ctx, self.md5, self.size, self._digest.hexdigest())
        self.finished = True

    def _hash_range(self, fd: int, buffer: bytearray, start: int, end: int) -> None:
        view = memoryview(buffer)
        offset = start
        while offset < end:
            got = os.preadv(fd, [view[: min(_HASH_BLOCK, end - offset)]], offset)
            if got == 0:
                # The file is shorter than the object: the digest can no longer match; the missing
                # bytes make it differ, the size check in _finish_object names the cause.
                self._digest.update(b"\0short read")
                return
            self._digest.update(view[:got])
            offset += got


def _fetch_round(ctx: _Ctx, pending: dict[str, int]) -> tuple[int, dict[str, str]]:
    """One pass over `pending` (md5 -> bytes): download the missing parts, hash and store each object.
    Returns (bytes transferred, {md5: actual md5} of the objects whose content did not match)."""
    tasks: list[tuple[str, int, int, int]] = []
    hashers: dict[str, _ObjectHasher] = {}
    for md5, size in pending.items():
        if ctx.volume.has_object(md5):
            continue  # stored meanwhile by another template's sync
        if size == 0:
            ctx.volume.partial_path(md5).write_bytes(b"")
            done: set[int] = set()
        else:
            done = _done_parts(ctx.volume, md5, size, ctx.part_size)
        hashers[md5] = _ObjectHasher(ctx, md5, size, done)
        tasks += [(md5, i, s, e) for i, (s, e) in enumerate(_parts(size, ctx.part_size)) if i not in done]
    # Large objects first, so their parts spread over the pool while small files fill the gaps; parts in
    # order, so each object's hash follows right behind its downloads.
    tasks.sort(key=lambda t: (-pending[t[0]], t[0], t[1]))
    hash_futures: list[Future] = []
    futures_lock = threading.Lock()
    transferred = 0
    # md5 takes one core per object; more threads than cores would only contend with the downloads.
    with ThreadPoolExecutor(
        max(1, min(len(os.sched_getaffinity(0)), len(hashers))), thread_name_prefix="sync-md5"
    ) as hash_pool:

        def submit(drain: Callable[[], None]) -> None:
            with futures_lock:
                hash_futures.append(hash_pool.submit(drain))

        def fetch(task: tuple[str, int, int, int]) -> int:
            got = _fetch_part(ctx, *task)
            hashers[task[0]].landed_part(task[1], submit)
            return got

        # Objects whose parts are all there already (resumed, empty) are hashed at once.
        for hasher in hashers.values():
            hasher.landed_part(None, submit)
        with ThreadPoolExecutor(ctx.workers, thread_name_prefix="sync-get") as pool:
            futures = [pool.submit(fetch, task) for task in tasks]
            try:
                transferred = sum(f.result() for f in futures)
            except BaseException:
                # Start no new parts; the journal keeps the finished ones for the next run.
                for f in futures:
                    f.cancel()
                raise
    # Both pools are shut down: every drain that will ever run has run.
    for f in hash_futures:
        f.result()
    unfinished = sorted(md5 for md5, h in hashers.items() if not h.finished)
    if unfinished:
        raise SyncError(f"internal error: objects {unfinished} were fetched but never verified (a bug)")
    return transferred, {md5: h.result for md5, h in hashers.items() if h.result is not None}


def fetch_objects(ctx: _Ctx, sizes: dict[str, int], relpaths: dict[str, list[str]]) -> int:
    """Fetch every object of `sizes` (md5 -> bytes) into the store; a corrupt one is refetched once.
    Returns bytes transferred.

    Parts download in a pool of `ctx.workers` threads; each object is hashed in order as its parts land
    and stored once its last part is hashed (_ObjectHasher), in a second small pool, so downloads never
    wait for hashing and the last object's hash trails its last byte by about one part."""
    transferred = 0
    pending = dict(sizes)
    for attempt in (1, 2):
        got, bad = _fetch_round(ctx, pending)
        transferred += got
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


def _write_recipe(volume: Volume, template: str, released: ReleasedTemplate) -> str | None:
    """The template's recipe for the runtime-LoRA fallback (worker/fallback.py), written before anything
    can fail: it is what serves the template when the fetch below does. Rewritten only when it changes.
    Failing to write it (volume error, or a release entry the recipe refuses: a LoRA sha256 that is not
    64 hex digits, an unknown prediction_type) disables that fallback, nothing else: a warning event, not
    a sync failure. Returns the warning, None when written."""
    import logging

    from fuseline.core.logs import log_event
    from worker.fallback import recipe_from_release, write_recipe  # lazy: the CLI needs no pipeline code

    try:
        write_recipe(volume.root, recipe_from_release(template, released))
    except (OSError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        warning = (
            f"template {template}: recipe for the runtime-LoRA fallback not written, so no fallback for it "
            f"({type(err).__name__}: {' '.join(str(err).split())})"
        )
        log_event(
            logging.getLogger("fuseline.worker.sync"),
            "sync.recipe_not_written",
            warning,
            level=logging.WARNING,
            template=template,
        )
        return warning
    return None


def _sync_template(ctx: _Ctx, template: str, verify: bool) -> TemplateResult:
    released = ctx.release.templates[template]
    result = TemplateResult(template, "present", released.dir_md5)
    volume = ctx.volume
    result.path = str(volume.link_path(template))
    _write_recipe(volume, template, released)  # a failure is a warning event, not the template's error
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
