"""The model volume: a content-addressed object store, template folders linked from it, an atomic switch
between versions, and reader leases that keep an old version alive while it is in use.

Layout under the volume root:
    .fuseline/objects/<2 hex>/<30 hex>        verified files (and `.dir` listings), stored once
    .fuseline/partial/<md5>                   an object being downloaded (written in place by ranges)
    .fuseline/partial/<md5>.parts             which ranges of it are complete (resume journal)
    .fuseline/locks/<template>.lock           the sync lock (worker.sync.locks)
    models/.v.<id>.<dir md5>/                 one complete version: hard links into the store
    models/.v.<id>.<dir md5>/.fuseline-sync.json  marker: the release hash this folder was built from
    models/.v.<id>.<dir md5>.leases/          one file per reader using that version
    models/<id> -> .v.<id>.<dir md5>          relative symlink: the version served
    models/.t.<id>.<uuid>/, .l.<id>.<uuid>    a version being built, a symlink about to replace <id>
    models/.x.<...>, .r.<...>                 a folder being deleted (trash), a version being retired
    addons/...                                the same for add-on LoRA folders (Volume(root, "addons"))
    .fuseline/locks/addons.<name>.lock        an add-on's sync lock
    refiners/<id> -> .v.<id>.<dir md5>        an SDXL refiner a template names: the layout of models/
                                              (versions, leases, switch); its lock: locks/refiner.<id>.lock

Bookkeeping names start with a one-letter tag and a dot: template ids (catalog ID_PATTERN, [a-z0-9-],
validated in the release) hold no dot, so `.v.<id>.` can only be a version of that very template, never
another template's build folder (a template called `tmp` or `trash` included).

Why a symlink: a directory cannot be atomically replaced by another non-empty one (rename onto a non-empty
directory fails), but os.replace of a symlink is one atomic rename, so `models/<id>/` is always either the
old complete version or the new one. Relative, so the volume may be mounted anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fuseline.core.files import fsync_dir
from fuseline.core.release import MD5_PATTERN
from worker.sync.errors import ListingUnsafe, VolumeFull
from worker.sync.settings import OBJECT_GRACE

MARKER_NAME = ".fuseline-sync.json"
# Bounds on a listing entry's path: far beyond any model folder (diffusers nests 2-3 deep, short names),
# well inside what a filesystem takes (NAME_MAX 255 bytes per name, PATH_MAX 4096 for the whole path with
# the volume's own prefix), and shallow enough that making the folders cannot recurse past Python's limit.
MAX_LISTING_DEPTH = 32
MAX_NAME_BYTES = 255
MAX_RELPATH_BYTES = 1024
STATE_DIR = ".fuseline"
# A lease not refreshed for this long belongs to a dead reader.
DEFAULT_LEASE_TIMEOUT = 600.0
# A sync's temp folder untouched this long belongs to a sync that died.
LEFTOVER_AGE = 3600.0
VERSION_PREFIX = ".v."
BUILD_PREFIX = ".t."
LINK_PREFIX = ".l."
TRASH_PREFIX = ".x."
RETIRING_PREFIX = ".r."


@dataclass(frozen=True)
class Entry:
    md5: str
    relpath: str


def parse_listing(raw: bytes, where: str) -> list[Entry]:
    """DVC's folder listing (`[{"md5": ..., "relpath": ...}]`), rejecting anything that could write outside
    the folder: absolute paths, `..`, empty or backslash components, duplicates, a file that is also a
    folder, and entries that are not plain files (DVC lists only files; anything else is not ours)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:  # RecursionError: JSON nested thousands deep
        raise ListingUnsafe(f"{where}: not a DVC folder listing (JSON error: {err})") from None
    if not isinstance(data, list) or not data:
        raise ListingUnsafe(f"{where}: a DVC folder listing must be a non-empty JSON list")
    entries: list[Entry] = []
    seen: set[str] = set()
    for item in data:
        if not isinstance(item, dict) or set(item) - {"md5", "relpath", "size", "isexec"}:
            raise ListingUnsafe(f"{where}: entry {item!r} is not a plain file entry (md5, relpath)")
        md5, relpath = item.get("md5"), item.get("relpath")
        if not isinstance(md5, str) or not MD5_PATTERN.match(md5):
            raise ListingUnsafe(f"{where}: entry {relpath!r} has md5 {md5!r}, not 32 hex digits")
        if not isinstance(relpath, str) or not relpath or "\\" in relpath or "\0" in relpath:
            raise ListingUnsafe(f"{where}: entry path {relpath!r} is empty or has a backslash or NUL")
        try:
            relpath.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800") names no file
            raise ListingUnsafe(f"{where}: entry path {relpath!r} is not valid Unicode") from None
        path = PurePosixPath(relpath)
        parts = relpath.split("/")
        if path.is_absolute() or any(part in ("..", ".", "") for part in parts):
            raise ListingUnsafe(
                f"{where}: entry path {relpath!r} is absolute or has '..'/'.' components; refusing a "
                "listing that could write outside the model folder (republish from a clean build)"
            )
        _check_bounds(relpath, parts, where)
        if relpath == MARKER_NAME or relpath in seen:
            raise ListingUnsafe(f"{where}: entry path {relpath!r} is duplicated or reserved")
        seen.add(relpath)
        entries.append(Entry(md5, relpath))
    for entry in entries:
        for parent in PurePosixPath(entry.relpath).parents:
            if str(parent) in seen:
                raise ListingUnsafe(f"{where}: {parent} is both a file and a folder")
    return entries


