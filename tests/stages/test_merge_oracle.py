"""The merge stage end to end on the kit, proven against diffusers' own LoRA fusing.

Oracle: the kit pipeline in fp32, `load_lora_weights` for each LoRA, `set_adapters(names, scales)`,
`fuse_lora()`, then every weight cast to fp16. Our streamed export must equal it (at most 1 fp16 ulp apart:
the in-place addmm fuse rounds differently from PEFT's separate delta on ~0.01% of fused values, measured at
full size in docs/benchmarks.md B1), and everything no LoRA touches must be the base cast to fp16, bit for
bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fuseline.core.manifest import CheckpointRef, ManifestError, ModelManifest, VaeRef
from stages.errors import StageError
from stages.lora import LoraInput
from stages.merge import TemplateIdentity, main, merge_template
from stages.shards import index_file_name

# Merging several adapters into one model: PEFT warns about the second adapter config, which is the point.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")

# Half a megabyte per shard: the tiny UNet (about 12 MB in fp16) really is split into many shards.
SHARD_MB = 0.5
WEIGHTED = ("unet", "text_encoder", "text_encoder_2")
CASES: dict[str, list[tuple[str, float]]] = {
    "kohya_sgm": [("kohya_sgm", 1.0)],
    "kohya_diffusers": [("kohya_diffusers", 1.0)],
    "kohya_te": [("kohya_te", 1.0)],
    "locon": [("locon", 1.0)],
    "peft": [("peft", 1.0)],
    "dora": [("dora", 1.0)],
    "kohya_te+locon": [("kohya_te", 0.7), ("locon", -0.5)],
    "peft+dora": [("peft", 0.5), ("dora", 0.8)],
}
IDENTITY = TemplateIdentity(
    template="demo",
    checkpoint=CheckpointRef(id="tiny", source="file:tiny"),
    vae=VaeRef(source="file:vae"),
    spec_hash="0" * 64,
)


def _merge(kit, loras: list[tuple[str, float]], out: Path, prediction_type: str = "epsilon"):
    inputs = [
        LoraInput(path=kit.loras[name], scale=scale, name=f"file:loras/{name}.safetensors")
        for name, scale in loras
    ]
    return merge_template(
        kit.diffusers_dir,
        kit.vae_dir,
        inputs,
        out,
        identity=IDENTITY,
        prediction_type=prediction_type,
        shard_size_mb=SHARD_MB,
    )


@pytest.fixture(scope="module")
def exports(kit, tmp_path_factory):
    """Each case merged once per module, on demand."""
    root = tmp_path_factory.mktemp("exports")
    done: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in done:
            _merge(kit, CASES[case], root / case)
            done[case] = root / case
        return done[case]

    return get


def read_variant_tensors(component_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an exported component, via its fp16 index when sharded."""
    stem = "diffusion_pytorch_model" if list(component_dir.glob("diffusion_pytorch_model*")) else "model"
    index = component_dir / index_file_name(stem)
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else [f"{stem}.fp16.safetensors"]
    )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(component_dir / name)))
    return tensors


