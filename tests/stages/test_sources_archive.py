"""A fetch falls back to the project's source archive when upstream lost a source (deleted: 404/410, or
other bytes than the build pinned), and only then; against the local Civitai look-alike and a real local
DVC remote. The whole build against both remotes is tests/stages/test_pipeline_archive.py."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
from pathlib import Path

import pytest

from fuseline.core.catalog.loading import load_catalog
from fuseline.core.catalog.model import Source
from fuseline.core.logs import event_fields
from fuseline.remote.archive import SourceArchive, file_key, tree_listing, tree_sha256
from fuseline.remote.stores import LocalStore
from stages.errors import StageError
from stages.local_files import materialize
from stages.sources.archived import ProjectArchive
from stages.sources.cache import DownloadCache
from stages.sources.errors import SourceError
from stages.sources.resolve import fetch
from testkit.civitai import CivitaiServer, safetensors_bytes

LORA = safetensors_bytes(40_000, seed=5)
SHA = hashlib.sha256(LORA).hexdigest()


@pytest.fixture
def civitai(tmp_path, monkeypatch):
    with CivitaiServer(tmp_path / "civitai", api_key="civ-" + secrets.token_hex(16)) as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        server.add_version(501, LORA, name="style.safetensors")
        yield server


def dvc_project(root: Path, remote: Path) -> Path:
    """A project folder whose DVC config names `remote` as its default (local) remote."""
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text(
        f"[core]\n    no_scm = True\n    remote = local\n['remote \"local\"']\n    url = {remote}\n"
    )
    return root


@pytest.fixture
def archive(tmp_path) -> tuple[ProjectArchive, SourceArchive]:
    """The project's archive (what fetch gets) and the same archive to fill (what publish did)."""
    remote = tmp_path / "remote"
    project = dvc_project(tmp_path / "project", remote)
    filled = SourceArchive(LocalStore(remote))
    lora = tmp_path / "published.safetensors"
    lora.write_bytes(LORA)
    filled.put_file(SHA, lora)
    filled.put_index("civitai:501", "file", SHA)
    return ProjectArchive(project), filled


def archived_events(caplog) -> list[dict]:
    return [
        {"message": r.getMessage(), **event_fields(r)[1]}
        for r in caplog.records
        if event_fields(r)[0] == "source.archived"
    ]


def delete_upstream(civ: CivitaiServer) -> None:
    civ.versions.pop(501)  # the author deleted the model: the API answers 404


def change_upstream(civ: CivitaiServer) -> None:
    version = civ.versions[501]
    (civ.root / "storage" / version.storage_path.lstrip("/")).write_bytes(safetensors_bytes(40_000, seed=6))


def relist_upstream(civ: CivitaiServer) -> None:
    civ.versions[501].data["files"][0]["hashes"]["SHA256"] = "AB" * 32  # a new upload under the same id


@pytest.mark.parametrize(
    ("lose", "code"),
    [
        (delete_upstream, "NOT_FOUND"),
        (change_upstream, "SHA256_MISMATCH"),
        (relist_upstream, "SHA256_PIN_MISMATCH"),
    ],
)
def test_a_lost_source_comes_from_the_archive_verified_and_says_so(
    civitai, archive, tmp_path, caplog, lose, code
):
    project_archive, _ = archive
    lose(civitai)
    source = Source(source="civitai:501", sha256=SHA)
    with pytest.raises(SourceError) as err:  # without the archive: upstream's error, as before
        fetch(source, cache=DownloadCache(tmp_path / "cache-a"))
    assert err.value.code == code
    caplog.set_level(logging.WARNING, logger="fuseline.sources.archive")
    path = fetch(source, cache=DownloadCache(tmp_path / "cache-b"), archive=project_archive)
    assert path.read_bytes() == LORA and path == DownloadCache(tmp_path / "cache-b").path_for(SHA)
    (event,) = archived_events(caplog)
    assert (event["source"], event["sha256"], event["kind"], event["upstream_code"]) == (
        "civitai:501",
        SHA,
        "file",
        code,
    )
    assert event["archive"].endswith("/remote/sources/") and "using the archived copy" in event["message"]
    assert civitai.api_key not in str(event)


