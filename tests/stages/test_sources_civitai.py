"""civitai: sources end to end against the local Civitai look-alike (API host + storage host)."""

from __future__ import annotations

import logging
import traceback

import pytest

from stages.sources.cache import DownloadCache
from stages.sources.civitai import CivitaiClient, check_base_model, fetch_civitai
from stages.sources.download import RetryPolicy
from stages.sources.errors import SourceError
from testkit.civitai import CivitaiServer, safetensors_bytes

FAST = RetryPolicy(total_seconds=5, backoff_base=0.05, backoff_max=0.2, connect_timeout=2, read_timeout=5)


@pytest.fixture
def civitai(tmp_path, monkeypatch):
    with CivitaiServer(tmp_path / "civitai") as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        yield server


def _fetch(civ: CivitaiServer, version_id: int, cache: DownloadCache, **kwargs):
    kwargs.setdefault("sha256", civ.versions[version_id].sha256 if version_id in civ.versions else None)
    kwargs.setdefault("allow_pickle", False)
    return fetch_civitai(str(version_id), cache=cache, client=CivitaiClient(policy=FAST), **kwargs)


def test_download_follows_the_redirect_without_sending_the_key_to_storage(civitai, tmp_path):
    data = safetensors_bytes(500_000, seed=3)
    version = civitai.add_version(4242, data, name="style.safetensors")
    path = _fetch(civitai, 4242, DownloadCache(tmp_path / "cache"))

    assert path.read_bytes() == data
    assert path == tmp_path / "cache" / "sha256" / version.sha256[:2] / version.sha256
    api_reqs, storage_reqs = civitai.api.requests, civitai.storage.requests
    downloads = [r for r in api_reqs if r.path.startswith("/api/download/models/4242")]
    assert len(downloads) == 1 and downloads[0].status == 307
    assert downloads[0].authorization == f"Bearer {civitai.api_key}"
    assert len(storage_reqs) == 1 and storage_reqs[0].status == 200
    # The storage server is another host (localhost vs 127.0.0.1): no Authorization may reach it.
    assert storage_reqs[0].authorization is None
    assert storage_reqs[0].headers["host"].startswith("localhost:")


def test_same_lora_twice_is_downloaded_once(civitai, tmp_path):
    civitai.add_version(7, safetensors_bytes(200_000, seed=7), name="a.safetensors")
    cache = DownloadCache(tmp_path / "cache")
    first = _fetch(civitai, 7, cache)
    civitai.clear_requests()
    second = _fetch(civitai, 7, cache)
    assert second == first
    assert civitai.requests == []  # a cached pin costs no request at all
    sidecar = cache.sidecar_for(civitai.versions[7].sha256).read_text()
    assert '"source": "civitai:7"' in sidecar and civitai.api_key not in sidecar


def test_missing_key_names_civitai_api_key(civitai, tmp_path, monkeypatch):
    monkeypatch.delenv("CIVITAI_API_KEY")
    civitai.add_version(8, safetensors_bytes(10_000), name="a.safetensors")
    with pytest.raises(SourceError) as info:
        _fetch(civitai, 8, DownloadCache(tmp_path / "cache"))
    assert info.value.code == "AUTH_REQUIRED"
    assert "CIVITAI_API_KEY" in str(info.value) and "logged in" in str(info.value)
    assert civitai.storage.requests == []


def test_login_wall_page_is_rejected(civitai, tmp_path, monkeypatch):
    monkeypatch.setenv("CIVITAI_API_KEY", "wrong-key-0123456789")
    civitai.add_version(9, safetensors_bytes(10_000), name="a.safetensors", login_wall=True)
    cache = DownloadCache(tmp_path / "cache")
    with pytest.raises(SourceError) as info:
        _fetch(civitai, 9, cache)
    assert info.value.code == "NOT_A_MODEL_FILE" and "CIVITAI_API_KEY" in str(info.value)
    assert not list((tmp_path / "cache" / "sha256").rglob("*"))[1:]  # at most the empty shard folder


def test_sd15_lora_is_refused_before_downloading(civitai, tmp_path):
    civitai.add_version(10, safetensors_bytes(10_000), name="a.safetensors", base_model="SD 1.5")
    with pytest.raises(SourceError) as info:
        _fetch(civitai, 10, DownloadCache(tmp_path / "cache"))
    assert info.value.code == "BASE_MODEL_MISMATCH"
    assert "'SD 1.5'" in str(info.value) and "sd1 model" in str(info.value)
    assert not [r for r in civitai.api.requests if r.path.startswith("/api/download")]
    assert civitai.storage.requests == []


@pytest.mark.parametrize("base", ["SDXL 1.0", "Pony", "Illustrious", "NoobAI", "SDXL Lightning"])
def test_sdxl_family_base_models_pass(base):
    check_base_model(base, source="civitai:1")


@pytest.mark.parametrize("base", ["SD 1.5", "Pony V7", "Flux.1 D", "Other", None])
def test_other_base_models_are_refused(base):
    with pytest.raises(SourceError, match="BASE_MODEL_MISMATCH"):
        check_base_model(base, source="civitai:1")


