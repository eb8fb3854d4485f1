"""Sync of add-on folders (worker/sync/templates.py): the add-ons a release offers with the synced templates
land in `<volume>/addons/<name>` with the same store, versions, atomic switch and warm start as templates,
from a real DVC remote (`dvc add` + `dvc push`)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from fuseline.core.logs import event_fields
from fuseline.core.manifest import AddonManifest
from fuseline.core.release import Release, ReleasedAddon, release_key
from tests.worker.sync_fixtures import _dvc, _write_model, released_entry
from worker.sync.templates import sync_templates
from worker.sync.volume import ADDONS_FOLDER, Volume


def _write_addon(folder: Path, name: str, templates: list[str] | None) -> AddonManifest:
    folder.mkdir(parents=True)
    (folder / "lora.safetensors").write_bytes(name.encode() * 1000)
    manifest = AddonManifest(
        name=name,
        source=f"file:{name}.safetensors",
        sha256="c" * 64,
        default_scale=0.5,
        min_scale=0.0,
        max_scale=1.0,
        templates=templates,
        placed_keys={"unet": 4},
        checked_on=["tiny"],
        fuseline_version="test",
    )
    manifest.write(folder)
    return manifest


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Path:
    """A local DVC remote with templates tpl-a, tpl-b and add-ons `all` (every template) and `only-b`, and
    the release naming them."""
    base = tmp_path_factory.mktemp("addon-remote")
    project, remote = base / "project", base / "remote"
    project.mkdir()
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    _dvc(project, "init", "--no-scm", "-q", env=env)
    with (project / ".dvc" / "config").open("a") as config:
        config.write(f"['remote \"local\"']\n    url = {remote}\n")
    _write_model(project / "a", "tpl-a", "a")
    _write_model(project / "b", "tpl-b", "b")
    manifests = {
        "all": _write_addon(project / "all", "all", None),
        "only-b": _write_addon(project / "only-b", "only-b", ["tpl-b"]),
    }
    _dvc(project, "add", "-q", "a", "b", "all", "only-b", env=env)
    _dvc(project, "push", "-q", "-r", "local", env=env)
    addons = {}
    for name, manifest in manifests.items():
        # The `.dvc` file `dvc add` wrote: plain `key: value` lines hold the folder's md5, size and count.
        text = (project / f"{name}.dvc").read_text()
        fields = dict(line.strip("- ").split(": ", 1) for line in text.splitlines() if ": " in line)
        addons[name] = ReleasedAddon(
            dir_md5=fields["md5"],
            path=name,
            size=int(fields["size"]),
            nfiles=int(fields["nfiles"]),
            **manifest.model_dump(
                include={"source", "sha256", "default_scale", "min_scale", "max_scale", "templates"}
            ),
        )
    release = Release(
        channel="main",
        created=time.strftime("%Y%m%dT%H%M%SZ"),
        templates={"tpl-a": released_entry(project, "a"), "tpl-b": released_entry(project, "b")},
        addons=addons,
    )
    path = remote / release_key("main")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(release.to_json())
    return path


def test_the_addons_of_the_synced_templates_are_synced_beside_them(remote, tmp_path) -> None:
    report = sync_templates(str(remote), tmp_path, ["tpl-a"], workers=2)
    assert report.ok, report.lines()
    assert [(a.template, a.status) for a in report.addons] == [("all", "synced")]
    assert report.summary()["addons"] == {"all": "synced"}
    assert any(line.startswith("  add-on all: synced") for line in report.lines())
    events = []
    handler = logging.Handler()
    handler.emit = events.append
    logger = logging.getLogger("test.sync_addons")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        report.log(logger)
    finally:
        logger.removeHandler(handler)
    addon_events = [fields for name, fields in map(event_fields, events) if name == "sync.addon"]
    assert [(e["addon"], e["status"]) for e in addon_events] == [("all", "synced")]
    link = tmp_path / "addons" / "all"
    assert link.is_symlink() and os.readlink(link).startswith(".v.all.")
    assert AddonManifest.read(link).name == "all"
    assert not (tmp_path / "addons" / "only-b").exists()
    # The add-on's lock is its own, apart from any template of the same name.
    assert Volume(tmp_path, ADDONS_FOLDER).lock_path("all").name == "addons.all.lock"

    again = sync_templates(str(remote), tmp_path, workers=2)  # every template: both add-ons
    assert {a.template: a.status for a in again.addons} == {"all": "present", "only-b": "synced"}
    assert (tmp_path / "addons" / "only-b" / "lora.safetensors").read_bytes() == b"only-b" * 1000


def test_a_release_without_addons_syncs_none(remote, tmp_path) -> None:
    release = Release.from_json(remote.read_text())
    plain = remote.with_name("plain.json")
    plain.write_text(release.model_copy(update={"addons": None}).to_json())
    report = sync_templates(str(plain), tmp_path, workers=2)
    assert report.ok and report.addons == [] and "addons" not in report.summary()
    assert not (tmp_path / "addons").exists()
