"""Files that appear whole or not at all, content hashes, and locks between processes on one machine.

`atomic_write` and `atomic_dir` write beside the target under a name no other writer uses, flush to disk,
then rename into place: a reader (DVC, the worker, another process, a crash) sees the old content or the
new, never half of it. `atomic_create` does the same but never replaces: of many writers of one name,
exactly one creates it. `local_lock` is `filelock` (an flock on a lock file): for processes sharing one
machine's filesystem, such as two DVC stages filling the same download-cache entry. A network volume shared
by several machines needs worker.sync.locks instead (flock is missing or machine-local there).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import filelock


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_name(path: Path) -> Path:
    # Unique across processes and machines sharing the folder (a network volume): pid alone is not.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def atomic_write(
    path: str | os.PathLike[str], data: bytes | str, *, mode: int | None = None, encoding: str = "utf-8"
) -> Path:
    """Write `data` (text is written as is: no newline translation) to `path` atomically, creating its
    folder. `mode`: the new file's permission bits (default: the umask's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    payload = data.encode(encoding) if isinstance(data, str) else data
    try:
        with tmp.open("wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_copy(
    source: str | os.PathLike[str], path: str | os.PathLike[str], *, mode: int | None = None
) -> Path:
    """Copy the file `source` to `path` the way atomic_write writes (whole or not at all), streaming: for
    files too large to hold in memory (a checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(source, "rb") as src, tmp.open("wb") as handle:
            shutil.copyfileobj(src, handle, 8 << 20)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_create(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None) -> bool:
    """Create `path` with `data` unless something is there already: True when created, False when the name
    was taken (its content untouched). Like atomic_write, a reader never sees half the file: the data goes
    to a temporary file first, which is then hard-linked to `path`, and link(2) refuses an existing name
    atomically (O_CREAT|O_EXCL would give the name to a file still being written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; it replaces `final` only if the block succeeds. On any
    error the temporary folder is removed and `final` is absent (a failed stage leaves no half-written
    output; DVC removes a stage's outputs before running it anyway)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def md5_file(path: str | os.PathLike[str]) -> str:
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


@contextlib.contextmanager
def local_lock(path: str | os.PathLike[str], timeout: float = -1) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a lock file, created with its folder; left in place, it is empty)
    for the block; waits `timeout` seconds (-1: forever), then filelock.Timeout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(path, timeout=timeout):
        yield
