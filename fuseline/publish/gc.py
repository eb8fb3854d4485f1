"""Garbage collection: dvc.lock entries and outputs of templates (and checkpoints) no longer in the
catalog, and remote objects that no release and no output references. Never touches the run-cache
(`runs/`) or the releases themselves."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from fuseline.core.release import object_key
from fuseline.publish.errors import PublishError
from fuseline.publish.project import read_lock
from fuseline.publish.releases import OBJECTS_PREFIX, current_releases, dir_listing, release_history
from fuseline.remote.stores import ObjectStore


@dataclass(frozen=True)
class LocalGarbage:
    """Lock entries of stages the pipeline no longer defines (removed templates or checkpoints) and their
    outputs in the workspace."""

    stages: list[str]
    paths: list[str]


def defined_stages(root: Path) -> set[str]:
    from dvc.repo import Repo

    if not (root / "dvc.yaml").is_file():
        # Without the pipeline every lock entry would look orphaned: refuse rather than wipe the lock.
        raise PublishError("NO_PIPELINE", f"{root / 'dvc.yaml'}: not found (fix: run from the project root)")
    with Repo(str(root)) as repo:
        # dvc.lock names a stage by its bare name (`merge@alpha`); `addressing` would prefix the dvc.yaml
        # path relative to the current directory.
        return {stage.name for stage in repo.index.stages if getattr(stage, "name", None)}


def find_local_garbage(root: Path) -> LocalGarbage:
    root = Path(root).resolve()
    lock_stages = read_lock(root).get("stages", {})
    defined = defined_stages(root)
    orphans = sorted(name for name in lock_stages if name not in defined)
    paths = sorted(
        {
            entry["path"]
            for name in orphans
            for kind in ("outs", "metrics", "plots")
            for entry in lock_stages[name].get(kind, []) or []
            if isinstance(entry, dict) and "path" in entry
        }
    )
    return LocalGarbage(stages=orphans, paths=paths)


def remove_local_garbage(root: Path, garbage: LocalGarbage) -> None:
    from dvc.utils.serialize import modify_yaml

    root = Path(root).resolve()
    for rel in garbage.paths:
        path = (root / rel).resolve()
        if root not in path.parents:
            raise PublishError("UNSAFE_PATH", f"{root / 'dvc.lock'}: out {rel!r} lies outside the project")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        # Leave no empty parent folders behind (artifacts/verify/<id>/ after its files go).
        parent = path.parent
        while parent != root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    if garbage.stages:
        # DVC's own YAML round-trip keeps dvc.lock's formatting for the entries that stay.
        with modify_yaml(str(root / "dvc.lock")) as lock:
            for name in garbage.stages:
                lock["stages"].pop(name, None)


def _lock_object_refs(root: Path) -> tuple[set[str], set[str]]:
    """(file md5s, .dir md5s) of every output dvc.lock records."""
    files: set[str] = set()
    dirs: set[str] = set()
    for stage in read_lock(root).get("stages", {}).values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []) or []:
                md5 = isinstance(entry, dict) and entry.get("md5")
                if md5:
                    (dirs if md5.endswith(".dir") else files).add(md5)
    return files, dirs


def referenced_objects(root: Path, store: ObjectStore) -> set[str]:
    """Keys under files/md5/ that some release in the history, some channel's current release (its
    templates', add-ons' and refiners' folders), or some output in dvc.lock needs."""
    local_cache = root / ".dvc" / "cache"
    dirs: set[str] = set()
    for release in [*release_history(store), *current_releases(store).values()]:
        dirs.update(release.folder_hashes())
    files, lock_dirs = _lock_object_refs(root)
    dirs |= lock_dirs
    keys = {object_key(m) for m in files}
    for dir_md5 in dirs:
        keys.add(object_key(dir_md5))
        keys.update(object_key(e["md5"]) for e in dir_listing(store, dir_md5, local_cache))
    return keys


def find_remote_garbage(root: Path, store: ObjectStore) -> list[str]:
    """Objects on the remote that nothing references. Only files/md5/ is considered: the run-cache
    (runs/) and the releases (releases/) are never touched."""
    referenced = referenced_objects(Path(root).resolve(), store)
    return sorted(k for k in store.keys(OBJECTS_PREFIX) if k not in referenced)
