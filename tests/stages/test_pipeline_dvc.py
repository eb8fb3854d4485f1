"""The repo's dvc.yaml driven by the real `dvc repro` on the kit: what runs, what is skipped, what is stored.

One scratch project goes through a sequence of edits (module fixture + tests in file order): each stage
process pays the torch + diffusers import, so every extra repro costs tens of seconds on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.fixtures.code_deps import import_closure, pipeline, stage_command_module
from tests.fixtures.project import DvcProject, make_dvc_project

pytestmark = pytest.mark.slow

TEMPLATES = ("alpha", "beta", "gamma")
ALL_FIRST_RUN = {
    # Fetch stages write receipts (sha256, size, kind); the bytes stay in the download cache.
    "fetch-checkpoint@tiny",
    "fetch-checkpoint@tiny-diffusers",
    "fetch-vae",
    *(f"fetch-loras@{t}" for t in TEMPLATES),
    "convert@tiny",
    "convert@tiny-diffusers",
    "vae",
    *(f"merge@{t}" for t in TEMPLATES),
    *(f"verify@{t}" for t in TEMPLATES),
}


def kit_catalog(kit) -> dict:
    """Three templates on two checkpoints; alpha and beta have UNet-only LoRAs on the same checkpoint."""

    def lora(name: str, scale: float) -> dict:
        return {"source": f"file:{kit.loras[name]}", "scale": scale}

    return {
        "version": 1,
        "vae": {"source": f"file:{kit.vae_dir}"},
        "checkpoints": {
            "tiny": {"source": f"file:{kit.single_file}", "config": f"file:{kit.config_dir}"},
            "tiny-diffusers": {"source": f"file:{kit.diffusers_dir}"},
        },
        "templates": {
            "alpha": {
                "checkpoint": "tiny",
                "loras": [{"source": f"file:{kit.loras['kohya_sgm']}", "scale": 0.8}],
            },
            "beta": {"checkpoint": "tiny", "loras": [{"source": f"file:{kit.loras['locon']}", "scale": 0.5}]},
            "gamma": {
                "checkpoint": "tiny-diffusers",
                "loras": [lora("kohya_te", 1.0)],
                "defaults": {"guidance_scale": 3.0},
            },
        },
    }


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def project(kit, tmp_path_factory) -> DvcProject:
    project = make_dvc_project(
        tmp_path_factory.mktemp("pipeline") / "project",
        kit_catalog(kit),
        # Tiny shards so the export's sharding runs; 64 px, 2 steps: enough for the tiny model.
        params={"merge": {"shard_size_mb": 0.5}, "verify": {"steps": 2, "width": 64, "height": 64}},
    )
    project.first_run = project.repro()  # type: ignore[attr-defined]
    return project


def test_first_repro_runs_every_stage_once(project):
    assert sorted(project.first_run) == sorted(ALL_FIRST_RUN)
    assert project.status() == {}
    for template in TEMPLATES:
        model = project.root / "artifacts/models" / template
        assert json.loads((model / "fuseline.json").read_text())["template"] == template
        assert (project.root / "artifacts/verify" / template / "preview.png").is_file()


def test_second_repro_runs_nothing(project):
    assert project.repro() == []


# Modules at different depths of the stages' imports: each edit must mark changed exactly the stages whose
# command imports the module (issue 15: merge did not list stages/runtime.py, stages/sources/ and others, so
# an edit there left stale models that `dvc repro` called up to date).
EDITED_MODULES = (
    "stages/lora.py",  # merge only
    "fuseline/core/manifest.py",  # merge and verify
    "stages/sources/civitai.py",  # every stage that fetches or materializes a source
    "fuseline/core/logs.py",  # every stage
)


@pytest.mark.parametrize("module", EDITED_MODULES)
def test_editing_a_module_marks_exactly_the_stages_importing_it_changed(project, module):
    # Stages this catalog instantiates (dvc.yaml's `addon` stage has no instance without add-ons).
    instantiated = {s.split("@")[0] for s in ALL_FIRST_RUN}
    importers = {
        name.split("@")[0]
        for name, stage in pipeline(project.root)["stages"].items()
        if module in import_closure(stage_command_module(stage))
    } & instantiated
    path = project.root / module
    original = path.read_bytes()
    path.write_bytes(original + b"\n# an edit\n")
    try:
        changed = project.status()
    finally:
        path.write_bytes(original)
    assert changed, module
    assert {name.split("@")[0] for name in changed} == importers
    expected = {s for s in ALL_FIRST_RUN if s.split("@")[0] in importers}
    assert set(changed) == expected
    for entries in changed.values():
        assert entries == [{"changed deps": {module: "modified"}}], entries
    assert project.status() == {}


def test_shared_components_are_stored_once(project):
    models = project.root / "artifacts/models"
    for component in ("text_encoder", "text_encoder_2", "vae"):
        alpha = sorted((models / "alpha" / component).glob("*.safetensors"))
        beta = sorted((models / "beta" / component).glob("*.safetensors"))
        assert alpha and [p.name for p in alpha] == [p.name for p in beta]
        assert [md5(p) for p in alpha] == [md5(p) for p in beta], (
            f"{component} differs between alpha and beta"
        )
    # The UNets differ (different LoRAs), so the test above is not comparing two copies of one thing.
    assert md5(sorted((models / "alpha/unet").glob("*.safetensors"))[0]) != md5(
        sorted((models / "beta/unet").glob("*.safetensors"))[0]
    )
    # Content addressing: the cache holds exactly one object per distinct file content of the outputs.
    cache_files = [p for p in (project.root / ".dvc/cache/files/md5").rglob("*") if p.is_file()]
    cache_objects = {p.parent.name + p.name for p in cache_files if not p.name.endswith(".dir")}
    output_files = [p for p in (project.root / "artifacts").rglob("*") if p.is_file()]
    assert cache_objects == {md5(p) for p in output_files}
    shared = md5(sorted((models / "alpha/text_encoder").glob("*.safetensors"))[0])
    assert (project.root / ".dvc/cache/files/md5" / shared[:2] / shared[2:]).is_file()


def test_metrics_show_lists_each_template(project):
    shown = json.loads(project.dvc("metrics", "show", "--json").stdout)
    text = json.dumps(shown)
    for template in TEMPLATES:
        assert f"artifacts/verify/{template}/metrics.json" in text
    assert '"black_fraction"' in text and '"step_s"' in text
    plots = project.dvc("plots", "show", "--json").stdout
    assert "preview.png" in plots


def test_editing_one_lora_scale_reruns_only_that_template(project):
    project.edit_catalog(lambda c: c["templates"]["beta"]["loras"][0].update(scale=0.25))
    # fetch-loras@beta tracks the whole template, so it re-runs too (a cache hit, an identical receipt).
    assert sorted(project.repro()) == ["fetch-loras@beta", "merge@beta", "verify@beta"]
    assert project.status() == {}


def test_editing_a_checkpoint_reruns_it_and_only_its_templates(project):
    project.edit_catalog(lambda c: c["checkpoints"]["tiny-diffusers"].update(prediction="v_prediction"))
    assert sorted(project.repro()) == [
        "convert@tiny-diffusers",
        "fetch-checkpoint@tiny-diffusers",
        "merge@gamma",
        "verify@gamma",
    ]
    # The catalog's prediction type reaches the converted base, the export's scheduler and its manifest;
    # verify@gamma passed, and it checks that the scheduler it sampled with matches the manifest.
    for folder in ("artifacts/base/tiny-diffusers", "artifacts/models/gamma"):
        scheduler = json.loads((project.root / folder / "scheduler/scheduler_config.json").read_text())
        assert scheduler["prediction_type"] == "v_prediction", folder
    manifest = json.loads((project.root / "artifacts/models/gamma/fuseline.json").read_text())
    assert manifest["prediction_type"] == "v_prediction"


def test_adding_a_template_runs_only_the_new_one(project, kit):
    project.edit_catalog(
        lambda c: c["templates"].update(
            delta={"checkpoint": "tiny", "loras": [{"source": f"file:{kit.loras['peft']}", "scale": 1.0}]}
        )
    )
    assert sorted(project.repro()) == ["fetch-loras@delta", "merge@delta", "verify@delta"]


def test_reformatting_the_catalog_runs_nothing(project):
    catalog = project.read_catalog()
    # Other indentation, keys sorted (a different order at every level), same values.
    project.write_catalog(catalog, indent=4, sort_keys=True)
    assert project.status() == {}
    project.write_catalog(catalog, indent=None)
    assert project.repro() == []


def test_deleted_outputs_come_back_from_the_run_cache(project):
    # What CI's final `dvc repro --pull` relies on: a stage whose deps and params were run before is
    # restored from the run-cache, not recomputed (so no output may be `cache: false`).
    for folder in ("artifacts/models/alpha", "artifacts/verify/alpha"):
        shutil.rmtree(project.root / folder)
    proc = project.dvc("repro")
    assert "Running stage" not in proc.stdout, proc.stdout
    assert "merge@alpha' is cached" in proc.stdout and "verify@alpha' is cached" in proc.stdout
    assert (project.root / "artifacts/verify/alpha/metrics.json").is_file()
    assert project.status() == {}