def _check_bounds(relpath: str, parts: list[str], where: str) -> None:
    shown = relpath if len(relpath) <= 80 else f"{relpath[:60]}... ({len(relpath)} characters)"
    fix = "no model folder needs it: republish from a clean build"
    if len(parts) > MAX_LISTING_DEPTH:
        raise ListingUnsafe(
            f"{where}: entry path {shown!r} is {len(parts)} levels deep, more than {MAX_LISTING_DEPTH}; {fix}"
        )
    if len(relpath.encode("utf-8")) > MAX_RELPATH_BYTES:
        raise ListingUnsafe(f"{where}: entry path {shown!r} is longer than {MAX_RELPATH_BYTES} bytes; {fix}")
    long = next((part for part in parts if len(part.encode("utf-8")) > MAX_NAME_BYTES), None)
    if long is not None:
        raise ListingUnsafe(
            f"{where}: entry path {shown!r} has a name of {len(long.encode('utf-8'))} bytes, "
            f"more than a filesystem takes ({MAX_NAME_BYTES}); {fix}"
        )


def place(source: Path, dest: Path) -> None:
    """Hard-link `source` at `dest` (a file shared by templates is stored once), or copy it where the
    filesystem refuses links (some FUSE/SMB mounts, a store on another device)."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def _remove_tree(path: Path) -> None:
    """Rename aside first (atomic), then delete: a crash mid-delete leaves only a `.trash` folder."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name.lstrip('.')}.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


MODELS_FOLDER = "models"
# Add-on LoRAs (addons/<name> -> .v.<name>.<dir md5>/ holding addon.json and lora.safetensors) and SDXL
# refiners (refiners/<id>): the same versions, switch and leases as model folders, sharing the object store.
ADDONS_FOLDER = "addons"
REFINERS = "refiners"
# Lock names per folder kind: ids and names hold no dot, so `addons.<name>` or `refiner.<id>` never names a
# template's lock.
_LOCK_PREFIXES = {MODELS_FOLDER: "", ADDONS_FOLDER: "addons.", REFINERS: "refiner."}


