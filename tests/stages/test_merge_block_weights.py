"""Block weights in the merge: a hand oracle per block group, and the stage end to end from the catalog.

Hand oracle: a kohya LoRA (original SGM names, as kohya's SDXL trainer writes them) on one or two layers of
each block group: text encoders (BASE), input blocks with and without attention, their downsamplers and
conv_in, the middle block, output blocks with their upsamplers, and time_embedding (in no block). The block
of each layer is written out here, by hand; the expected fused weight is base + scale * weight(block) *
alpha/r * up @ down in fp32, cast to fp16, and the export must be within 1 fp16 ulp of it (bit-identical to
the base where the weight is 0).
"""

from __future__ import annotations

import json

import pytest
import torch

from fuseline.core.manifest import ModelManifest
from stages.errors import StageError
from stages.lora import LoraInput
from stages.merge import main, merge_template
from testkit.loras import KOHYA_PREFIX, LoraTarget, kohya_name, random_pair
from tests.stages.test_merge_oracle import (
    IDENTITY,
    PATHS,
    SHARD_MB,
    _project,
    read_base_tensors,
    read_variant_tensors,
    ulp_distance,
)

# (component, module, block) with the block read off the SGM layout by hand (tests/test_block_weights.py).
TARGETS = [
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", "BASE"),
    ("text_encoder_2", "text_model.encoder.layers.9.mlp.fc1", "BASE"),
    ("unet", "conv_in", "IN00"),
    ("unet", "down_blocks.0.resnets.0.conv1", "IN01"),
    ("unet", "down_blocks.0.downsamplers.0.conv", "IN03"),
    ("unet", "down_blocks.1.attentions.0.proj_in", "IN04"),
    ("unet", "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k", "IN05"),
    ("unet", "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.2", "IN08"),
    ("unet", "mid_block.attentions.0.proj_in", "MID"),
    ("unet", "mid_block.resnets.1.conv2", "MID"),
    ("unet", "up_blocks.0.attentions.0.transformer_blocks.1.attn1.to_v", "OUT00"),
    ("unet", "up_blocks.0.upsamplers.0.conv", "OUT02"),
    ("unet", "up_blocks.1.attentions.2.proj_out", "OUT05"),
    ("unet", "up_blocks.2.resnets.2.conv1", "OUT08"),
    ("unet", "time_embedding.linear_1", None),
]
BLOCKS_20 = ["BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9))]
# Distinct weights, some negative, so that a value landing in the wrong block shows.
WEIGHTS_20 = [
    0.9,
    0.3,
    -0.4,
    0.5,
    1.3,
    0.25,
    -0.75,
    0.6,
    1.1,
    0.7,
    0.35,
    1.2,
    -0.5,
    0.8,
    0.45,
    1.4,
    0.15,
    0.65,
    0.55,
    1.5,
]
BLOCKS_12 = [
    "BASE",
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "MID",
    "OUT00",
    "OUT01",
    "OUT02",
    "OUT03",
    "OUT04",
    "OUT05",
]
WEIGHTS_12 = [0.9, 1.3, 0.25, 0.6, 1.1, 0.35, -0.5, 0.8, 0.45, 1.4, 0.15, 0.65]
RANK, ALPHA, SCALE = 4, 2.0, 0.8


@pytest.fixture(scope="module")
def block_lora(kit, kit_pipeline, tmp_path_factory):
    """(path, {(component, tensor): (up, down)}) of a kohya LoRA on TARGETS, fp16 factors."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(31)
    state, factors = {}, {}
    for component, module, _ in TARGETS:
        model = getattr(kit_pipeline, component)
        layer = model.get_submodule(
            module.removeprefix("text_model.") if component == "text_encoder" else module
        )
        target = LoraTarget(component, module, tuple(layer.weight.shape))
        down, up = (t.half() for t in random_pair(generator, target.weight_shape, RANK))
        name = kohya_name(target, kit_pipeline, sgm_layout=True)
        assert name.startswith(KOHYA_PREFIX[component])
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        state[f"{name}.alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
        tensor = f"{module.removeprefix('text_model.') if component == 'text_encoder' else module}.weight"
        factors[(component, tensor)] = (up, down)
    path = tmp_path_factory.mktemp("block-lora") / "blocks.safetensors"
    save_file(state, str(path))
    return path, factors


def _merge(kit, path, out, block_weights):
    lora = LoraInput(path=path, scale=SCALE, name="file:blocks.safetensors", block_weights=block_weights)
    return merge_template(
        kit.diffusers_dir,
        kit.vae_dir,
        [lora],
        out,
        identity=IDENTITY,
        prediction_type="epsilon",
        shard_size_mb=SHARD_MB,
    )


@pytest.mark.parametrize(("blocks", "weights"), [(BLOCKS_20, WEIGHTS_20), (BLOCKS_12, WEIGHTS_12)])
def test_each_block_group_is_fused_at_scale_times_its_block_weight(
    kit, block_lora, tmp_path, blocks, weights
):
    path, factors = block_lora
    by_block = dict(zip(blocks, weights, strict=True))
    result = _merge(kit, path, tmp_path / "out", tuple(weights))
    assert result.manifest.loras[0].block_weights == weights
    exported = {
        c: read_variant_tensors(tmp_path / "out" / c) for c in ("unet", "text_encoder", "text_encoder_2")
    }
    base = {c: read_base_tensors(kit.diffusers_dir / c) for c in exported}
    for (component, module, block), key in zip(TARGETS, factors, strict=True):
        # time_embedding is in no block: weight 1; a block a 12-value list leaves out: weight 0
        weight = 1.0 if block is None else by_block.get(block, 0.0)
        up, down = factors[key]
        original = base[component][key[1]]
        delta = (up.float().flatten(1) @ down.float().flatten(1)).reshape(original.shape)
        expected = (original + SCALE * weight * (ALPHA / RANK) * delta).half()
        ours = exported[component][key[1]]
        if weight == 0.0:
            assert torch.equal(ours, original.half()), f"{module} ({block}) must be untouched"
        else:
            assert ulp_distance(ours, expected) <= 1, f"{module} ({block}, weight {weight})"
            assert not torch.equal(ours, original.half()), module


def test_weights_of_one_in_every_listed_block_give_the_plain_merge(kit, block_lora, tmp_path):
    """20 ones = no block weights at all: same tensors, bit for bit (the manifest records the list)."""
    path, _ = block_lora
    _merge(kit, path, tmp_path / "ones", (1.0,) * 20)
    _merge(kit, path, tmp_path / "plain", None)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        ones, plain = (read_variant_tensors(tmp_path / name / component) for name in ("ones", "plain"))
        assert all(torch.equal(ones[k], plain[k]) for k in plain), component
    assert "block_weights" not in json.loads((tmp_path / "plain" / "fuseline.json").read_text())["loras"][0]


def test_stage_applies_a_preset_from_the_catalog(kit, tmp_path, monkeypatch):
    """main(): templates.json names a preset; the merge fuses its values and the manifest records them.
    SDXL-OUTALL on an attention LoRA with text encoder layers: the text encoders (BASE) and the output
    blocks change, the input and middle blocks do not."""
    loras = [{"source": "file:loras/kohya_te.safetensors", "scale": 0.7, "block_weights": "SDXL-OUTALL"}]
    project = _project(tmp_path, kit, loras)
    monkeypatch.chdir(project)
    main("demo", **PATHS)
    out = project / "artifacts" / "models" / "demo"
    manifest = ModelManifest.read(out)
    assert manifest.loras[0].block_weights == [1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    _merge_kohya_te = LoraInput(
        path=kit.loras["kohya_te"], scale=0.7, name="x", block_weights=(1.0,) + (0.0,) * 5 + (1.0,) * 6
    )
    merge_template(
        kit.diffusers_dir, kit.vae_dir, [_merge_kohya_te], tmp_path / "ref", identity=IDENTITY,
        prediction_type="v_prediction", shard_size_mb=SHARD_MB,
    )  # fmt: skip
    unet, ref = read_variant_tensors(out / "unet"), read_variant_tensors(tmp_path / "ref" / "unet")
    assert all(torch.equal(unet[k], ref[k]) for k in ref)
    base = read_base_tensors(kit.diffusers_dir / "unet")
    changed = {k for k in base if not torch.equal(unet[k], base[k].half())}
    assert changed and all(k.startswith("up_blocks.") for k in changed)
    te = read_variant_tensors(out / "text_encoder_2")
    assert any(
        not torch.equal(te[k], v.half())
        for k, v in read_base_tensors(kit.diffusers_dir / "text_encoder_2").items()
    )


def test_block_weights_on_a_unet_that_is_not_sdxl_shaped_are_refused(kit, block_lora, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(kit.diffusers_dir, base)
    config = json.loads((base / "unet" / "config.json").read_text())
    config["down_block_types"] = [*config["down_block_types"], "DownBlock2D"]
    (base / "unet" / "config.json").write_text(json.dumps(config))
    lora = LoraInput(path=block_lora[0], scale=1.0, name="file:blocks.safetensors", block_weights=(1.0,) * 12)
    with pytest.raises(StageError, match="remove block_weights") as err:
        merge_template(
            base, kit.vae_dir, [lora], tmp_path / "out", identity=IDENTITY, prediction_type="epsilon",
            shard_size_mb=SHARD_MB,
        )  # fmt: skip
    assert err.value.code == "BLOCK_WEIGHTS_UNSUPPORTED" and not (tmp_path / "out").exists()