def read_base_tensors(component_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(component_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in fp16 units in the last place (fp16 bit patterns ordered as integers)."""

    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -32768 - bits, bits)

    return int((ordered(a) - ordered(b)).abs().max().item()) if a.numel() else 0


def oracle_state(kit, loras: list[tuple[str, float]]) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        kit.diffusers_dir, torch_dtype=torch.float32, local_files_only=True
    )
    names = []
    for name, _ in loras:
        pipe.load_lora_weights(str(kit.loras[name]), adapter_name=name)
        names.append(name)
    pipe.set_adapters(names, [scale for _, scale in loras])
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers and their key names
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()} for c in WEIGHTED}


@pytest.mark.parametrize("case", list(CASES))
def test_export_equals_diffusers_fuse_lora(case, kit, exports):
    out = exports(case)
    oracle = oracle_state(kit, CASES[case])
    manifest = ModelManifest.read(out)
    changed_total = 0
    for component in WEIGHTED:
        ours = read_variant_tensors(out / component)
        base = read_base_tensors(kit.diffusers_dir / component)
        assert set(ours) == set(base) == set(oracle[component])
        changed = [k for k in base if not torch.equal(base[k], oracle[component][k])]
        changed_total += len(changed)
        for name in base:
            assert ours[name].dtype == torch.float16, name
            expected = oracle[component][name].to(torch.float16)
            if name in changed:
                assert ulp_distance(ours[name], expected) <= 1, f"{component}/{name}"
            else:
                assert torch.equal(ours[name], base[name].to(torch.float16)), (
                    f"{component}/{name} should be untouched"
                )
        # every tensor diffusers changed we changed too (and only those): compare against the base
        ours_changed = [k for k in base if not torch.equal(ours[k], base[k].to(torch.float16))]
        assert set(ours_changed) <= set(changed)
        placed = sum(lora.placed_keys[component] for lora in manifest.loras)
        assert (placed > 0) == (len(changed) > 0), component
    assert changed_total > 0


def test_vae_is_the_given_vae_in_fp16(kit, exports):
    ours = read_variant_tensors(exports("peft") / "vae")
    theirs = read_base_tensors(kit.vae_dir)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k].to(torch.float16)) for k in theirs)
    assert (exports("peft") / "vae" / "config.json").read_bytes() == (
        kit.vae_dir / "config.json"
    ).read_bytes()


def test_export_loads_with_from_pretrained_fp16_and_is_sharded(kit, exports):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = exports("kohya_te+locon")
    unet_index = json.loads((out / "unet" / index_file_name("diffusion_pytorch_model")).read_text())
    assert len(set(unet_index["weight_map"].values())) > 1
    assert not list(out.rglob("*.safetensors.index.json"))  # only variant indexes

    pipe = StableDiffusionXLPipeline.from_pretrained(
        out, variant="fp16", torch_dtype=torch.float16, local_files_only=True
    )
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder_2.dtype == torch.float16
    _, info = UNet2DConditionModel.from_pretrained(out / "unet", variant="fp16", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for cls, component in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")):
        _, info = cls.from_pretrained(out / component, variant="fp16", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], component


def _all_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_inputs_give_byte_identical_folders(kit, exports, tmp_path):
    _merge(kit, CASES["kohya_te+locon"], tmp_path / "again")
    first, second = _all_bytes(exports("kohya_te+locon")), _all_bytes(tmp_path / "again")
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


def test_unet_only_templates_share_every_other_file(exports):
    a, b = _all_bytes(exports("kohya_sgm")), _all_bytes(exports("peft"))
    shared = {k for k in a if not k.startswith("unet/") and k != "fuseline.json"}
    assert shared == {k for k in b if not k.startswith("unet/") and k != "fuseline.json"}
    assert any(k.startswith("text_encoder_2/") for k in shared) and any(k.startswith("vae/") for k in shared)
    assert [k for k in shared if a[k] != b[k]] == []
    assert any(a[k] != b.get(k) for k in a if k.startswith("unet/"))


def test_manifest_records_the_inputs(kit, exports):
    manifest = ModelManifest.read(exports("kohya_te+locon"))
    assert [lora.source for lora in manifest.loras] == [
        "file:loras/kohya_te.safetensors",
        "file:loras/locon.safetensors",
    ]
    assert [lora.scale for lora in manifest.loras] == [0.7, -0.5]
    assert (
        manifest.loras[0].placed_keys["text_encoder"] > 0
        and manifest.loras[1].placed_keys["text_encoder"] == 0
    )
    assert sum(manifest.loras[1].placed_keys.values()) == len(load_file(str(kit.loras["locon"])))
    assert (manifest.dtype, manifest.variant, manifest.prediction_type) == ("float16", "fp16", "epsilon")
    text = (exports("kohya_te+locon") / "fuseline.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_manifest_read_refuses_a_missing_or_broken_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        ModelManifest.read(tmp_path)
    (tmp_path / "fuseline.json").write_text('{"template": "x"}')
    with pytest.raises(ManifestError, match="invalid manifest"):
        ModelManifest.read(tmp_path)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_scheduler_gets_the_catalog_prediction_type(kit, tmp_path, prediction):
    _merge(kit, [], tmp_path / "out", prediction_type=prediction)
    config = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == prediction
    assert ModelManifest.read(tmp_path / "out").prediction_type == prediction


def test_unplaceable_lora_fails_and_leaves_no_output(kit, tmp_path):
    out = tmp_path / "models" / "demo"
    with pytest.raises(StageError) as err:
        _merge(kit, [("peft", 1.0), ("sd15", 1.0)], out)
    assert "file:loras/sd15.safetensors" in str(err.value) and "up factor [640, 4]" in str(err.value)
    assert not out.exists()


def test_failure_while_writing_leaves_no_output(kit, tmp_path):
    """A failure half-way through the export (here: a scale that overflows fp16) removes the partial
    folder, the temporary one, and a stale output from an earlier run."""
    out = tmp_path / "models" / "demo"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an earlier run")
    with pytest.raises(StageError, match="fp16 range"):
        _merge(kit, [("peft", 1e6)], out)
    assert list((tmp_path / "models").iterdir()) == []


# --------------------------------------------------------------------------------------------------------
# main(id, paths): the stage as DVC runs it, from templates.json and params.yaml in the working directory


# The paths dvc.yaml passes on the stage's command line, relative to the project.
PATHS = {
    "base": Path("artifacts/base/tiny"),
    "vae": Path("artifacts/vae"),
    "out": Path("artifacts/models/demo"),
}


def _project(tmp_path: Path, kit, loras: list[dict]) -> Path:
    project = tmp_path / "project"
    (project / "loras").mkdir(parents=True)
    for path in kit.loras.values():
        (project / "loras" / path.name).symlink_to(path)
    shutil.copytree(kit.diffusers_dir, project / "artifacts" / "base" / "tiny")
    shutil.copytree(kit.vae_dir, project / "artifacts" / "vae")
    catalog = {
        "version": 1,
        "vae": {"source": "file:artifacts/vae"},
        "checkpoints": {"tiny": {"source": "file:artifacts/base/tiny", "prediction": "v_prediction"}},
        "templates": {"demo": {"checkpoint": "tiny", "loras": loras}},
    }
    (project / "templates.json").write_text(json.dumps(catalog, indent=2))
    (project / "params.yaml").write_text(f"merge:\n  shard_size_mb: {SHARD_MB}\n")
    return project


def test_main_builds_the_template_from_the_catalog(kit, tmp_path, monkeypatch):
    from fuseline.core.catalog.loading import load_catalog

    loras = [
        {"source": "file:loras/kohya_te.safetensors", "scale": 0.7},
        {"source": "file:loras/locon.safetensors", "scale": -0.5},
    ]
    project = _project(tmp_path, kit, loras)
    monkeypatch.chdir(project)
    main("demo", **PATHS)
    out = project / "artifacts" / "models" / "demo"
    manifest = ModelManifest.read(out)
    catalog = load_catalog(project / "templates.json")
    assert manifest.spec_hash == catalog.spec_hash("demo")
    assert manifest.template == "demo" and manifest.checkpoint.id == "tiny"
    assert manifest.prediction_type == "v_prediction"
    assert manifest.vae.source == "file:artifacts/vae"
    assert [lora.sha256 for lora in manifest.loras] == [
        hashlib.sha256(kit.loras[n].read_bytes()).hexdigest() for n in ("kohya_te", "locon")
    ]
    # same weights as the plain-function merge of the same LoRAs
    ours = read_variant_tensors(out / "unet")
    _merge(kit, CASES["kohya_te+locon"], tmp_path / "ref")
    ref = read_variant_tensors(tmp_path / "ref" / "unet")
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_main_fetches_remote_lora_sources(kit, tmp_path, monkeypatch):
    # A civitai: LoRA comes from the download cache (here: the local Civitai look-alike, on a miss).
    from testkit.civitai import CivitaiServer

    with CivitaiServer(tmp_path / "civitai") as civ:
        version = civ.add_version(12345, kit.loras["locon"], name="locon.safetensors")
        for key, value in {**civ.env(), "FUSELINE_CACHE_DIR": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(key, value)
        loras = [{"source": "civitai:12345", "sha256": version.sha256, "scale": 1.0}]
        monkeypatch.chdir(_project(tmp_path, kit, loras))
        main("demo", **PATHS)
        assert [r.path for r in civ.api.requests if r.path.startswith("/api/download/")] == [
            "/api/download/models/12345"
        ]
    manifest = ModelManifest.read(tmp_path / "project/artifacts/models/demo")
    assert [lora.sha256 for lora in manifest.loras] == [version.sha256]


def test_main_refuses_an_unknown_template(kit, tmp_path, monkeypatch):
    monkeypatch.chdir(_project(tmp_path, kit, []))
    with pytest.raises(StageError, match="demo"):
        main("nope", **PATHS)


def test_inpainting_base_is_recorded_as_such_and_ordinary_manifests_are_unchanged(kit, exports, tmp_path):
    """A 9-channel base (the convert stage's output for an inpainting checkpoint) merges like any other and
    its manifest says `checkpoint.kind: "inpaint"`; an ordinary base's manifest has no `kind` key at all,
    so manifests of ordinary checkpoints stay byte-identical to those written before inpainting support."""
    out = tmp_path / "inpaint"
    result = merge_template(
        kit.inpaint_dir,
        kit.vae_dir,
        [LoraInput(path=kit.loras["kohya_sgm"], scale=0.8, name="file:loras/kohya_sgm.safetensors")],
        out,
        identity=IDENTITY,
        prediction_type="epsilon",
        shard_size_mb=SHARD_MB,
    )
    assert result.manifest.checkpoint.kind == "inpaint"
    assert json.loads((out / "fuseline.json").read_text())["checkpoint"] == {
        "id": "tiny",
        "source": "file:tiny",
        "sha256": None,
        "kind": "inpaint",
    }
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionXLInpaintPipeline"
    )
    ordinary = (exports("kohya_sgm") / "fuseline.json").read_text()
    assert '"kind"' not in ordinary
    assert ModelManifest.read(exports("kohya_sgm")).checkpoint.kind is None


def test_an_inpainting_template_with_a_refiner_is_refused_before_writing(kit, tmp_path):
    # An inpainting checkpoint serves inpaint jobs only; a refiner finishes text-to-image jobs only.
    out = tmp_path / "inpaint-refined"
    with pytest.raises(StageError, match=r"inpainting checkpoint.*names refiner 'ref'") as info:
        merge_template(
            kit.inpaint_dir,
            kit.vae_dir,
            [],
            out,
            identity=dataclasses.replace(IDENTITY, refiner="ref"),
            prediction_type="epsilon",
            shard_size_mb=SHARD_MB,
        )
    assert info.value.code == "REFINER_INVALID" and not out.exists()