class Volume:
    """The volume's store plus one kind of served folder: template models (`models/`, the default), add-on
    LoRAs (`addons/`) or SDXL refiners (`refiners/`), versioned and switched the same way over one store."""

    def __init__(self, root: Path | str, folder: str = MODELS_FOLDER) -> None:
        self.root = Path(root)
        self.state = self.root / STATE_DIR
        self.objects = self.state / "objects"
        self.partial = self.state / "partial"
        self.locks = self.state / "locks"
        # The served folders of this kind (named `models` for history: add-ons and refiners have their own).
        self.models = self.root / folder
        self._lock_prefix = _LOCK_PREFIXES[folder]

    def ensure(self) -> None:
        for folder in (self.objects, self.partial, self.locks, self.models):
            folder.mkdir(parents=True, exist_ok=True)

    # -- objects

    def object_path(self, md5: str) -> Path:
        return self.objects / md5[:2] / md5[2:]

    def has_object(self, md5: str) -> bool:
        return self.object_path(md5).is_file()

    def partial_path(self, md5: str) -> Path:
        return self.partial / md5

    def commit_object(self, md5: str, source: Path) -> Path:
        """Move a verified file into the store (a concurrent writer of the same md5 is harmless)."""
        target = self.object_path(md5)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_file():
            # Keep the stored inode (folders hard-link it); ours is an identical duplicate.
            source.unlink()
            return target
        # Read-only: a file hard-linked into several model folders must not be edited through one.
        with contextlib.suppress(OSError):
            os.chmod(source, 0o444)
        os.replace(source, target)
        return target

    def lock_path(self, template: str) -> Path:
        return self.locks / f"{self._lock_prefix}{template}.lock"

    # -- versions

    def link_path(self, template: str) -> Path:
        return self.models / template

    def version_dir(self, template: str, dir_md5: str) -> Path:
        return self.models / f"{VERSION_PREFIX}{template}.{dir_md5.removesuffix('.dir')}"

    def leases_dir(self, version: Path) -> Path:
        return version.with_name(version.name + ".leases")

    def current_version(self, template: str) -> Path | None:
        """The version folder `models/<id>` points to, or the folder itself when it is a plain directory
        (placed there by hand or by an older worker)."""
        link = self.link_path(template)
        if link.is_symlink():
            target = link.parent / os.readlink(link)
            return target if target.is_dir() else None
        return link if link.is_dir() else None

    def read_marker(self, folder: Path) -> dict | None:
        try:
            data = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def current_release_hash(self, template: str) -> str | None:
        version = self.current_version(template)
        marker = self.read_marker(version) if version else None
        return marker.get("dir_md5") if marker else None

    def build_version(self, template: str, dir_md5: str, entries: Iterable[Entry], marker: dict) -> Path:
        """Make `models/.<id>.<hash>/` from store objects: built under a temp name, marker written last,
        renamed into place. Hard links where the filesystem allows, copies otherwise."""
        final = self.version_dir(template, dir_md5)
        if final.is_dir() and self.read_marker(final):
            return final
        tmp = self.models / f"{BUILD_PREFIX}{template}.{uuid.uuid4().hex[:12]}"
        tmp.mkdir(parents=True)
        try:
            for entry in entries:
                dest = tmp / entry.relpath
                dest.parent.mkdir(parents=True, exist_ok=True)
                place(self.object_path(entry.md5), dest)
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True), encoding="utf-8")
            fsync_dir(tmp)
            if final.exists():  # an incomplete leftover (no marker): replace it
                _remove_tree(final)
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process renamed its identical build into place first.
                if not (final.is_dir() and self.read_marker(final)):
                    raise
                _remove_tree(tmp)
            fsync_dir(self.models)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def switch(self, template: str, version: Path) -> None:
        """Point `models/<id>` at `version` in one atomic rename of a new symlink over the old one."""
        link = self.link_path(template)
        tmp_link = self.models / f"{LINK_PREFIX}{template}.{uuid.uuid4().hex[:12]}"
        os.symlink(version.name, tmp_link)
        if link.is_dir() and not link.is_symlink():
            # A plain folder from before versioning: move it aside as a version of its own (not atomic:
            # for a moment models/<id> is absent; this happens once per volume).
            os.rename(link, self.models / f"{VERSION_PREFIX}{template}.legacy-{uuid.uuid4().hex[:8]}")
        os.replace(tmp_link, link)
        fsync_dir(self.models)

    def versions(self, template: str) -> list[Path]:
        prefix = f"{VERSION_PREFIX}{template}."
        return [
            p
            for p in self.models.iterdir()
            if p.name.startswith(prefix) and p.is_dir() and not p.name.endswith(".leases")
        ]

    def collect_garbage(self, template: str, lease_timeout: float = DEFAULT_LEASE_TIMEOUT) -> list[Path]:
        """Remove versions of `template` other than the current one that no live lease holds.

        Race with a reader taking a lease: the version is renamed aside first and the leases are
        read again; a lease that appeared meanwhile makes it go back. A reader checks, after writing its
        lease, that the folder is still there (and re-resolves `models/<id>` otherwise)."""
        current = self.current_version(template)
        removed: list[Path] = []
        for version in self.versions(template):
            if current is not None and version.resolve() == current.resolve():
                continue
            leases = self.leases_dir(version)
            if live_leases(leases, lease_timeout):
                continue
            retiring = version.with_name(f"{RETIRING_PREFIX}{version.name[1:]}.{uuid.uuid4().hex[:8]}")
            try:
                os.rename(version, retiring)
            except FileNotFoundError:
                continue
            if live_leases(leases, lease_timeout):
                os.rename(retiring, version)
                continue
            shutil.rmtree(retiring, ignore_errors=True)
            shutil.rmtree(leases, ignore_errors=True)
            removed.append(version)
        # Leftovers of killed syncs: build folders and half-made links old enough that no live sync
        # can still be using them, and trash a crash left mid-delete.
        for prefix in (
            f"{BUILD_PREFIX}{template}.",
            f"{LINK_PREFIX}{template}.",
            TRASH_PREFIX,
            RETIRING_PREFIX,
        ):
            for path in self.models.glob(f"{prefix}*"):
                with contextlib.suppress(OSError):
                    if time.time() - path.lstat().st_mtime > LEFTOVER_AGE:
                        if path.is_dir() and not path.is_symlink():
                            shutil.rmtree(path, ignore_errors=True)
                        else:
                            path.unlink()
        return removed

    def links_work(self) -> bool:
        """Whether the volume takes hard links (place() falls back to copies where it does not)."""
        probe = self.partial / f".probe.{uuid.uuid4().hex[:12]}"
        try:
            probe.write_bytes(b"")
            os.link(probe, probe.with_name(probe.name + ".link"))
        except OSError:
            return False
        finally:
            for path in (probe, probe.with_name(probe.name + ".link")):
                with contextlib.suppress(OSError):
                    path.unlink()
        return True

    def collect_objects(self, grace: float = OBJECT_GRACE) -> list[Path]:
        """Delete store objects no model folder links to any more (link count 1) and untouched for `grace`
        seconds: a concurrent sync of another template (another lock) may have just stored an object, or
        chosen to reuse one (it refreshes its mtime), and not linked it yet. Where the volume refuses hard
        links, folders hold copies and every object has link count 1: nothing is collected there.
        `.dir` listings are small and kept."""
        if not self.links_work():
            return []
        removed = []
        now = time.time()
        for path in self.objects.glob("*/*"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                # ctime too: a rename into the store or a new link updates it, mtime is the download's.
                old = now - max(st.st_mtime, st.st_ctime) >= grace
                if st.st_nlink == 1 and old and not path.name.endswith(".dir"):
                    path.unlink()
                    removed.append(path)
        return removed


def live_leases(leases: Path, timeout: float) -> list[Path]:
    now = time.time()
    out = []
    with contextlib.suppress(FileNotFoundError):
        for lease in leases.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if now - lease.stat().st_mtime < timeout:
                    out.append(lease)
    return out


class Lease:
    """A reader's claim on the version `models/<id>` points to: while held, sync's garbage collection
    leaves that version alone. Refreshed by a heartbeat thread; a reader that dies stops refreshing and
    its lease expires after `timeout` (by mtime, so machines' clocks must agree within that margin).

    Files already open (or a pipeline already loaded into memory) survive deletion on POSIX anyway; the
    lease is for readers that open files lazily."""

    def __init__(self, volume: Volume, template: str, refresh: float = 60.0) -> None:
        self.volume = volume
        self.template = template
        self.refresh = refresh
        self.path: Path | None = None
        self.version: Path | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> Path:
        for _ in range(20):
            version = self.volume.current_version(self.template)
            if version is None:
                raise FileNotFoundError(f"{self.volume.link_path(self.template)}: no model folder")
            leases = self.volume.leases_dir(version)
            leases.mkdir(exist_ok=True)
            lease = leases / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            lease.write_text(str(time.time()), encoding="utf-8")
            if (version / MARKER_NAME).exists() or version == self.volume.link_path(self.template):
                self.path, self.version = lease, version
                self._thread = threading.Thread(target=self._beat, daemon=True)
                self._thread.start()
                return version
            # Retired between resolving and leasing: try the version now current.
            with contextlib.suppress(FileNotFoundError):
                lease.unlink()
        raise RuntimeError(f"{self.volume.link_path(self.template)}: could not lease a stable version")

    def _beat(self) -> None:
        while not self._stop.wait(self.refresh):
            if self.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> Path:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def leased(volume: Path | str, template: str) -> Iterator[Path]:
    """`with leased(volume, "cinematic") as folder:` the version folder, kept while the block runs."""
    with Lease(Volume(volume), template) as folder:
        yield folder


def check_free_space(volume: Volume, needed: int, what: str) -> None:
    free = shutil.disk_usage(volume.root).free
    # Headroom for listings, markers and filesystem overhead (metadata, partial journals).
    margin = 1 << 20
    if needed + margin > free:
        raise VolumeFull(
            f"volume {volume.root} has {free:,} bytes free but {what} needs {needed:,} bytes "
            f"(+{margin:,} headroom); free space on the volume or give it a larger one"
        )
