"""The addon stage (stages/addon.py): every key of an add-on placed on the base of each template it is
offered with, formats diffusers' adapters cannot apply refused by name, the folder written atomically."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from fuseline.core.manifest import AddonManifest
from stages import addon as addon_stage
from stages.addon import check_addon, write_addon
from stages.errors import StageError
from stages.lora import LoraInput

RULES = {"default_scale": 0.5, "min_scale": 0.0, "max_scale": 1.0, "templates": None}


def lora(kit, name: str) -> LoraInput:
    return LoraInput(kit.loras[name], 1.0, f"file:{name}")


@pytest.mark.parametrize(
    ("name", "placed"),
    [
        ("kohya_sgm", {"unet": 576}),
        ("kohya_te", {"unet": 192, "text_encoder": 54, "text_encoder_2": 180}),
        ("peft", {"unet": 192}),
        ("dora", {"unet": 192}),
    ],
)
def test_loras_diffusers_applies_at_run_time_are_written_with_their_rules(
    kit, tmp_path, name, placed
) -> None:
    out = tmp_path / "addons" / name
    manifest = write_addon(name, lora(kit, name), RULES, {"tiny": kit.diffusers_dir}, out)
    assert manifest.placed_keys == placed
    assert sorted(p.name for p in out.iterdir()) == ["addon.json", "lora.safetensors"]
    assert (out / "lora.safetensors").read_bytes() == kit.loras[name].read_bytes()
    assert AddonManifest.read(out) == manifest
    assert (manifest.name, manifest.checked_on, manifest.default_scale) == (name, ["tiny"], 0.5)


def test_a_lora_of_another_family_fails_placement_and_writes_nothing(kit, tmp_path) -> None:
    out = tmp_path / "addons" / "old"
    with pytest.raises(StageError) as caught:
        write_addon("old", lora(kit, "sd15"), RULES, {"tiny": kit.diffusers_dir}, out)
    assert caught.value.code == "LORA_PLACEMENT" and "cannot be placed on the base model" in str(caught.value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a", "LyCORIS LoHa"),
        ("lora_unet_down_blocks_1_attentions_0_proj_in.lokr_w1", "LyCORIS LoKr"),
        ("lora_unet_down_blocks_1_attentions_0_proj_in.lora_mid.weight", "LyCORIS LoCon"),
        ("lora_unet_down_blocks_1_attentions_0_proj_in.dora_scale", "kohya-format DoRA (dora_scale)"),
    ],
)
def test_formats_the_adapters_cannot_apply_are_refused_by_name(kit, tmp_path, key, what) -> None:
    path = tmp_path / "x.safetensors"
    save_file({key: torch.zeros(2, 2)}, str(path))
    with pytest.raises(StageError) as caught:
        check_addon("x", LoraInput(path, 1.0, "file:x"), {"tiny": kit.diffusers_dir})
    assert caught.value.code == "ADDON_FORMAT"
    assert f"is {what} (key {key}), which diffusers' adapters cannot apply" in str(caught.value)
    assert "fuse it into a template's loras instead" in str(caught.value)


def test_the_stage_checks_the_bases_of_the_templates_it_is_offered_with(kit, tmp_path, monkeypatch) -> None:
    """main() as dvc runs it, in a project folder: the catalog's add-on, fetched (file:), checked on the
    checkpoint of its one template (the other checkpoint, which it would fail on, is not consulted)."""
    bases = tmp_path / "artifacts" / "base"
    shutil.copytree(kit.diffusers_dir, bases / "tiny", symlinks=True)
    (bases / "other").mkdir()  # not a converted checkpoint: checking on it would fail
    catalog = {
        "version": 1,
        "vae": {"source": "file:vae"},
        "checkpoints": {
            "tiny": {"source": "file:tiny.safetensors"},
            "other": {"source": "file:o.safetensors"},
        },
        "templates": {"a": {"checkpoint": "tiny"}, "b": {"checkpoint": "other"}},
        "addons": {"style": {"source": f"file:{kit.loras['peft']}", "max_scale": 1.5, "templates": ["a"]}},
    }
    (tmp_path / "templates.json").write_text(json.dumps(catalog))
    monkeypatch.chdir(tmp_path)
    addon_stage.main("style", bases=bases, out=tmp_path / "artifacts/addons/style")
    manifest = AddonManifest.read(tmp_path / "artifacts/addons/style")
    assert (manifest.checked_on, manifest.templates, manifest.max_scale) == (["tiny"], ["a"], 1.5)
    assert manifest.source == f"file:{kit.loras['peft']}"

    # Offered with every template: the other checkpoint is checked too, and its missing base named.
    catalog["addons"]["style"].pop("templates")
    (tmp_path / "templates.json").write_text(json.dumps(catalog))
    with pytest.raises(StageError, match=r"BASE_MISSING.*run `dvc repro convert@other`"):
        addon_stage.main("style", bases=bases, out=tmp_path / "artifacts/addons/style2")
    with pytest.raises(StageError, match=r"ADDON_UNKNOWN.*add-ons: style"):
        addon_stage.main("nope", bases=bases, out=tmp_path / "x")
