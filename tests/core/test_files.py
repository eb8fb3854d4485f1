"""fuseline.core.files: atomic writes and folders, hashes, local locks."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from fuseline.core.files import atomic_create, atomic_dir, atomic_write, local_lock, md5_file, sha256_file


def test_atomic_dir_renames_into_place_on_success(tmp_path):
    final = tmp_path / "models" / "a"
    with atomic_dir(final) as tmp:
        (tmp / "w.safetensors").write_bytes(b"x")
        assert not final.exists()
    assert (final / "w.safetensors").read_bytes() == b"x"
    assert [p.name for p in final.parent.iterdir()] == ["a"]


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "models" / "a"
    final.mkdir(parents=True)
    (final / "old").write_text("stale")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half").write_text("partial")
        raise RuntimeError("boom")
    assert list(final.parent.iterdir()) == []


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path: Path):
    path = tmp_path / "sub" / "release.json"
    atomic_write(path, "first\r\n")  # text as given: no newline translation (catalog files keep CRLF)
    atomic_write(path, b"second", mode=0o640)
    assert path.read_bytes() == b"second"
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert [p.name for p in path.parent.iterdir()] == ["release.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path):
    path = tmp_path / "data.json"
    atomic_write(path, "old")
    with pytest.raises(TypeError):
        atomic_write(path, 42)  # type: ignore[arg-type]
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_atomic_create_never_replaces_and_leaves_no_temp(tmp_path: Path):
    target = tmp_path / "sub" / "release.json"
    assert atomic_create(target, b"first", mode=0o444) is True
    assert atomic_create(target, b"second", mode=0o444) is False
    assert target.read_bytes() == b"first" and oct(target.stat().st_mode & 0o777) == "0o444"
    assert sorted(p.name for p in target.parent.iterdir()) == ["release.json"]


def test_hashes_match_hashlib(tmp_path: Path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 * 2**20 + 7))
    data = path.read_bytes()
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert md5_file(path) == hashlib.md5(data).hexdigest()


def _hold(lock_path: str, marker: str, seconds: float) -> None:
    with local_lock(lock_path):
        Path(marker).write_text(str(time.monotonic()))
        time.sleep(seconds)


def test_local_lock_excludes_another_process(tmp_path: Path):
    lock, marker = tmp_path / "locks" / "x.lock", tmp_path / "held"
    holder = multiprocessing.get_context("spawn").Process(target=_hold, args=(str(lock), str(marker), 1.0))
    holder.start()
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    with local_lock(lock):
        waited = time.monotonic() - started
    holder.join()
    assert waited >= 0.5, waited  # it waited for the holder to let go
