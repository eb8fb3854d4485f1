"""Downloads in the pipeline: fetch receipts, `materialize`, and `dvc repro` on a catalog whose LoRAs come
from the local Civitai look-alike (the real site is never reached).

Fast tests call the receipt and materialize functions directly; the DVC test (slow) drives the repo's
dvc.yaml with the real `dvc` CLI and counts the requests the server sees.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
from pathlib import Path

import pytest

from fuseline.core.catalog.loading import load_catalog
from stages.errors import StageError
from stages.fetch import write_receipt
from stages.local_files import materialize
from stages.receipts import check_group, read_receipt
from testkit.civitai import CivitaiServer, safetensors_bytes
from tests.fixtures.project import DvcProject, make_dvc_project

DOWNLOAD = "/api/download/models/"
_RUNNING = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)


def token() -> str:
    return "civ-" + secrets.token_hex(24)


def downloads(civ: CivitaiServer) -> list[str]:
    """The download requests the API host saw (metadata requests excluded), in order."""
    return [r.path.split("?")[0] for r in civ.api.requests if r.path.startswith(DOWNLOAD)]


def tree_contains(root: Path, needle: bytes) -> list[Path]:
    """Every file under `root` whose bytes contain `needle`."""
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


# ------------------------------------------------------------------------------ receipts, materialize


@pytest.fixture
def civitai(tmp_path, monkeypatch):
    with CivitaiServer(tmp_path / "civitai", api_key=token()) as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("FUSELINE_DOWNLOAD_RETRY_SECONDS", "2")
        server.add_version(301, safetensors_bytes(50_000, seed=1), name="a.safetensors")
        server.add_version(302, safetensors_bytes(60_000, seed=2), name="b.safetensors")
        yield server


def small_project(root: Path, civ: CivitaiServer) -> Path:
    """A catalog with relative file: sources (a file, a config folder) and two Civitai LoRAs, one pinned."""
    (root / "models/config/unet").mkdir(parents=True)
    (root / "models/base.safetensors").write_bytes(safetensors_bytes(10_000, seed=7))
    (root / "models/config/model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (root / "models/config/unet/config.json").write_text("{}")
    (root / "models/vae.safetensors").write_bytes(safetensors_bytes(2_000, seed=8))
    catalog = {
        "version": 1,
        "vae": {"source": "file:models/vae.safetensors"},
        "checkpoints": {"base": {"source": "file:models/base.safetensors", "config": "file:models/config"}},
        "templates": {
            "one": {
                "checkpoint": "base",
                "loras": [
                    {"source": "civitai:301", "sha256": civ.versions[301].sha256, "scale": 0.5},
                    {"source": "civitai:302"},
                ],
            }
        },
    }
    path = root / "templates.json"
    path.write_text(json.dumps(catalog, indent=2))
    return path


def test_receipts_record_hashes_and_are_identical_across_machines(civitai, tmp_path):
    receipts = []
    for machine in ("a", "b"):
        root = tmp_path / machine
        root.mkdir()
        catalog = load_catalog(small_project(root, civitai))
        groups = ("checkpoints.base", "templates.one")
        for group in groups:
            write_receipt(catalog, group, root / f"{group}.json", root / "cache")
        receipts.append({g: (root / f"{g}.json").read_bytes() for g in groups})
        for data in receipts[-1].values():
            assert str(tmp_path).encode() not in data and civitai.api_key.encode() not in data
    # Different folders and caches, same bytes: the run-cache and a `dvc pull` agree everywhere.
    assert receipts[0] == receipts[1]

    lora = read_receipt(tmp_path / "a/templates.one.json", "templates.one")
    assert lora["templates.one.loras[1]"] == {
        "where": "templates.one.loras[1]",
        "source": "civitai:302",
        "kind": "file",
        "sha256": civitai.versions[302].sha256,  # unpinned in the catalog: the receipt has its hash
        "size": civitai.versions[302].size,
    }
    ckpt = read_receipt(tmp_path / "a/checkpoints.base.json", "checkpoints.base")
    base = (tmp_path / "a/models/base.safetensors").read_bytes()
    assert ckpt["checkpoints.base"]["sha256"] == hashlib.sha256(base).hexdigest()
    assert ckpt["checkpoints.base.config"]["kind"] == "folder"
    # Each LoRA was downloaded once per machine (two caches), never for the file: sources.
    assert sorted(downloads(civitai)) == sorted([f"{DOWNLOAD}301", f"{DOWNLOAD}302"] * 2)


def test_materialize_uses_the_receipt_hash_and_refetches_on_a_miss(civitai, tmp_path):
    catalog = load_catalog(small_project(tmp_path, civitai))
    write_receipt(catalog, "templates.one", tmp_path / "receipt.json", tmp_path / "cache")
    receipt = read_receipt(tmp_path / "receipt.json", "templates.one")
    lora = catalog.templates["one"].loras[1]  # unpinned: only the receipt knows its sha256
    civitai.clear_requests()

    hit = materialize(catalog, lora, "templates.one.loras[1]", receipt=receipt, cache_dir=tmp_path / "cache")
    sha = civitai.versions[302].sha256
    assert civitai.requests == []
    # The cache's own file (named by hash), under the extension loaders need, without a second copy.
    cached = tmp_path / "cache/sha256" / sha[:2] / sha
    assert hit.name == f"{sha}.safetensors" and hit.stat().st_ino == cached.stat().st_ino

    # Another machine: empty cache. Fetched again and verified against the receipt's sha256.
    other = tmp_path / "other-cache"
    path = materialize(catalog, lora, "templates.one.loras[1]", receipt=receipt, cache_dir=other)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == civitai.versions[302].sha256
    assert downloads(civitai) == [f"{DOWNLOAD}302"]

    # A receipt whose hash the server does not confirm is refused, and nothing lands in the cache.
    bad = {"templates.one.loras[1]": dict(receipt["templates.one.loras[1]"], sha256="ee" * 32)}
    with pytest.raises(StageError) as err:
        materialize(catalog, lora, "templates.one.loras[1]", receipt=bad, cache_dir=tmp_path / "third")
    assert err.value.code == "SHA256_PIN_MISMATCH"
    assert not [p for p in (tmp_path / "third").rglob("*") if p.is_file() and p.name == "ee" * 32]

    # file: sources are used in place, whatever the cache.
    ckpt = materialize(catalog, catalog.checkpoints["base"], "checkpoints.base", cache_dir=other)
    assert ckpt == tmp_path / "models/base.safetensors"


def test_a_receipt_for_another_source_is_refused(civitai, tmp_path):
    catalog = load_catalog(small_project(tmp_path, civitai))
    write_receipt(catalog, "templates.one", tmp_path / "receipt.json", tmp_path / "cache")
    receipt = read_receipt(tmp_path / "receipt.json", "templates.one")
    receipt["templates.one.loras[1]"]["source"] = "civitai:999"
    with pytest.raises(StageError) as err:
        materialize(catalog, catalog.templates["one"].loras[1], "templates.one.loras[1]", receipt=receipt)
    assert err.value.code == "RECEIPT_STALE"


def test_an_unknown_group_names_the_choices(civitai, tmp_path):
    catalog = load_catalog(small_project(tmp_path, civitai))
    with pytest.raises(StageError, match="templates: one"):
        write_receipt(catalog, "templates.nope", tmp_path / "receipt.json", tmp_path / "cache")
    with pytest.raises(StageError) as err:
        check_group("loras.one")
    assert err.value.code == "RECEIPT_GROUP"


# --------------------------------------------------------------------------------- dvc repro, slow

TARGETS = ("merge@alpha", "merge@beta")
FIRST_RUN = {
    "fetch-checkpoint@tiny",
    "fetch-vae",
    "fetch-loras@alpha",
    "fetch-loras@beta",
    "convert@tiny",
    "vae",
    "merge@alpha",
    "merge@beta",
}


@pytest.fixture(scope="module")
def served(kit, tmp_path_factory):
    """The kit's LoRAs on the Civitai look-alike, a random API key, a scratch project using them."""
    root = tmp_path_factory.mktemp("sources-pipeline")
    with CivitaiServer(root / "civitai", api_key=token()) as civ:
        ckpt = civ.add_version(400, kit.single_file, name="tiny.safetensors", model_type="Checkpoint")
        sgm = civ.add_version(401, kit.loras["kohya_sgm"], name="style.safetensors")
        civ.add_version(402, kit.loras["locon"], name="detail.safetensors")
        catalog = {
            "version": 1,
            "vae": {"source": f"file:{kit.vae_dir}"},
            "checkpoints": {
                "tiny": {"source": "civitai:400", "sha256": ckpt.sha256, "config": f"file:{kit.config_dir}"}
            },
            "templates": {
                "alpha": {"checkpoint": "tiny", "loras": [{"source": "civitai:401", "sha256": sgm.sha256}]},
                # civitai:401 again (fetched once for both), and an unpinned one the receipt pins.
                "beta": {
                    "checkpoint": "tiny",
                    "loras": [
                        {"source": "civitai:402", "scale": 0.5},
                        {"source": "civitai:401", "sha256": sgm.sha256, "scale": 0.7},
                    ],
                },
            },
        }
        project = make_dvc_project(root / "project", catalog, params={"merge": {"shard_size_mb": 0.5}})
        project.env.update(civ.env())
        project.env["FUSELINE_CACHE_DIR"] = str(root / "download-cache")
        project.env["FUSELINE_DOWNLOAD_RETRY_SECONDS"] = "5"
        project.logs = []  # type: ignore[attr-defined]
        yield project, civ, root / "download-cache"


