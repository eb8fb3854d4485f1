"""`fuseline lock` end to end against the local Civitai look-alike: pins filled, the result validates,
mismatches and errors exit 1, the API key never reaches the output."""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fuseline.cli import app
from fuseline.core.catalog.loading import load_catalog
from testkit.civitai import CivitaiServer, safetensors_bytes

runner = CliRunner()


@pytest.fixture
def civitai(tmp_path, monkeypatch):
    with CivitaiServer(tmp_path / "civitai", api_key="civ-" + secrets.token_hex(20)) as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        # Fail fast if anything goes wrong: no minutes of backoff in a test.
        monkeypatch.setenv("FUSELINE_DOWNLOAD_RETRY_SECONDS", "2")
        server.add_version(201, safetensors_bytes(2000, seed=1), name="style.safetensors")
        server.add_version(202, safetensors_bytes(2000, seed=2), name="detail.safetensors")
        yield server


def write_catalog(tmp_path: Path, loras: list[dict]) -> Path:
    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(safetensors_bytes(1000, seed=9))
    (tmp_path / "vae.safetensors").write_bytes(safetensors_bytes(1000, seed=8))
    catalog = {
        "version": 1,
        "vae": {"source": "file:vae.safetensors"},
        "checkpoints": {"base": {"source": "file:base.safetensors"}},
        "templates": {
            "one": {"checkpoint": "base", "loras": loras},
            "two": {"checkpoint": "base", "loras": [{"source": "civitai:201", "scale": 0.5}]},
        },
    }
    path = tmp_path / "templates.json"
    path.write_text(json.dumps(catalog, indent=2) + "\n")
    return path


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_lock_fills_missing_pins_and_the_result_validates(civitai, tmp_path):
    path = write_catalog(tmp_path, [{"source": "civitai:201", "scale": 1.0}, {"source": "civitai:202"}])
    before = load_catalog(path)
    assert all(lora.sha256 is None for t in before.templates.values() for lora in t.loras)

    code, out = invoke("lock", str(path))
    assert code == 0, out
    assert "updated" in out and out.count("filled") == 3, out
    assert civitai.api_key not in out
    after = load_catalog(path)
    pins = {lora.source: lora.sha256 for t in after.templates.values() for lora in t.loras}
    assert pins == {"civitai:201": civitai.versions[201].sha256, "civitai:202": civitai.versions[202].sha256}
    # The pins are the served bytes' real hashes, not just whatever the metadata said.
    served = civitai.root / "storage" / civitai.versions[202].storage_path.lstrip("/")
    assert hashlib.sha256(served.read_bytes()).hexdigest() == pins["civitai:202"]
    code, out = invoke("validate", str(path))
    assert code == 0 and "valid" in out, out

    # Locking a locked catalog changes nothing and asks the server nothing.
    civitai.clear_requests()
    text = path.read_text()
    code, out = invoke("lock", str(path))
    assert code == 0 and "unchanged" in out, out
    assert path.read_text() == text and civitai.requests == []


def test_dry_run_writes_nothing(civitai, tmp_path):
    path = write_catalog(tmp_path, [{"source": "civitai:202"}])
    text = path.read_text()
    code, out = invoke("lock", str(path), "--dry-run")
    assert code == 0 and "filled" in out, out
    assert path.read_text() == text
    # Issue 16: it said "updated" although nothing was written.
    assert f"{path}: would be updated (dry run: nothing written)" in out and "updated\n" not in out


def test_a_wrong_pin_exits_1_with_verify_and_is_not_overwritten(civitai, tmp_path):
    path = write_catalog(tmp_path, [{"source": "civitai:202", "sha256": "ab" * 32}])
    code, out = invoke("lock", str(path))
    assert code == 0, out  # without --verify an existing pin is trusted: no request for it
    code, out = invoke("lock", str(path), "--verify")
    assert code == 1, out
    assert "mismatch" in out and "templates.one.loras[0]" in out, out
    assert load_catalog(path).templates["one"].loras[0].sha256 == "ab" * 32


def test_an_unknown_version_exits_1_naming_the_source(civitai, tmp_path):
    path = write_catalog(tmp_path, [{"source": "civitai:999"}])
    text = path.read_text()
    code, out = invoke("lock", str(path))
    assert code == 1, out
    assert "civitai:999" in out and "lock failed" in out, out
    assert civitai.api_key not in out
    assert path.read_text() == text


def test_a_missing_catalog_exits_1(tmp_path):
    code, out = invoke("lock", str(tmp_path / "nope.json"))
    assert code == 1 and "nope.json" in out


def test_a_bad_download_setting_is_config_invalid(civitai, tmp_path, monkeypatch):
    path = write_catalog(tmp_path, [{"source": "civitai:201", "scale": 1.0}])
    monkeypatch.setenv("FUSELINE_DOWNLOAD_ATTEMPTS", "many")
    code, out = invoke("lock", str(path))
    assert code == 1 and "lock failed: [CONFIG_INVALID]" in out, out
    assert "FUSELINE_DOWNLOAD_ATTEMPTS='many' is not an integer" in out and "Traceback" not in out
