"""hf: sources. The hub is out of reach in tests, so this covers the argument mapping, the offline
cache path (a real huggingface_hub cache layout, read by huggingface_hub itself with HF_HUB_OFFLINE=1)
and our checks on top. Untested here: real downloads from the hub (online hf_hub_download /
snapshot_download, xet transfers), gated-repo and 404 error mapping against the real hub."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest

from fuseline.core.catalog.sources import parse_source
from stages.sources.cache import DownloadCache
from stages.sources.errors import SourceError
from stages.sources.hf import CONFIG_FOLDER_PATTERNS, fetch_hf, hf_download_kwargs
from stages.sources.resolve import fetch, source_from_text
from testkit.civitai import safetensors_bytes

REV = "462165984030d82259a11f4367a4eed129e94a7b"


def _seed_hf_cache(cache_root: Path, repo: str, files: dict[str, bytes], revision: str = REV) -> None:
    """Write files the way huggingface_hub caches them: blobs by hash, snapshot symlinks, a ref."""
    repo_dir = cache_root / "hf" / ("models--" + repo.replace("/", "--"))
    for rel, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / revision / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)


def test_argument_mapping(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    file_kwargs = hf_download_kwargs(parse_source(f"hf:org/repo/unet/model.safetensors@{REV}"), tmp_path)
    assert file_kwargs == {
        "repo_id": "org/repo",
        "filename": "unet/model.safetensors",
        "revision": REV,
        "cache_dir": str(tmp_path / "hf"),
        "token": "hf_" + "x" * 30,
        "endpoint": "http://127.0.0.1:9",
    }
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HF_ENDPOINT")
    folder = hf_download_kwargs(parse_source(f"hf:org/repo@{REV}"), tmp_path, allow_patterns=("*.json",))
    ignored = folder.pop("ignore_patterns")
    assert folder == {"repo_id": "org/repo", "revision": REV, "cache_dir": str(tmp_path / "hf"),
                      "allow_patterns": ["*.json"]}  # fmt: skip
    # A folder snapshot skips pickles and other frameworks' weights unless pickles are allowed.
    assert {"*.bin", "*.ckpt", "*.msgpack", "*.onnx"} <= set(ignored)
    trusted = hf_download_kwargs(parse_source(f"hf:org/repo@{REV}"), tmp_path, allow_pickle=True)
    assert "*.bin" not in trusted["ignore_patterns"] and "allow_patterns" not in trusted


def test_cached_file_is_found_offline_and_verified(tmp_path):
    data = safetensors_bytes(50_000, seed=1)
    _seed_hf_cache(tmp_path, "org/vae", {"vae/diffusion_pytorch_model.safetensors": data})
    source = source_from_text(
        f"hf:org/vae/vae/diffusion_pytorch_model.safetensors@{REV}", sha256=hashlib.sha256(data).hexdigest()
    )
    path = fetch(source, cache=DownloadCache(tmp_path))
    assert path.read_bytes() == data
    assert REV in str(path) and path.is_relative_to(tmp_path / "hf")


def test_cached_file_with_wrong_pin_fails(tmp_path):
    _seed_hf_cache(tmp_path, "org/vae", {"m.safetensors": safetensors_bytes(1000)})
    with pytest.raises(SourceError) as info:
        fetch(
            source_from_text(f"hf:org/vae/m.safetensors@{REV}", sha256="a" * 64),
            cache=DownloadCache(tmp_path),
        )
    assert info.value.code == "SHA256_MISMATCH" and "a" * 64 in str(info.value)


def test_pickle_behind_a_safetensors_name_is_refused(tmp_path):
    _seed_hf_cache(tmp_path, "org/bad", {"m.safetensors": pickle.dumps({"a": 1}, protocol=4)})
    with pytest.raises(SourceError, match="PICKLE_REFUSED"):
        fetch_hf(parse_source(f"hf:org/bad/m.safetensors@{REV}"), cache_dir=tmp_path)


def test_cached_config_folder_offline(tmp_path):
    files = {"model_index.json": b"{}", "unet/config.json": b"{}", "tokenizer/vocab.json": b"{}"}
    _seed_hf_cache(tmp_path, "org/sdxl", files)
    path = fetch_hf(
        parse_source(f"hf:org/sdxl@{REV}"), cache_dir=tmp_path, allow_patterns=CONFIG_FOLDER_PATTERNS
    )
    assert (path / "unet" / "config.json").is_file() and (path / "model_index.json").is_file()


def test_not_cached_while_offline_says_so(tmp_path):
    with pytest.raises(SourceError) as info:
        fetch_hf(parse_source(f"hf:org/absent/m.safetensors@{REV}"), cache_dir=tmp_path)
    assert info.value.code == "NOT_CACHED" and "HF_HUB_OFFLINE" in str(info.value)
