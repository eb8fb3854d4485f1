"""The build project as publishing reads it: which template folders dvc.lock records, whether they are
up to date and verified (`dvc status`), what a release entry says about each, and which templates a CI run
has to rebuild."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fuseline.core.manifest import AddonManifest, ManifestError, ModelManifest, RefinerManifest
from fuseline.core.redact import redact
from fuseline.core.release import (
    EmbeddingSummary,
    LoraSummary,
    ReleasedAddon,
    ReleasedRefiner,
    ReleasedTemplate,
)
from fuseline.publish.errors import PublishError
from fuseline.remote.stores import RemoteConfig

MODELS_DIR = "artifacts/models"
ADDONS_DIR = "artifacts/addons"
BASE_DIR = "artifacts/base"
_MERGE_STAGE = re.compile(r"^merge@(?P<id>.+)$")
_ADDON_STAGE = re.compile(r"^addon@(?P<id>.+)$")
_VERIFY_STAGE = re.compile(r"^verify@(?P<id>.+)$")


@dataclass(frozen=True)
class BuiltTemplate:
    """A template's model folder as dvc.lock records it."""

    id: str
    path: str
    dir_md5: str
    size: int
    nfiles: int


def read_lock(root: Path) -> dict[str, Any]:
    path = root / "dvc.lock"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def _catalog_ids(root: Path, key: str) -> list[str]:
    path = root / "templates.json"
    try:
        data = json.loads(path.read_text())
        return sorted(data[key] if key == "templates" else data.get(key, {}))
    except FileNotFoundError:
        raise PublishError("NO_CATALOG", f"{path}: not found (fix: run from the project root)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PublishError(
            "BAD_CATALOG", f"{path}: cannot read {key} ({exc}) (fix: `fuseline validate`)"
        ) from None


def catalog_template_ids(root: Path) -> list[str]:
    return _catalog_ids(root, "templates")


def catalog_addon_names(root: Path) -> list[str]:
    """The catalog's add-on names (none when it has no `addons`)."""
    return _catalog_ids(root, "addons")


def _built_folders(root: Path, stage: str, folder: str, ids: Iterable[str]) -> dict[str, BuiltTemplate]:
    """The folder `<folder>/<id>` each `<stage>@<id>` stage wrote, as dvc.lock records it."""
    stages = read_lock(root).get("stages", {})
    found: dict[str, BuiltTemplate] = {}
    for item in ids:
        wanted = f"{folder}/{item}"
        outs = stages.get(f"{stage}@{item}", {}).get("outs", [])
        out = next((o for o in outs if o.get("path") == wanted), None)
        if out is None or not str(out.get("md5", "")).endswith(".dir"):
            raise PublishError(
                "NOT_BUILT",
                f"{root / 'dvc.lock'}: no entry for {wanted} (stage {stage}@{item}) "
                f"(fix: `dvc repro {stage}@{item}`, or `dvc repro --pull` to restore it)",
            )
        found[item] = BuiltTemplate(
            id=item,
            path=wanted,
            dir_md5=out["md5"],
            size=int(out.get("size", 0)),
            nfiles=int(out.get("nfiles", 1)),
        )
    return found


def built_templates(root: Path, template_ids: Iterable[str] | None = None) -> dict[str, BuiltTemplate]:
    """Each catalog template's model folder from dvc.lock (the `merge@<id>` stage's out)."""
    ids = list(template_ids) if template_ids is not None else catalog_template_ids(root)
    return _built_folders(root, "merge", MODELS_DIR, ids)


def built_addons(root: Path, names: Iterable[str] | None = None) -> dict[str, BuiltTemplate]:
    """Each catalog add-on's folder from dvc.lock (the `addon@<name>` stage's out)."""
    ids = list(names) if names is not None else catalog_addon_names(root)
    return _built_folders(root, "addon", ADDONS_DIR, ids)


def released_template(root: Path, built: BuiltTemplate) -> ReleasedTemplate:
    """The release entry of a built template: its hash and sizes plus its manifest's summary."""
    try:
        manifest = ModelManifest.read(root / built.path)
    except ManifestError as exc:
        fix = f"(fix: `dvc checkout {built.path}` or `dvc repro`)"
        raise PublishError("BAD_MANIFEST", f"{exc} {fix}") from None
    if manifest.template != built.id:
        raise PublishError(
            "BAD_MANIFEST",
            f"{root / built.path}/fuseline.json: names template {manifest.template!r}, expected {built.id!r} "
            f"(fix: `dvc repro merge@{built.id}`)",
        )
    return ReleasedTemplate(
        dir_md5=built.dir_md5,
        path=built.path,
        size=built.size,
        nfiles=built.nfiles,
        spec_hash=manifest.spec_hash,
        checkpoint=manifest.checkpoint.source,
        loras=[LoraSummary(source=x.source, sha256=x.sha256, scale=x.scale) for x in manifest.loras],
        prediction_type=manifest.prediction_type,
        embeddings=None
        if manifest.embeddings is None
        else [EmbeddingSummary(token=x.token, source=x.source, sha256=x.sha256) for x in manifest.embeddings],
        refiner=manifest.refiner,
    )


