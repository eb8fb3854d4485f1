"""The source archive: every source a build read (checkpoints, LoRAs, VAE, config folders), kept in the
project's DVC remote beside the published models, so that the build can be repeated after its upstream
lost it (a Civitai model deleted or hidden by its author, an hf repository made private, a changed file).

Layout under the remote's root (the folder, or bucket/prefix), next to DVC's `files/md5/`:

    sources/sha256/<2 hex>/<64 hex>   a source file, named by its sha256: stored once however many templates
                                      (or projects sharing the remote) use it
    sources/trees/<64 hex>.json       a folder source (a diffusers folder, a config folder): its listing
                                      [{"relpath", "sha256", "size"}], named by its tree hash (tree_sha256,
                                      the hash the fetch receipts record); its files are under sources/sha256/
    sources/index/<64 hex>.json       {"source", "kind", "sha256"}: what the source string whose sha256
                                      names it was archived as; how a folder or an unpinned file is found

sha256, not DVC's md5: catalogs pin sources by sha256, so a pin names its archived file without any index,
and every file is verified against that hash when it comes back. Files are written whole (a temporary file
renamed on a local remote, one put or a completed multipart upload on S3), and a tree's listing only after
all its files: a listing that is there means a complete folder. It is written over an ObjectStore
(fuseline.remote.stores), so it works on every remote publishing works on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuseline.core.files import sha256_file
from fuseline.remote.errors import RemoteError
from fuseline.remote.stores import ObjectStore

PREFIX = "sources/"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
KINDS = ("file", "folder")


def file_key(sha256: str) -> str:
    return f"{PREFIX}sha256/{sha256[:2]}/{sha256}"


def tree_key(tree: str) -> str:
    return f"{PREFIX}trees/{tree}.json"


def index_key(source: str) -> str:
    return f"{PREFIX}index/{hashlib.sha256(source.encode()).hexdigest()}.json"


def tree_listing(folder: Path) -> list[dict[str, Any]]:
    """Every file under `folder`, sorted by relative path: {"relpath", "sha256", "size"}."""
    return [
        {
            "relpath": path.relative_to(folder).as_posix(),
            "sha256": sha256_file(path),
            "size": path.stat().st_size,
        }
        for path in sorted(p for p in folder.rglob("*") if p.is_file())
    ]


def tree_sha256(listing: list[dict[str, Any]]) -> str:
    """A folder's content identity: sha256 over its sorted `<file sha256>  <relative path>` lines. Where the
    folder lies does not count; its files' names and bytes do."""
    lines = "".join(f"{entry['sha256']}  {entry['relpath']}\n" for entry in listing)
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass
class ArchiveReport:
    """What archiving a project's sources did: hashes already in the archive, and hashes uploaded now."""

    archive: str
    present: list[str] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0


