"""A lock that works across machines sharing a network volume: an exclusively created lock file whose
holder keeps touching it (a heartbeat); a waiter takes it over once the file has stayed unchanged for
`stale_after` seconds of the waiter's own clock.

Why not flock: RunPod network volumes are network filesystems where advisory locks are missing, local to
one machine, or lost silently with the holder's connection. O_CREAT|O_EXCL and rename are atomic on NFS v3+
and on the FUSE filesystems in use; that is all this relies on.

Staleness is judged by watching the file, never by comparing its mtime with our clock: machines' clocks
may disagree, but "this file has not changed while I watched it for N seconds" needs no agreement.
The heartbeat rewrites the file's content (a counter), so a change is visible even where mtime is coarse.

One exception needs no waiting: a holder that ran where the waiter runs (the owner record names the same
kernel boot and the same pid namespace: the same machine and container, whatever the host names say)
whose process is gone (no such pid, a zombie, or a pid now used by a process started at another time) is
taken over at once: a second sync right after a killed one does not wait `stale_after`. A holder elsewhere
is only ever judged by its silence.

What is guaranteed: at most one live holder at a time as long as the holder's heartbeat keeps running
(it is a daemon thread, so a stalled process, e.g. SIGSTOP, can lose its lock). The holder checks
`lock.check()` before committing; a holder that lost its lock must not commit. Sync is safe even then:
every result is content-addressed and renamed into place atomically, so the lock only saves duplicate
downloads, it is not what keeps the volume consistent.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from fuseline.core.files import atomic_write
from worker.sync.errors import LockLost, LockTimeout
from worker.sync.settings import DEFAULT_STALE_AFTER

DEFAULT_HEARTBEAT = 2.0


def _read_proc(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return None


def _boot_id() -> str | None:
    """This kernel's boot (Linux); None where /proc does not tell."""
    return _read_proc("/proc/sys/kernel/random/boot_id") or None


def _pid_namespace() -> str | None:
    """This process's pid namespace, e.g. `pid:[4026531836]`: containers on one kernel each have their own,
    and a pid means something only inside its namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of `pid` from /proc/<pid>/stat; None when there is no
    such process."""
    stat = _read_proc(f"/proc/{pid}/stat")
    if not stat or ")" not in stat:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    fields = stat.rsplit(")", 1)[1].split()
    try:
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


_BOOT_ID = _boot_id()
_PID_NAMESPACE = _pid_namespace()


def _owner_text(token: str, beat: int) -> str:
    started = _process_start(os.getpid())
    return json.dumps(
        {
            "token": token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "beat": beat,
            "time": time.time(),
            "boot_id": _BOOT_ID,
            "pid_ns": _PID_NAMESPACE,
            "start": started[1] if started else None,
        }
    )


def holder_is_gone(text: str | None) -> bool:
    """Whether the owner record `text` names a process of this machine and pid namespace that no longer
    runs. False whenever that cannot be known (another machine or container, an older record, no /proc)."""
    try:
        owner = json.loads(text or "")
        pid, start = owner["pid"], owner["start"]
        same_place = owner["boot_id"] == _BOOT_ID and owner["pid_ns"] == _PID_NAMESPACE
    except (ValueError, TypeError, KeyError):
        return False
    if not (same_place and _BOOT_ID and _PID_NAMESPACE and isinstance(pid, int) and isinstance(start, int)):
        return False
    running = _process_start(pid)
    return running is None or running[0] == "Z" or running[1] != start


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None


def _token(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return str(json.loads(text).get("token"))
    except (ValueError, AttributeError):
        return None


# Reads of the lock file that must fail in a row before the holder counts its lock as lost: a network
# filesystem can fail one read (ESTALE, EIO, a rename seen half-way) without anyone taking the lock.
READ_ATTEMPTS = 4


class VolumeLock:
    """`with VolumeLock(path): ...` holds the lock file at `path` for the block, heartbeating."""

    def __init__(
        self,
        path: Path | str,
        *,
        heartbeat: float | None = None,
        stale_after: float = DEFAULT_STALE_AFTER,
        timeout: float | None = None,
        poll: float = 0.2,
    ) -> None:
        heartbeat = min(DEFAULT_HEARTBEAT, stale_after / 5) if heartbeat is None else heartbeat
        if stale_after <= 2 * heartbeat:
            raise ValueError(f"stale_after ({stale_after}) must exceed twice the heartbeat ({heartbeat})")
        self.path = Path(path)
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.timeout = timeout
        self.poll = poll
        self.token = uuid.uuid4().hex
        self.took_over = False
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquiring

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, _owner_text(self.token, 0).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _take_over(self, seen: str) -> None:
        """Move the stale file aside (rename is atomic: one taker wins), then check that what was moved is
        the file judged stale; if a fresh lock was moved by mistake, put it back."""
        aside = self.path.with_name(f"{self.path.name}.stale.{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = _read(aside)
        if _token(moved) != _token(seen):
            # Someone took over first and created a fresh lock: restore it unless yet another appeared.
            with contextlib.suppress(FileExistsError, FileNotFoundError):
                os.link(aside, self.path)
        else:
            self.took_over = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)

    def acquire(self) -> VolumeLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        seen: str | None = None
        seen_since = start
        while not self._try_create():
            now = time.monotonic()
            current = _read(self.path)
            if current is not None and holder_is_gone(current):
                self._take_over(current)  # the holder died here: no need to watch it stay silent
                seen = None
                continue
            if current != seen:
                seen, seen_since = current, now
            elif current is not None and now - seen_since >= self.stale_after:
                self._take_over(current)
                seen = None
                continue
            if self.timeout is not None and now - start >= self.timeout:
                raise LockTimeout(
                    f"{self.path}: still held after {self.timeout:.0f} s by {current or 'unknown'}; "
                    f"another sync is running (it is taken over once silent for {self.stale_after:.0f} s)"
                )
            time.sleep(self.poll)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, name=f"lock-heartbeat {self.path.name}", daemon=True
        )
        self._thread.start()
        return self

    # -- holding

    def _holds(self) -> bool:
        """Whether the lock file names our token. Another token is a definite answer; an unreadable or
        missing file is retried a few times (short pauses, well inside `stale_after`) before counting."""
        for attempt in range(READ_ATTEMPTS):
            try:
                token = _token(_read(self.path))
            except OSError:
                token = None
            if token is not None:
                return token == self.token
            if attempt < READ_ATTEMPTS - 1:
                time.sleep(self.heartbeat / 8)
        return False

    def _beat(self) -> None:
        beat = 0
        while not self._stop.wait(self.heartbeat):
            beat += 1
            if not self._holds():
                self._lost = True
                return
            with contextlib.suppress(OSError):  # a failed write is retried at the next beat
                # Replaced whole, not rewritten in place: a reader never sees a half-written owner record.
                atomic_write(self.path, _owner_text(self.token, beat))

    def check(self) -> None:
        """Raise LockLost if another process took the lock over (our heartbeat stalled)."""
        if self._lost or not self._holds():
            self._lost = True
            raise LockLost(
                f"{self.path}: lock taken over by another process (this one was silent for over "
                f"{self.stale_after:.0f} s); not committing"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if _token(_read(self.path)) == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> VolumeLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