def released_addon(root: Path, built: BuiltTemplate) -> ReleasedAddon:
    """The release entry of a built add-on: its hash and sizes plus what its addon.json says."""
    try:
        manifest = AddonManifest.read(root / built.path)
    except ManifestError as exc:
        fix = f"(fix: `dvc checkout {built.path}` or `dvc repro addon@{built.id}`)"
        raise PublishError("BAD_MANIFEST", f"{exc} {fix}") from None
    if manifest.name != built.id:
        raise PublishError(
            "BAD_MANIFEST",
            f"{root / built.path}/addon.json: names add-on {manifest.name!r}, expected {built.id!r} "
            f"(fix: `dvc repro addon@{built.id}`)",
        )
    return ReleasedAddon(
        dir_md5=built.dir_md5,
        path=built.path,
        size=built.size,
        nfiles=built.nfiles,
        source=manifest.source,
        sha256=manifest.sha256,
        default_scale=manifest.default_scale,
        min_scale=manifest.min_scale,
        max_scale=manifest.max_scale,
        templates=manifest.templates,
    )


def built_refiners(root: Path, refiner_ids: Iterable[str]) -> dict[str, BuiltTemplate]:
    """Each refiner's folder from dvc.lock (the `convert@<id>` stage's out: a refiner is exported there)."""
    stages = read_lock(root).get("stages", {})
    found: dict[str, BuiltTemplate] = {}
    for refiner in sorted(set(refiner_ids)):
        wanted = f"{BASE_DIR}/{refiner}"
        outs = stages.get(f"convert@{refiner}", {}).get("outs", [])
        out = next((o for o in outs if o.get("path") == wanted), None)
        if out is None or not str(out.get("md5", "")).endswith(".dir"):
            raise PublishError(
                "NOT_BUILT",
                f"{root / 'dvc.lock'}: no entry for {wanted} (stage convert@{refiner}) "
                f"(fix: `dvc repro convert@{refiner}`, or `dvc repro --pull` to restore it)",
            )
        found[refiner] = BuiltTemplate(
            id=refiner,
            path=wanted,
            dir_md5=out["md5"],
            size=int(out.get("size", 0)),
            nfiles=int(out.get("nfiles", 1)),
        )
    return found


def released_refiner(root: Path, built: BuiltTemplate) -> ReleasedRefiner:
    """The release entry of a built refiner, from its refiner manifest."""
    try:
        manifest = RefinerManifest.read(root / built.path)
    except ManifestError as exc:
        fix = f"(fix: the checkpoint must be an SDXL refiner file; `dvc repro convert@{built.id}`)"
        raise PublishError("BAD_MANIFEST", f"{exc} {fix}") from None
    if manifest.refiner != built.id:
        raise PublishError(
            "BAD_MANIFEST",
            f"{root / built.path}/fuseline.json: names refiner {manifest.refiner!r}, expected {built.id!r} "
            f"(fix: `dvc repro convert@{built.id}`)",
        )
    return ReleasedRefiner(
        dir_md5=built.dir_md5,
        path=built.path,
        size=built.size,
        nfiles=built.nfiles,
        spec_hash=manifest.spec_hash,
        checkpoint=manifest.checkpoint.source,
        prediction_type=manifest.prediction_type,
    )