def test_pickle_tensor_is_refused_unless_allowed(civitai, tmp_path):
    import pickle

    payload = pickle.dumps({"weights": list(range(100))}, protocol=4)
    civitai.add_version(11, payload, name="old.ckpt")
    cache = DownloadCache(tmp_path / "cache")
    with pytest.raises(SourceError) as info:
        _fetch(civitai, 11, cache)
    assert info.value.code == "PICKLE_REFUSED" and "allow_pickle" in str(info.value)
    assert civitai.storage.requests == []
    assert _fetch(civitai, 11, cache, allow_pickle=True).read_bytes() == payload


def test_renamed_pickle_is_caught_by_sniffing(civitai, tmp_path):
    import pickle

    # Civitai says SafeTensor, the bytes say pickle: the bytes win.
    civitai.add_version(
        12, pickle.dumps([1, 2, 3], protocol=4), name="x.safetensors", file_format="SafeTensor"
    )
    with pytest.raises(SourceError, match="PICKLE_REFUSED"):
        _fetch(civitai, 12, DownloadCache(tmp_path / "cache"))


def test_pin_that_disagrees_with_civitai_fails_before_downloading(civitai, tmp_path):
    civitai.add_version(13, safetensors_bytes(10_000), name="a.safetensors")
    with pytest.raises(SourceError) as info:
        _fetch(civitai, 13, DownloadCache(tmp_path / "cache"), sha256="ab" * 32)
    assert info.value.code == "SHA256_PIN_MISMATCH" and civitai.storage.requests == []


def test_unknown_version_is_a_clear_404(civitai, tmp_path):
    with pytest.raises(SourceError) as info:
        _fetch(civitai, 999, DownloadCache(tmp_path / "cache"), sha256=None)
    assert info.value.code == "NOT_FOUND" and "modelVersionId" in str(info.value)


def test_hostile_file_name_never_chooses_the_path(civitai, tmp_path):
    version = civitai.add_version(14, safetensors_bytes(10_000), name="../../../../etc/evil.safetensors")
    path = _fetch(civitai, 14, DownloadCache(tmp_path / "cache"))
    assert path.name == version.sha256 and path.is_relative_to(tmp_path / "cache")
    assert not (tmp_path / "etc").exists()


def test_metadata_maps_the_api_shape(civitai):
    civitai.add_version(15, safetensors_bytes(10_000), name="a.safetensors", base_model="Pony")
    meta = CivitaiClient(policy=FAST).model_version(15)
    primary = meta.primary_file()
    assert meta.base_model == "Pony" and meta.model_type == "LORA"
    assert primary.sha256 == civitai.versions[15].sha256  # API uppercase, ours lowercase
    assert primary.format == "SafeTensor" and primary.name == "a.safetensors"


def test_metadata_429_is_retried(civitai):
    civitai.add_version(16, safetensors_bytes(10_000), name="a.safetensors")
    civitai.api.fail_next(429, headers={"Retry-After": "0"})
    assert CivitaiClient(policy=FAST).model_version(16).id == 16
    assert [r.status for r in civitai.api.requests] == [429, 200]


def test_the_key_never_appears_in_logs_or_exceptions(civitai, tmp_path, caplog, monkeypatch):
    """Drive every failure path with the key set, then grep everything we produced for it."""
    key = civitai.api_key
    texts: list[str] = []
    civitai.add_version(20, safetensors_bytes(1_000_000, seed=20), name="a.safetensors")
    civitai.add_version(21, safetensors_bytes(10_000, seed=21), name="b.safetensors", base_model="SD 1.5")
    cache = DownloadCache(tmp_path / "cache")
    with caplog.at_level(logging.DEBUG):
        civitai.storage.cut_next(600_000)  # a resume, logged
        civitai.storage.fail_next(500, times=1)  # a retry, logged
        _fetch(civitai, 20, cache)
        for version_id, kwargs in ((21, {}), (20, {"sha256": "cd" * 32})):
            with pytest.raises(SourceError) as info:
                _fetch(civitai, version_id, DownloadCache(tmp_path / "c2"), **kwargs)
            texts += [str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))]
        # A server that echoes the request (URL with ?token=, Authorization header) in its error page.
        echo = f"Authorization: Bearer {key} for /api/download/models/22?token={key}".encode()
        civitai.api.fail_next(500, times=50, body=echo, path_prefix="/api/download")
        civitai.add_version(22, safetensors_bytes(10_000, seed=22), name="c.safetensors")
        with pytest.raises(SourceError) as info:
            fetch_civitai(
                "22", sha256=None, allow_pickle=False, cache=DownloadCache(tmp_path / "c3"),
                client=CivitaiClient(policy=RetryPolicy(total_seconds=0.3, backoff_base=0.05)),
            )  # fmt: skip
        texts += [str(info.value), "".join(traceback.format_exception(info.value))]
    texts += [r.getMessage() for r in caplog.records]
    texts += [p.read_text(errors="replace") for p in (tmp_path / "cache").rglob("*.json")]
    assert any("HTTP 500" in t for t in texts) and any("resuming" in t for t in texts)
    leaks = [t for t in texts if key in t]
    assert leaks == []


def test_concurrent_fetches_of_one_lora_download_it_once(civitai, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    civitai.add_version(30, safetensors_bytes(2_000_000, seed=30), name="a.safetensors")
    # Separate DownloadCache objects on one folder, as two DVC stages in two processes would have.
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: _fetch(civitai, 30, DownloadCache(tmp_path / "cache")), range(3)))
    assert len(set(paths)) == 1
    assert len([r for r in civitai.storage.requests if r.status == 200]) == 1
