"""Fuzz: a release manifest, read by the worker's sync (RELEASE_INVALID) and by publishing (BAD_RELEASE),
is a Release or the reader's coded error, never anything else, whatever the bytes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given

from fuseline.core.release import Release
from fuseline.publish.releases import load_release
from fuseline.remote.stores import LocalStore
from tests.fixtures.fuzz import coded_or_value, hostile_documents, json_bytes, raw_bytes
from worker.sync.remote import LocalRemote, read_release

pytestmark = pytest.mark.fuzz

TEMPLATE = {
    "dir_md5": "0" * 32 + ".dir",
    "path": "artifacts/models/one",
    "size": 10,
    "nfiles": 2,
    "spec_hash": "s" * 64,
    "checkpoint": "civitai:1",
    "loras": [{"source": "civitai:2", "sha256": "a" * 64, "scale": 0.8}],
    "prediction_type": "epsilon",
}
BASE = {
    "format": 1,
    "channel": "main",
    "created": "20261127T211500Z",
    "git_commit": None,
    "templates": {"one": TEMPLATE},
}
PLACES: list[tuple[object, ...]] = [
    *((key,) for key in BASE),
    ("templates", "one"),
    *(("templates", "one", key) for key in TEMPLATE),
    ("templates", "one", "loras", 0),
    ("templates", "one", "loras", 0, "scale"),
    ("templates", "one", "loras", 0, "sha256"),
]


def read_both(raw: bytes, folder) -> None:
    (folder / "releases").mkdir(parents=True, exist_ok=True)
    (folder / "releases" / "main.json").write_bytes(raw)
    synced = coded_or_value(lambda: read_release(LocalRemote(folder), "releases/main.json"))
    published = coded_or_value(lambda: load_release(LocalStore(folder), "releases/main.json", raw))
    assert isinstance(synced, Release) == isinstance(published, Release)  # one format, one answer
    if isinstance(synced, Release):
        assert synced.format == 1 and all(t.dir_md5.endswith(".dir") for t in synced.templates.values())
    else:
        assert (synced.code, published.code) == ("RELEASE_INVALID", "BAD_RELEASE")


@given(raw=raw_bytes)
def test_any_bytes(tmp_path_factory, raw: bytes) -> None:
    read_both(raw, tmp_path_factory.getbasetemp() / "fuzz-release")


@given(release=hostile_documents(BASE, PLACES))
def test_a_release_with_hostile_fields(tmp_path_factory, release: dict) -> None:
    read_both(json_bytes(release), tmp_path_factory.getbasetemp() / "fuzz-release")


def test_the_strategies_start_from_a_valid_release() -> None:
    assert Release.from_json(json.dumps(BASE)).templates["one"].size == 10