def repro(project: DvcProject, *args: str) -> list[str]:
    proc = project.dvc("repro", *args)
    project.logs += [proc.stdout, proc.stderr]  # type: ignore[attr-defined]
    return sorted(_RUNNING.findall(proc.stdout))


@pytest.mark.slow
def test_dvc_repro_downloads_each_lora_once_and_keeps_no_secret(served, kit):
    project, civ, cache = served

    assert set(repro(project, *TARGETS)) == FIRST_RUN
    # civitai:401 is in both templates: one download; the checkpoint and civitai:402 one more each. The
    # bytes went through the real redirect to the storage host, one GET each.
    assert sorted(downloads(civ)) == [f"{DOWNLOAD}400", f"{DOWNLOAD}401", f"{DOWNLOAD}402"]
    assert len([r for r in civ.storage.requests if r.method == "GET"]) == 3
    manifest = json.loads((project.root / "artifacts/models/beta/fuseline.json").read_text())
    wanted = [hashlib.sha256(kit.loras[n].read_bytes()).hexdigest() for n in ("locon", "kohya_sgm")]
    ckpt_sha = hashlib.sha256(kit.single_file.read_bytes()).hexdigest()
    assert (
        json.loads((project.root / "artifacts/models/beta/fuseline.json").read_text())["checkpoint"]["sha256"]
        == ckpt_sha
    )
    assert [lora["sha256"] for lora in manifest["loras"]] == wanted
    receipt = json.loads((project.root / "artifacts/sources/templates/beta.json").read_text())
    assert [s["sha256"] for s in receipt["sources"]] == wanted

    # The DVC cache holds receipts and models, never the downloaded bytes (no second copy to push).
    dvc_cache = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (project.root / ".dvc/cache").rglob("*")
                 if p.is_file()}  # fmt: skip
    assert not dvc_cache & {*wanted, ckpt_sha}

    # Nothing changed: nothing runs, nobody is asked anything.
    civ.clear_requests()
    assert repro(project, *TARGETS) == []
    assert civ.requests == []

    # Another machine (empty download cache): a forced merge fetches what it needs again, by the pin and
    # by the receipt's hash (civitai:402 is unpinned in the catalog), each download sha256-verified.
    shutil.rmtree(cache)
    assert repro(project, "-f", "-s", "merge@beta") == ["merge@beta"]
    assert sorted(downloads(civ)) == [f"{DOWNLOAD}401", f"{DOWNLOAD}402"]
    assert [lora["sha256"] for lora in json.loads(
        (project.root / "artifacts/models/beta/fuseline.json").read_text())["loras"]] == wanted  # fmt: skip

    # The key was used (these LoRAs need it: the build could not have succeeded without it) and is
    # nowhere: not in DVC's output, the project (artifacts, receipts, dvc.lock, .dvc/cache), or the cache.
    key = civ.api_key.encode()
    assert all(r.headers.get("authorization") == f"Bearer {civ.api_key}" for r in civ.api.requests)
    assert any("civitai:402" in log for log in project.logs)  # the stages' logs are in what we grep
    assert not [i for i, log in enumerate(project.logs) if civ.api_key in log]
    assert tree_contains(project.root, key) == []
    assert tree_contains(cache, key) == []
