"""lock_catalog against the local Civitai look-alike and a local paths-info endpoint for hf."""

from __future__ import annotations

import hashlib
import json

import pytest

from fuseline.core.catalog.loading import load_catalog
from stages.sources.civitai import CivitaiClient
from stages.sources.download import RetryPolicy
from stages.sources.errors import SourceError
from stages.sources.lock import lock_catalog
from testkit.civitai import CivitaiServer, safetensors_bytes
from testkit.servers import RangeHTTPServer, Response

REV = "462165984030d82259a11f4367a4eed129e94a7b"
FAST = RetryPolicy(total_seconds=3, backoff_base=0.05)
CKPT = f"hf:org/sdxl/sd_xl.safetensors@{REV}"

# Hand-formatted on purpose: an inline LoRA object, a multi-line one, a blank line, odd spacing.
CATALOG = """{
  "version": 1,
  "vae": {"source": "hf:madebyollin/sdxl-vae-fp16-fix@207b116dae70ace3637169f1ddd2434b91b3a8cd"},

  "checkpoints": {
    "base": {
      "source": "%(ckpt)s",
      "prediction": "epsilon"
    }
  },
  "templates": {
    "cinematic": {
      "checkpoint": "base",
      "loras": [
        {"source": "civitai:101",   "scale": 0.8},
        {
          "source": "civitai:102",
          "sha256": null,
          "scale": 0.5
        },
        {"source": "civitai:103", "sha256": "%(pinned)s", "scale": 1.0}
      ]
    }
  }
}
"""


@pytest.fixture
def civitai(tmp_path, monkeypatch):
    with CivitaiServer(tmp_path / "civitai") as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        server.add_version(101, safetensors_bytes(1000, seed=1), name="a.safetensors", base_model="Pony")
        server.add_version(102, safetensors_bytes(1000, seed=2), name="b.safetensors")
        server.add_version(103, safetensors_bytes(1000, seed=3), name="c.safetensors", base_model="SD 1.5")
        yield server


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local endpoint answering huggingface_hub's paths-info call for the checkpoint file."""
    import huggingface_hub.constants

    # Tests run with HF_HUB_OFFLINE=1, which blocks every hub request; this endpoint is 127.0.0.1.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    ckpt_sha = hashlib.sha256(b"checkpoint").hexdigest()
    info = [{"type": "file", "oid": "0" * 40, "size": 10, "path": "sd_xl.safetensors",
             "lfs": {"oid": ckpt_sha, "size": 10, "pointerSize": 134}}]  # fmt: skip
    (tmp_path / "hub").mkdir()
    with RangeHTTPServer(tmp_path / "hub") as server:
        server.add_route(
            f"/api/models/org/sdxl/paths-info/{REV}",
            lambda req: Response(200, {"Content-Type": "application/json"}, json.dumps(info).encode()),
        )
        monkeypatch.setenv("HF_ENDPOINT", server.base_url)
        yield server, ckpt_sha


def _write(tmp_path, civitai, pinned=None):
    pinned = pinned or civitai.versions[103].sha256
    path = tmp_path / "templates.json"
    path.write_text(CATALOG % {"ckpt": CKPT, "pinned": pinned})
    return path


def _client():
    return CivitaiClient(policy=FAST)


def test_missing_hashes_are_filled_and_the_catalog_validates(tmp_path, civitai, hub):
    hub_server, ckpt_sha = hub
    path = _write(tmp_path, civitai)
    before = path.read_text()

    report = lock_catalog(path, civitai=_client())

    after = path.read_text()
    catalog = load_catalog(path)
    loras = catalog.templates["cinematic"].loras
    assert [lora.sha256 for lora in loras] == [civitai.versions[v].sha256 for v in (101, 102, 103)]
    assert catalog.checkpoints["base"].sha256 == ckpt_sha
    assert report.changed
    statuses = {e.path: (e.status, e.base_model) for e in report.entries}
    assert statuses == {
        "vae": ("skipped", None),
        "checkpoints.base": ("filled", None),
        "templates.cinematic.loras[0]": ("filled", "Pony"),
        "templates.cinematic.loras[1]": ("filled", "SDXL 1.0"),
        "templates.cinematic.loras[2]": ("locked", None),
    }
    # Surgical: the inline object stays inline, odd spacing and the blank line survive, nothing else moves.
    sha101, sha102 = civitai.versions[101].sha256, civitai.versions[102].sha256
    assert f'{{"source": "civitai:101", "sha256": "{sha101}",   "scale": 0.8}}' in after
    assert f'"sha256": "{sha102}",\n          "scale": 0.5' in after
    assert f'      "source": "{CKPT}",\n      "sha256": "{ckpt_sha}",\n      "prediction"' in after
    removed = [line for line in before.splitlines() if line not in after.splitlines()]
    assert removed == ['        {"source": "civitai:101",   "scale": 0.8},', '          "sha256": null,']
    assert len(hub_server.requests) == 1


def test_already_locked_catalog_is_byte_identical_and_costs_no_request(tmp_path, civitai, hub):
    hub_server, _ = hub
    path = _write(tmp_path, civitai)
    lock_catalog(path, civitai=_client())
    locked = path.read_bytes()
    stat = path.stat()
    civitai.clear_requests()
    hub_server.clear_requests()

    report = lock_catalog(path, civitai=_client())

    assert path.read_bytes() == locked and not report.changed
    assert path.stat().st_mtime_ns == stat.st_mtime_ns  # not even rewritten
    assert civitai.requests == [] and hub_server.requests == []


def test_verify_reports_a_wrong_pin_without_overwriting(tmp_path, civitai, hub):
    path = _write(tmp_path, civitai, pinned="f" * 64)
    report = lock_catalog(path, civitai=_client(), verify=True, dry_run=True)
    (mismatch,) = report.mismatches
    assert mismatch.path == "templates.cinematic.loras[2]" and "f" * 64 in mismatch.note
    assert "SD 1.5" in mismatch.note and mismatch.base_model == "SD 1.5"
    assert '"sha256": null' in path.read_text()  # dry run: nothing written
    assert "mismatch" in report.format()


def test_crlf_line_ends_are_kept(tmp_path, civitai, hub):
    path = tmp_path / "templates.json"
    path.write_bytes(
        (CATALOG % {"ckpt": CKPT, "pinned": civitai.versions[103].sha256}).replace("\n", "\r\n").encode()
    )
    lock_catalog(path, civitai=_client())
    data = path.read_bytes()
    assert data.count(b"\r\n") == data.count(b"\n") and load_catalog(path)


def test_unknown_civitai_version_fails_and_writes_nothing(tmp_path, civitai, hub):
    path = _write(tmp_path, civitai)
    path.write_text(path.read_text().replace("civitai:102", "civitai:999"))
    before = path.read_bytes()
    with pytest.raises(SourceError, match="NOT_FOUND"):
        lock_catalog(path, civitai=_client())
    assert path.read_bytes() == before
