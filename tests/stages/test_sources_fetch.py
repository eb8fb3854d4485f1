"""stages.fetch: one catalog source in, a verified local path out (library call and `python -m`)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fuseline.core.catalog.loading import load_catalog
from fuseline.core.catalog.sources import parse_source
from stages.errors import StageError
from stages.fetch import fetch_source, place
from stages.sources.cache import DownloadCache
from stages.sources.download import RetryPolicy, download
from stages.sources.resolve import _fetch_remote
from testkit.civitai import CivitaiServer, safetensors_bytes
from testkit.servers import Response

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A catalog with a local checkpoint file and a Civitai LoRA served by the look-alike."""
    with CivitaiServer(tmp_path / "civitai") as civ:
        for key, value in civ.env().items():
            monkeypatch.setenv(key, value)
        lora = civ.add_version(555, safetensors_bytes(300_000, seed=5), name="lora.safetensors")
        ckpt = safetensors_bytes(100_000, seed=9)
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "base.safetensors").write_bytes(ckpt)
        (tmp_path / "models" / "vae.safetensors").write_bytes(safetensors_bytes(2_000, seed=8))
        catalog = {
            "version": 1,
            "vae": {"source": "file:models/vae.safetensors"},
            "checkpoints": {
                "base": {"source": "file:models/base.safetensors", "sha256": hashlib.sha256(ckpt).hexdigest()}
            },
            "templates": {
                "t1": {"checkpoint": "base", "loras": [{"source": "civitai:555", "sha256": lora.sha256}]}
            },
        }
        (tmp_path / "templates.json").write_text(json.dumps(catalog, indent=2))
        yield tmp_path, civ, lora


def test_fetch_source_by_catalog_path_and_by_source(project):
    root, civ, lora = project
    catalog = load_catalog(root / "templates.json")
    path = fetch_source(catalog, "templates.t1.loras[0]", root / "cache")
    assert path.name == lora.sha256 and hashlib.sha256(path.read_bytes()).hexdigest() == lora.sha256
    civ.clear_requests()
    assert fetch_source(catalog, "civitai:555", root / "cache") == path
    assert civ.requests == []
    ckpt = fetch_source(catalog, "checkpoints.base", root / "cache")
    assert ckpt == (root / "models" / "base.safetensors").resolve()


def test_unknown_spec_lists_known_paths(project):
    root, _, _ = project
    with pytest.raises(StageError) as info:
        fetch_source(load_catalog(root / "templates.json"), "civitai:1", root / "cache")
    assert info.value.code == "SOURCE_NOT_IN_CATALOG" and "templates.t1.loras[0]" in str(info.value)


def test_local_file_with_a_wrong_pin_fails(project):
    root, _, _ = project
    (root / "models" / "base.safetensors").write_bytes(safetensors_bytes(1000, seed=99))
    with pytest.raises(StageError, match="SHA256_MISMATCH"):
        fetch_source(load_catalog(root / "templates.json"), "checkpoints.base", root / "cache")


def test_place_links_a_file_without_copying(tmp_path):
    src = tmp_path / "a"
    src.write_bytes(b"x" * 10)
    out = tmp_path / "deps" / "a.safetensors"
    place(src, out)
    place(src, out)  # idempotent
    assert out.read_bytes() == b"x" * 10 and out.stat().st_ino == src.stat().st_ino


def test_module_entry_point(project):
    root, civ, lora = project
    env = {**os.environ, "PYTHONPATH": str(REPO), "FUSELINE_CACHE_DIR": str(root / "cache")}
    run = subprocess.run(
        [sys.executable, "-m", "stages.fetch", "templates.t1.loras[0]", "--out", "deps/lora.safetensors"],
        cwd=root, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()).name == lora.sha256
    assert (root / "deps" / "lora.safetensors").read_bytes() == (Path(run.stdout.strip())).read_bytes()
    assert civ.api_key not in run.stderr + run.stdout

    bad = subprocess.run(
        [sys.executable, "-m", "stages.fetch", "civitai:1"],
        cwd=root, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1 and "SOURCE_NOT_IN_CATALOG" in bad.stderr


def test_concurrent_fetches_of_one_unpinned_source_take_turns(tmp_path, http_server):
    (tmp_path / "www").mkdir()
    srv = http_server(tmp_path / "www")
    data = safetensors_bytes(200_000, seed=3)
    active, peak, lock = [0], [0], threading.Lock()

    def slow(req):  # long enough that two unlocked downloads overlap on the same .part file
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.4)
        with lock:
            active[0] -= 1
        return Response(200, {"Content-Type": "application/octet-stream"}, data)

    srv.add_route("/lora/", slow)
    parsed = parse_source("https://models.example/lora/x.safetensors")  # the incoming/ name comes from it
    cache = DownloadCache(tmp_path / "cache")
    policy = RetryPolicy(total_seconds=10, backoff_base=0.05, connect_timeout=2, read_timeout=5)

    def get(dest, pin):  # the real downloader, against the plain-http test server
        return download(srv.url("lora/x.safetensors"), dest, sha256=pin, policy=policy)

    paths, errors = [], []

    def run():
        try:
            paths.append(_fetch_remote(parsed, None, False, cache, get))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(paths) == 2
    assert peak[0] == 1 and len(srv.requests) == 2
    assert paths[0] == paths[1] and paths[0].read_bytes() == data


@pytest.mark.parametrize(
    ("variable", "value"),
    [("FUSELINE_DOWNLOAD_RETRY_SECONDS", "soon"), ("FUSELINE_DOWNLOAD_ATTEMPTS", "0")],
)
def test_a_bad_build_setting_stops_the_stage_with_config_invalid(tmp_path, variable, value):
    # A stage parses its FUSELINE_* settings once, at start: a bad one is CONFIG_INVALID naming it, never a
    # ValueError traceback in the middle of a download (as FUSELINE_DOWNLOAD_RETRY_SECONDS=soon was).
    env = {**os.environ, "PYTHONPATH": str(REPO), variable: value}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.fetch", "--receipt", "vae", "--receipt-out", "r.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "[CONFIG_INVALID]" in proc.stderr and variable in proc.stderr and "Traceback" not in proc.stderr
