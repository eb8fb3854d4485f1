"""Fetching a template's objects into the volume's store: parallel ranged GETs into partial files, a
journal of finished parts so a killed sync resumes, md5 computed while the parts land, and each object
verified (md5 and size) before it moves into the store."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fuseline.core.files import md5_file
from fuseline.core.release import object_key
from worker.sync.errors import ObjectCorrupt, RemoteUnavailable, SyncError
from worker.sync.remote import Remote
from worker.sync.volume import Volume

_HASH_BLOCK = 8 << 20


@dataclass
class Transfer:
    """Where objects come from and go to, and how many parts move at once."""

    remote: Remote
    volume: Volume
    part_size: int
    workers: int


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


def resumed_bytes(volume: Volume, md5: str, size: int, part_size: int) -> int:
    """Bytes of `md5` already on the volume from an interrupted download."""
    parts = _parts(size, part_size)
    return sum(parts[i][1] - parts[i][0] for i in _read_journal(volume, md5, size, part_size) or ())


def _fetch_part(ctx: Transfer, md5: str, index: int, start: int, end: int) -> int:
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


def _finish_object(ctx: Transfer, md5: str, size: int, actual: str | None = None) -> str | None:
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
            actual = md5_file(partial)
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

    def __init__(self, ctx: Transfer, md5: str, size: int, done: set[int]) -> None:
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


def _fetch_round(ctx: Transfer, pending: dict[str, int]) -> tuple[int, dict[str, str]]:
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


def fetch_objects(ctx: Transfer, sizes: dict[str, int], relpaths: dict[str, list[str]]) -> int:
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