def test_an_unpinned_source_is_found_through_the_index(civitai, archive, tmp_path, caplog):
    project_archive, _ = archive
    delete_upstream(civitai)
    caplog.set_level(logging.WARNING, logger="fuseline.sources.archive")
    path = fetch(
        Source(source="civitai:501"), cache=DownloadCache(tmp_path / "cache"), archive=project_archive
    )
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA and archived_events(caplog)


def test_other_upstream_failures_do_not_fall_back(civitai, archive, tmp_path, monkeypatch):
    project_archive, _ = archive
    monkeypatch.delenv("CIVITAI_API_KEY")  # the model needs a key: 401, upstream's to fix, not hidden
    with pytest.raises(SourceError) as err:
        fetch(
            Source(source="civitai:501", sha256=SHA),
            cache=DownloadCache(tmp_path / "c"),
            archive=project_archive,
        )
    assert err.value.code == "AUTH_REQUIRED"


def test_no_usable_archived_copy_keeps_upstreams_error_and_says_why(civitai, archive, tmp_path):
    project_archive, filled = archive
    delete_upstream(civitai)
    other = Source(source="civitai:501", sha256="cd" * 32)  # a pin the archive does not hold
    with pytest.raises(SourceError) as err:
        fetch(other, cache=DownloadCache(tmp_path / "cache"), archive=project_archive)
    assert err.value.code == "NOT_FOUND" and "ARCHIVE_MISSING" in str(err.value)
    # A damaged archived copy is refused and leaves nothing in the cache.
    damaged = tmp_path / "remote" / file_key(SHA)
    damaged.chmod(0o644)
    damaged.write_bytes(b"not the lora")
    cache = DownloadCache(tmp_path / "cache")
    with pytest.raises(SourceError) as err:
        fetch(Source(source="civitai:501", sha256=SHA), cache=cache, archive=project_archive)
    assert err.value.code == "NOT_FOUND" and "ARCHIVE_CORRUPT" in str(err.value)
    assert cache.get(SHA) is None
    assert filled.has_file(SHA)


def test_a_missing_file_folder_is_rebuilt_from_the_archive_by_its_receipt(archive, tmp_path, caplog):
    project_archive, filled = archive
    project = project_archive.root
    folder = project / "configs" / "sdxl"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "config.json").write_text('{"sample_size": 128}')
    listing = tree_listing(folder)
    tree = tree_sha256(listing)
    filled.put_tree(tree, folder)
    catalog_data = {
        "version": 1,
        "vae": {"source": "file:vae.safetensors"},
        "checkpoints": {"base": {"source": "file:base.safetensors", "config": "file:configs/sdxl"}},
        "templates": {"one": {"checkpoint": "base"}},
    }
    (project / "templates.json").write_text(json.dumps(catalog_data))
    catalog = load_catalog(project / "templates.json")
    receipt = {
        "checkpoints.base.config": {
            "where": "checkpoints.base.config",
            "source": "file:configs/sdxl",
            "kind": "folder",
            "sha256": tree,
            "size": 0,
        }
    }
    config = Source(source="file:configs/sdxl")
    shutil.rmtree(folder)  # another machine: the folder is not there
    with pytest.raises(StageError) as err:
        materialize(catalog, config, "checkpoints.base.config", receipt=receipt, cache_dir=tmp_path / "cache")
    assert err.value.code == "SOURCE_MISSING"
    caplog.set_level(logging.WARNING, logger="fuseline.sources.archive")
    path = materialize(
        catalog,
        config,
        "checkpoints.base.config",
        receipt=receipt,
        is_config=True,
        cache_dir=tmp_path / "cache",
        archive=project_archive,
    )
    assert path == tmp_path / "cache" / "trees" / tree and tree_listing(path) == listing
    (event,) = archived_events(caplog)
    assert event["kind"] == "folder" and event["upstream_code"] == "NOT_FOUND"
