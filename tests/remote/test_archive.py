"""The source archive's layout and transfers, on a local remote folder and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fuseline.remote.archive import SourceArchive, file_key, index_key, tree_key, tree_listing, tree_sha256
from fuseline.remote.errors import RemoteError
from fuseline.remote.stores import LocalStore, ObjectStore, RemoteConfig, S3Store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path, monkeypatch) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "remote")
    s3_server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return S3Store(RemoteConfig(name="s3", url=f"s3://{bucket}/team/models"))


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_files_are_stored_once_by_sha256_and_verified_on_the_way_back(store: ObjectStore, tmp_path: Path):
    archive = SourceArchive(store)
    data = b"lora bytes " * 1000
    sha = hashlib.sha256(data).hexdigest()
    source = write(tmp_path / "lora.safetensors", data)
    assert archive.put_file(sha, source) is True
    assert archive.put_file(sha, source) is False  # already there: not sent again
    assert store.exists(f"sources/sha256/{sha[:2]}/{sha}") and file_key(sha).endswith(sha)

    back = tmp_path / "back" / "copy"
    back.parent.mkdir()
    archive.get_file(sha, back)
    assert back.read_bytes() == data and sorted(p.name for p in back.parent.iterdir()) == ["copy"]

    # A file whose bytes are not what its name says never enters, and a damaged copy never leaves.
    with pytest.raises(RemoteError) as err:
        archive.put_file("0" * 64, source)
    assert err.value.code == "SOURCE_CHANGED"
    store.upload(file_key("1" * 64), source)  # damage: other bytes under a hash's name
    with pytest.raises(RemoteError) as err:
        archive.get_file("1" * 64, tmp_path / "damaged")
    assert err.value.code == "ARCHIVE_CORRUPT" and not (tmp_path / "damaged").exists()
    with pytest.raises(RemoteError) as err:
        archive.get_file("2" * 64, tmp_path / "absent")
    assert err.value.code == "ARCHIVE_MISSING" and not (tmp_path / "absent").exists()


def test_folders_are_a_listing_over_stored_files(store: ObjectStore, tmp_path: Path):
    archive = SourceArchive(store)
    folder = tmp_path / "config"
    write(folder / "model_index.json", b"{}")
    write(folder / "unet" / "config.json", b'{"a": 1}')
    write(folder / "text_encoder" / "config.json", b'{"a": 1}')  # same bytes: one stored file
    listing = tree_listing(folder)
    tree = tree_sha256(listing)
    assert [e["relpath"] for e in listing] == [
        "model_index.json",
        "text_encoder/config.json",
        "unet/config.json",
    ]
    uploaded = archive.put_tree(tree, folder)
    assert len({e["sha256"] for e in uploaded}) == 2 and archive.has_tree(tree)
    assert archive.get_tree(tree) == listing
    assert archive.put_tree(tree, folder) == []  # its files are there: only the listing is rewritten
    # A listing that is not the folder its name says, or that points outside, is refused.
    store.write(tree_key("3" * 64), json.dumps(listing).encode())
    evil = [dict(listing[0], relpath="../../evil")]
    store.write(tree_key(tree_sha256(evil)), json.dumps(evil).encode())
    for bad in ("3" * 64, tree_sha256(evil)):
        with pytest.raises(RemoteError) as err:
            archive.get_tree(bad)
        assert err.value.code == "ARCHIVE_CORRUPT"
    write(folder / "extra.txt", b"new")
    with pytest.raises(RemoteError) as err:
        archive.put_tree(tree, folder)  # the folder changed since its hash was taken
    assert err.value.code == "SOURCE_CHANGED"


def test_the_index_finds_a_source_by_its_string(store: ObjectStore):
    archive = SourceArchive(store)
    assert archive.lookup("civitai:401") is None
    archive.put_index("civitai:401", "file", "A" * 64)
    assert archive.lookup("civitai:401") == ("file", "a" * 64)
    assert store.exists(index_key("civitai:401"))
    store.write(index_key("civitai:402"), json.dumps({"source": "civitai:401", "kind": "file"}).encode())
    with pytest.raises(RemoteError) as err:
        archive.lookup("civitai:402")
    assert err.value.code == "ARCHIVE_CORRUPT"


def test_local_archive_files_are_read_only_for_everyone(tmp_path: Path):
    store = LocalStore(tmp_path / "remote")
    data = b"x" * 10
    sha = hashlib.sha256(data).hexdigest()
    SourceArchive(store).put_file(sha, write(tmp_path / "x", data))
    assert oct((tmp_path / "remote" / file_key(sha)).stat().st_mode & 0o777) == "0o444"