def git_commit(root: Path) -> str | None:
    """HEAD's commit, or None when `root` is not in a git work tree (or git is missing)."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def dvc_bin() -> str:
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else "dvc"


def run_dvc(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "DVC_NO_ANALYTICS": "1", **(env or {})}
    return subprocess.run(
        [dvc_bin(), *args], cwd=root, env=full_env, capture_output=True, text=True, check=False
    )


def stale_templates(root: Path, template_ids: Iterable[str]) -> list[str]:
    """Templates whose merge stage `dvc status` reports changed (dvc.lock does not match the workspace)."""
    targets = [f"merge@{t}" for t in template_ids]
    proc = run_dvc(root, "status", "--json", *targets)
    if proc.returncode != 0:
        raise PublishError("DVC_FAILED", f"`dvc status` failed in {root}: {_last_line(proc.stderr)}")
    changed = json.loads(proc.stdout or "{}")
    return sorted(m["id"] for name in changed if (m := _MERGE_STAGE.match(name)))


def stale_addons(root: Path, names: Iterable[str]) -> list[str]:
    """Add-ons whose `addon@<name>` stage `dvc status` reports changed."""
    targets = [f"addon@{name}" for name in names]
    if not targets:
        return []
    proc = run_dvc(root, "status", "--json", *targets)
    if proc.returncode != 0:
        raise PublishError("DVC_FAILED", f"`dvc status` failed in {root}: {_last_line(proc.stderr)}")
    changed = json.loads(proc.stdout or "{}")
    return sorted(m["id"] for name in changed if (m := _ADDON_STAGE.match(name)))


def stale_refiners(root: Path, refiner_ids: Iterable[str]) -> list[str]:
    """Refiners whose convert stage `dvc status` reports changed."""
    targets = [f"convert@{r}" for r in refiner_ids]
    if not targets:
        return []
    proc = run_dvc(root, "status", "--json", *targets)
    if proc.returncode != 0:
        raise PublishError("DVC_FAILED", f"`dvc status` failed in {root}: {_last_line(proc.stderr)}")
    changed = json.loads(proc.stdout or "{}")
    return sorted(name.partition("@")[2] for name in changed if name.startswith("convert@"))


def unverified_templates(root: Path, template_ids: Iterable[str]) -> list[str]:
    """Templates whose `verify@<id>` stage has no dvc.lock entry or is out of date.

    DVC locks `merge@<id>` as soon as the merge finishes, before verify runs; a merge whose check then
    failed (or never ran) is locked all the same. Only a locked, up-to-date verify says the model passed.
    """
    ids = list(template_ids)
    locked = read_lock(root).get("stages", {})
    missing = {t for t in ids if f"verify@{t}" not in locked}
    targets = [f"verify@{t}" for t in ids if t not in missing]
    changed: dict[str, Any] = {}
    if targets:
        proc = run_dvc(root, "status", "--json", *targets)
        if proc.returncode != 0:
            raise PublishError("DVC_FAILED", f"`dvc status` failed in {root}: {_last_line(proc.stderr)}")
        changed = json.loads(proc.stdout or "{}")
    stale = {m["id"] for name in changed if (m := _VERIFY_STAGE.match(name))}
    return sorted(missing | stale)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in redact(text).splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def push(root: Path, remote: RemoteConfig) -> None:
    """`dvc push --run-cache` to `remote`: the outputs and the run-cache entries of every stage."""
    proc = run_dvc(root, "push", "--run-cache", "-r", remote.name)
    if proc.returncode != 0:
        raise PublishError(
            "PUSH_FAILED",
            f"`dvc push --run-cache -r {remote.name}` failed: {_last_line(proc.stderr or proc.stdout)} "
            "(fix: the cause above, then re-run `fuseline publish`; the current release is untouched)",
        )


# ------------------------------------------------------------------------------ what would rebuild

# `dvc status` entries that mean a stage's definition or inputs changed. A fresh CI clone has no outputs,
# so "deleted" outs, and "deleted" deps that another stage produces, are not changes.
_DEFINITION_CHANGES = ("changed command", "changed params")


def changed_templates(status: dict[str, Any], catalog: dict[str, Any], produced: set[str]) -> list[str]:
    """Templates whose stages would compute something new, from `dvc status --json` output.

    `produced` holds the paths some stage outputs (their absence in a fresh clone is not a change).
    A changed `convert@<checkpoint>` rebuilds the templates on that checkpoint, a changed `vae` all."""
    templates: dict[str, Any] = catalog.get("templates", {})
    changed: set[str] = set()
    for stage, entries in status.items():
        if not _stage_inputs_changed(entries, produced):
            continue
        kind, _, key = stage.partition("@")
        if kind in ("merge", "verify") and key in templates:
            changed.add(key)
        elif kind == "convert":
            # A template's base, or its refiner (published with it).
            changed.update(
                t for t, spec in templates.items() if key in (spec.get("checkpoint"), spec.get("refiner"))
            )
        elif stage == "vae":
            changed.update(templates)
    return sorted(changed)


def _stage_inputs_changed(entries: Any, produced: set[str]) -> bool:
    if not isinstance(entries, list):
        return True  # an unexpected shape: rebuilding is the safe answer
    for entry in entries:
        if isinstance(entry, str):  # "always changed", "changed checksum": the stage must run
            return True
        if not isinstance(entry, dict):
            return True
        for what, detail in entry.items():
            if what in _DEFINITION_CHANGES:
                return True
            if what == "changed deps":
                for path, state in detail.items():
                    if not (state == "deleted" and path in produced):
                        return True
    return False


def produced_paths(root: Path) -> set[str]:
    """Every path a stage of the pipeline outputs (outs, metrics, plots), as dvc.yaml resolves them."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {out.def_path for stage in repo.index.stages for out in stage.outs}


def project_changed_templates(root: Path) -> list[str]:
    root = Path(root).resolve()
    proc = run_dvc(root, "status", "--json")
    if proc.returncode != 0:
        raise PublishError("DVC_FAILED", f"`dvc status` failed in {root}: {_last_line(proc.stderr)}")
    catalog = json.loads((root / "templates.json").read_text())
    return changed_templates(json.loads(proc.stdout or "{}"), catalog, produced_paths(root))
