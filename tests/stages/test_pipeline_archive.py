"""Sources that survive their upstream, end to end with the real `dvc` and `fuseline` commands: build once
against the local Civitai look-alike, publish (which archives every source), lose the files upstream (the
LoRA deleted, the checkpoint replaced by other bytes), then build again in a fresh clone with an empty
download cache: the same model bit for bit, each lost source logged as `source.archived`. Once with the
project's local remote, once with SeaweedFS S3."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit.civitai import CivitaiServer
from testkit.project import VENV_BIN, DvcProject, make_dvc_project
from testkit.servers import SeaweedS3

TARGET = "merge@alpha"
MODEL = Path("artifacts/models/alpha")


@dataclass
class Built:
    """The first build: its project, the servers, and both remotes it published to."""

    project: DvcProject
    civitai: CivitaiServer
    catalog: dict
    local_remote: Path
    s3_url: str
    s3: SeaweedS3
    root: Path


def remotes_config(local: Path, s3_url: str, s3: SeaweedS3, default: str) -> str:
    """The .dvc/config a clone of the project has (what `dvc remote add` writes; secrets stay in the env)."""
    return (
        f"[core]\n    no_scm = True\n    remote = {default}\n    analytics = false\n"
        f"['remote \"local\"']\n    url = {local}\n"
        f"['remote \"s3\"']\n    url = {s3_url}\n    endpointurl = {s3.endpoint_url}\n"
    )


def fuseline(project: DvcProject, *args: str) -> str:
    done = subprocess.run(
        [str(VENV_BIN / "fuseline"), *args, "--project", str(project.root)],
        env=project.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def built(kit, s3_server: SeaweedS3, tmp_path_factory) -> Iterator[Built]:
    root = tmp_path_factory.mktemp("archive-pipeline")
    with CivitaiServer(root / "civitai", api_key="civ-" + secrets.token_hex(16)) as civ:
        ckpt = civ.add_version(600, kit.single_file, name="tiny.safetensors", model_type="Checkpoint")
        lora = civ.add_version(601, kit.loras["kohya_sgm"], name="style.safetensors")
        catalog = {
            "version": 1,
            "vae": {"source": f"file:{kit.vae_dir}"},
            "checkpoints": {
                "tiny": {"source": "civitai:600", "sha256": ckpt.sha256, "config": f"file:{kit.config_dir}"}
            },
            "templates": {
                "alpha": {"checkpoint": "tiny", "loras": [{"source": "civitai:601", "sha256": lora.sha256}]}
            },
        }
        project = make_dvc_project(root / "a" / "project", catalog, params={"merge": {"shard_size_mb": 0.5}})
        local = root / "remote"
        s3_url = f"s3://{s3_server.make_bucket('archive-' + secrets.token_hex(6))}/fuseline"
        (project.root / ".dvc" / "config").write_text(remotes_config(local, s3_url, s3_server, "local"))
        project.env.update(civ.env() | s3_server.env())
        project.env["FUSELINE_CACHE_DIR"] = str(root / "cache-a")
        project.dvc("repro", "verify@alpha")
        for remote in ("local", "s3"):
            out = fuseline(project, "publish", "--remote", remote)
            assert "sources archived in" in out, out
        yield Built(project, civ, catalog, local, s3_url, s3_server, root)


def lose_upstream(civ: CivitaiServer) -> None:
    """The LoRA's author deleted it (the API answers 404); the checkpoint's file was replaced by other bytes
    (its listed sha256 no longer matches what is served)."""
    civ.versions.pop(601, None)
    checkpoint = civ.root / "storage" / civ.versions[600].storage_path.lstrip("/")
    checkpoint.write_bytes(checkpoint.read_bytes()[:-1024] + b"\0" * 1024)


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.parametrize("remote", ["local", "s3"])
def test_a_fresh_clone_rebuilds_the_same_model_from_the_archive_after_upstream_lost_its_sources(
    built, remote
):
    lose_upstream(built.civitai)
    # A fresh clone: the committed files only (pipeline, catalog, params, dvc.lock, .dvc/config naming the
    # remotes), no DVC cache, no outputs; another machine's empty download cache.
    clone = make_dvc_project(built.root / f"clone-{remote}" / "project", built.catalog)
    shutil.copy2(built.project.root / "params.yaml", clone.root / "params.yaml")
    shutil.copy2(built.project.root / "dvc.lock", clone.root / "dvc.lock")
    (clone.root / ".dvc" / "config").write_text(
        remotes_config(built.local_remote, built.s3_url, built.s3, remote)
    )
    clone.env.update(built.civitai.env() | built.s3.env())
    clone.env["FUSELINE_CACHE_DIR"] = str(built.root / f"cache-{remote}")
    built.civitai.clear_requests()

    proc = clone.dvc("repro", TARGET)

    # Upstream was asked and failed (this is no cache hit): the LoRA's metadata 404, the checkpoint's bytes.
    asked = {(r.path.split("?")[0], r.status) for r in built.civitai.api.requests}
    assert ("/api/v1/model-versions/601", 404) in asked and ("/api/download/models/600", 307) in asked
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    archived = sorted((e["source"], e["upstream_code"]) for e in events if e["event"] == "source.archived")
    assert archived == [("civitai:600", "SHA256_MISMATCH"), ("civitai:601", "NOT_FOUND")], proc.stderr[-3000:]
    assert all(e["archive"].startswith(built.s3_url if remote == "s3" else str(built.local_remote))
               for e in events if e["event"] == "source.archived")  # fmt: skip
    # The same model, bit for bit, and the same DVC hash for it.
    assert files_of(clone.root / MODEL) == files_of(built.project.root / MODEL)
    model_outs = [
        [o for o in p.lock()["stages"][TARGET]["outs"] if o["path"] == MODEL.as_posix()]
        for p in (clone, built.project)
    ]
    assert model_outs[0] == model_outs[1] and len(model_outs[0]) == 1
