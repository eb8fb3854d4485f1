"""Issue #18 items 4, 6 and 8 end to end, real code at every step: a catalog with an add-on LoRA, a template
with that LoRA fused at build time (the oracle), and a template with clip skip and embeddings is built with
the real `dvc repro`, published to a local DVC remote, synced onto a volume by the worker's sync, and served
by `python -m worker.handler --rp_serve_api`; the jobs go through RunPod's local API."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import numpy
import pytest
from PIL import Image

from fuseline.publish.releases import publish
from testkit.demo import PARAMS, running_worker, use_embedded_remote
from testkit.project import make_dvc_project
from tests.worker.test_addons import TOLERANCE_MAX, TOLERANCE_MEAN

S = 0.6
TEMPLATES = ("plain", "fused", "skip")
JOB = {"prompt": "a lighthouse at dusk, (golden hour:1.2)", "seed": 21, "width": 64, "height": 64}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def catalog(kit, embeddings: dict[str, Path]) -> dict:
    def source(path: Path, **extra) -> dict:
        return {"source": f"file:{path}", "sha256": sha256_of(path), **extra}

    def lora(name: str, scale: float) -> dict:
        return source(kit.loras[name], scale=scale)

    return {
        "version": 1,
        "vae": {"source": f"file:{kit.vae_dir}"},
        "checkpoints": {
            "tiny-sdxl": {
                **source(kit.single_file),
                "prediction": "epsilon",
                "config": f"file:{kit.config_dir}",
            }
        },
        "templates": {
            "plain": {"checkpoint": "tiny-sdxl", "loras": [lora("kohya_sgm", 0.8)], "defaults": {"steps": 3}},
            # The oracle: the add-on's LoRA fused at build time at the scale the job asks for.
            "fused": {
                "checkpoint": "tiny-sdxl",
                "loras": [lora("kohya_sgm", 0.8), lora("peft", S)],
                "defaults": {"steps": 3},
            },
            "skip": {
                "checkpoint": "tiny-sdxl",
                "embeddings": [
                    source(embeddings["single"], token="embSingle"),
                    source(embeddings["triple"], token="embTriple"),
                ],
                "defaults": {"steps": 3, "clip_skip": 3, "negative_prompt": "blurry, embSingle"},
            },
        },
        "addons": {
            "style": {**source(kit.loras["peft"]), "default_scale": 0.5, "max_scale": 1.0},
            "words": {
                **source(kit.loras["kohya_te"]),
                "default_scale": 0.7,
                "max_scale": 0.8,
                "templates": ["plain"],
            },
        },
    }


def pixels(answer: dict) -> numpy.ndarray:
    assert answer["status"] == "COMPLETED", answer
    (image,) = answer["output"]["images"]
    return numpy.asarray(Image.open(io.BytesIO(base64.b64decode(image["data"]))).convert("RGB"), numpy.int16)


@pytest.mark.slow
def test_build_publish_sync_and_serve_addons_clip_skip_embeddings_and_describe(
    kit, kit_embeddings, tmp_path: Path
) -> None:
    project = make_dvc_project(tmp_path / "project", catalog(kit, kit_embeddings), PARAMS)
    ran = project.repro()
    assert {"addon@style", "addon@words", "merge@skip"} <= set(ran)
    addon_json = json.loads((project.root / "artifacts/addons/style/addon.json").read_text())
    assert addon_json["checked_on"] == ["tiny-sdxl"] and addon_json["placed_keys"] == {"unet": 192}
    manifest = json.loads((project.root / "artifacts/models/skip/fuseline.json").read_text())
    assert [e["token"] for e in manifest["embeddings"]] == ["embSingle", "embTriple"]
    assert manifest["defaults"]["clip_skip"] == 3

    # An add-on is no part of any template: changing its rules re-runs its own stage only.
    project.edit_catalog(lambda c: c["addons"]["style"].update(max_scale=0.9))
    assert project.repro() == ["addon@style"]
    project.edit_catalog(lambda c: c["addons"]["style"].update(max_scale=1.0))
    assert project.repro() == []  # restored from DVC's run-cache
    assert json.loads((project.root / "artifacts/addons/style/addon.json").read_text())["max_scale"] == 1.0

    use_embedded_remote(project)
    release = publish(project.root, channel="main").release
    assert sorted(release.addons or {}) == ["style", "words"]
    assert release.addons["words"].templates == ["plain"]
    assert [e.token for e in release.templates["skip"].embeddings] == ["embSingle", "embTriple"]
    release_path = project.root / ".dvc-remote" / "releases" / "main.json"

    from worker.sync.templates import sync_templates

    volume = tmp_path / "volume"
    report = sync_templates(str(release_path), volume)
    assert report.ok, report.lines()
    assert {a.template: a.status for a in report.addons} == {"style": "synced", "words": "synced"}
    assert (volume / "addons" / "style" / "lora.safetensors").is_file()
    # Syncing only a template the add-on "words" is not offered with brings "style" alone.
    only_fused = sync_templates(str(release_path), tmp_path / "volume-2", ["fused"])
    assert [a.template for a in only_fused.addons] == ["style"]

    spec_hashes = {t: release.templates[t].spec_hash for t in TEMPLATES}
    with running_worker(volume, TEMPLATES, spec_hashes, tmp_path / "worker.log", tmp_path / "work") as worker:
        worker.wait_ready()
        described = worker.runsync({"input": {"action": "describe"}})
        assert described["status"] == "COMPLETED", described
        answer = described["output"]
        assert sorted(answer["templates"]) == sorted(TEMPLATES)
        assert answer["templates"]["plain"]["addons"] == ["style", "words"]
        assert answer["templates"]["fused"]["addons"] == ["style"]
        assert answer["templates"]["skip"]["defaults"]["clip_skip"] == 3
        assert answer["templates"]["skip"]["embeddings"] == ["embSingle", "embTriple"]
        assert answer["addons"]["style"]["max_scale"] == 1.0 and answer["addons"]["words"]["templates"] == [
            "plain"
        ]
        assert answer["limits"]["width"]["min"] == 64 and "euler_a" in answer["schedulers"]

        def job(template: str, **extra) -> dict:
            return worker.runsync({"input": {**JOB, "template": template, **extra}})

        plain = job("plain")
        added = job("plain", loras=[{"name": "style", "scale": S}])
        fused = job("fused")
        again = job("plain")
        assert again["output"]["images"][0]["data"] == plain["output"]["images"][0]["data"]
        distance = numpy.abs(pixels(added) - pixels(fused))
        assert numpy.abs(pixels(added) - pixels(plain)).max() > 10 * TOLERANCE_MAX
        assert distance.max() <= TOLERANCE_MAX and distance.mean() <= TOLERANCE_MEAN, distance.max()

        too_strong = job("plain", loras=[{"name": "style", "scale": 1.2}])
        assert too_strong["status"] == "FAILED"
        assert too_strong["error"].startswith(
            "[INVALID_INPUT] 1 problem(s): loras.0.scale: 1.2 is outside 0..1"
        )
        unknown = job("fused", loras=[{"name": "words"}])
        assert unknown["error"].startswith(
            "[INVALID_INPUT] 1 problem(s): loras.0.name: unknown add-on 'words'"
        )

        skip = job("skip", prompt="a lighthouse, (embTriple:1.2)")
        assert skip["output"]["parameters"]["clip_skip"] == 3
        assert pixels(skip).std() > 1
        overridden = job("skip", prompt="a lighthouse, (embTriple:1.2)", clip_skip=2)
        assert numpy.abs(pixels(overridden) - pixels(skip)).max() > 0