class SourceArchive:
    """The archive in one remote (an ObjectStore). Raises RemoteError: ARCHIVE_MISSING when it lacks what
    is asked for, ARCHIVE_CORRUPT when what comes back does not match its hash, and the store's own codes."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.description = f"{store.description.split(' at ')[0].rstrip('/')}/{PREFIX}"

    # -- files

    def has_file(self, sha256: str) -> bool:
        return self.store.exists(file_key(_sha(sha256)))

    def put_file(self, sha256: str, path: Path) -> bool:
        """Upload `path` as `sha256` unless the archive has it; True when uploaded. The file is hashed
        first: only bytes that are what their name says enter the archive."""
        sha = _sha(sha256)
        if self.has_file(sha):
            return False
        actual = sha256_file(path)
        if actual != sha:
            raise RemoteError(
                "SOURCE_CHANGED",
                f"{path}: sha256 {actual}, but the build used {sha}; the file changed since it was built "
                "(fix: restore it, or rebuild with `dvc repro` so the build and the archive agree)",
            )
        self.store.upload(file_key(sha), path)
        return True

    def get_file(self, sha256: str, dest: Path) -> None:
        """Download `sha256` to `dest`, verified; `dest` appears only when complete and correct."""
        sha = _sha(sha256)
        part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.archive")
        try:
            if not self.store.download(file_key(sha), part):
                raise RemoteError(
                    "ARCHIVE_MISSING", f"{self.description}: no archived file {file_key(sha)} (sha256 {sha})"
                )
            actual = sha256_file(part)
            if actual != sha:
                raise RemoteError(
                    "ARCHIVE_CORRUPT",
                    f"{self.description}{file_key(sha)[len(PREFIX) :]}: content has sha256 {actual}, not "
                    f"{sha}; the archived copy is damaged (fix: publish again from a machine that has it)",
                )
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)

    # -- folders

    def has_tree(self, tree: str) -> bool:
        return self.store.exists(tree_key(_sha(tree)))

    def put_tree(self, tree: str, folder: Path) -> list[dict[str, Any]]:
        """Archive the folder source `folder` as `tree`: its files, then its listing. Returns the listing's
        entries of the files uploaded (those the archive did not hold yet)."""
        listing = tree_listing(folder)
        actual = tree_sha256(listing)
        if actual != _sha(tree):
            raise RemoteError(
                "SOURCE_CHANGED",
                f"{folder}: folder hash {actual}, but the build used {tree}; the folder changed since it was "
                "built (fix: restore it, or rebuild with `dvc repro`)",
            )
        uploaded = [e for e in listing if self.put_file(e["sha256"], folder / e["relpath"])]
        self.store.write(tree_key(tree), json.dumps(listing, indent=1).encode())
        return uploaded

    def get_tree(self, tree: str) -> list[dict[str, Any]]:
        """The listing of the archived folder `tree`, checked against its name."""
        data = self.store.read(tree_key(_sha(tree)))
        if data is None:
            raise RemoteError("ARCHIVE_MISSING", f"{self.description}: no archived folder {tree_key(tree)}")
        try:
            listing = json.loads(data)
            valid = tree_sha256(listing) == tree and all(
                _HEX64.match(e["sha256"]) and _safe_relpath(e["relpath"]) for e in listing
            )
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            valid = False
        if not valid:
            raise RemoteError(
                "ARCHIVE_CORRUPT",
                f"{self.description}{tree_key(tree)[len(PREFIX) :]}: not the listing of folder {tree} "
                "(fix: publish again from a machine that has the source)",
            )
        return listing

    # -- the index

    def put_index(self, source: str, kind: str, sha256: str) -> None:
        record = {"source": source, "kind": kind, "sha256": _sha(sha256)}
        self.store.write(index_key(source), json.dumps(record, indent=1, sort_keys=True).encode())

    def lookup(self, source: str) -> tuple[str, str] | None:
        """(kind, sha256) the source string was archived as, or None."""
        data = self.store.read(index_key(source))
        if data is None:
            return None
        try:
            record = json.loads(data)
            kind, sha = record["kind"], record["sha256"]
            if record["source"] == source and kind in KINDS and _HEX64.match(sha):
                return kind, sha
        except (ValueError, TypeError, KeyError):
            pass
        raise RemoteError(
            "ARCHIVE_CORRUPT",
            f"{self.description}{index_key(source)[len(PREFIX) :]}: not an index record of {source!r} "
            "(fix: delete it and publish again)",
        )


def _sha(value: str) -> str:
    sha = value.lower()
    if not _HEX64.match(sha):
        raise RemoteError("SHA256_INVALID", f"{value!r} is not a sha256 (64 hex digits)")
    return sha


def _safe_relpath(relpath: Any) -> bool:
    # Listings are restored into the download cache: nothing may point outside the folder.
    return (
        isinstance(relpath, str)
        and bool(relpath)
        and not relpath.startswith("/")
        and "\\" not in relpath
        and "\0" not in relpath
        and all(part not in ("", ".", "..") for part in relpath.split("/"))
    )
