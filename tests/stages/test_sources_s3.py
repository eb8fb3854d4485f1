"""s3:// sources against a real S3 server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import hashlib

import pytest

from stages.sources.cache import DownloadCache
from stages.sources.download import RetryPolicy
from stages.sources.errors import SourceError
from stages.sources.resolve import fetch, source_from_text
from testkit.civitai import safetensors_bytes

pytestmark = pytest.mark.s3
FAST = RetryPolicy(total_seconds=3, backoff_base=0.05, backoff_max=0.2)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")  # no stray profile credentials
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


def _put(s3_server, bucket: str, key: str, data: bytes) -> str:
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def test_s3_object_is_downloaded_and_verified(s3_env, s3_bucket, tmp_path):
    data = safetensors_bytes(2_000_000, seed=5)
    sha = hashlib.sha256(data).hexdigest()
    url = _put(s3_env, s3_bucket, "loras/style-v1+x.safetensors", data)
    cache = DownloadCache(tmp_path / "cache")

    path = fetch(source_from_text(url, sha256=sha), cache=cache, policy=FAST)

    assert path == cache.path_for(sha) and path.read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == [sha, f"{sha}.json"]
    sidecar = cache.sidecar_for(sha).read_text()
    assert url in sidecar and s3_env.secret_key not in sidecar and s3_env.access_key not in sidecar


def test_s3_wrong_sha256_fails_and_leaves_nothing(s3_env, s3_bucket, tmp_path):
    url = _put(s3_env, s3_bucket, "a.safetensors", safetensors_bytes(100_000, seed=6))
    cache = DownloadCache(tmp_path / "cache")
    with pytest.raises(SourceError) as info:
        fetch(source_from_text(url, sha256="e" * 64), cache=cache, policy=FAST)
    assert info.value.code == "SHA256_MISMATCH"
    # Nothing downloaded is left; the empty lock file of that hash (cache/locks/) may stay.
    left = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert [p.relative_to(tmp_path / "cache").parts[0] for p in left] in ([], ["locks"])
    assert all(p.stat().st_size == 0 for p in left)
    assert "X-Amz-Signature=***" in str(info.value) or "X-Amz-Signature" not in str(info.value)


def test_s3_without_credentials_names_the_variables(s3_env, s3_bucket, tmp_path, monkeypatch):
    url = _put(s3_env, s3_bucket, "b.safetensors", safetensors_bytes(10_000, seed=7))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(SourceError) as info:
        fetch(source_from_text(url, sha256="e" * 64), cache=DownloadCache(tmp_path / "c"), policy=FAST)
    assert info.value.code in ("FORBIDDEN", "AUTH_REQUIRED")
    assert "AWS_ACCESS_KEY_ID" in str(info.value) and "AWS_ENDPOINT_URL" in str(info.value)


def test_s3_missing_object_is_not_found(s3_env, s3_bucket, tmp_path):
    source = source_from_text(f"s3://{s3_bucket}/nope.safetensors", sha256="e" * 64)
    with pytest.raises(SourceError) as info:
        fetch(source, cache=DownloadCache(tmp_path / "c"), policy=FAST)
    assert info.value.code == "NOT_FOUND"
