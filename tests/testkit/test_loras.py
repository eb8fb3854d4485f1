"""Each kit LoRA loads into the tiny SDXL with diffusers (the oracle for fuseline's merge) and does what
its seed says; the SD 1.5 one is refused."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from safetensors import safe_open

from testkit.loras import LORA_NAMES, SPECS, adapter_metadata, kit_lora_factors, lora_targets
from testkit.models import Kit

PLACEABLE = [name for name in LORA_NAMES if name != "sd15"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_fused(kit: Kit, name: str):
    """Load + fuse kit LoRA `name`; returns (pipeline, diffusers warnings, python warnings)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(kit.diffusers_dir, local_files_only=True)
    records = _Records()
    # diffusers' logger does not propagate to the root logger, so caplog would see nothing.
    logger = logging.getLogger("diffusers")
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(kit.loras[name]))
            pipe.fuse_lora()
    finally:
        logger.removeHandler(records)
    return pipe, records.messages, [str(w.message) for w in caught]


def _keys(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def _lora_modules(pipe) -> set[tuple[str, str]]:
    return {
        (component, name)
        for component in ("unet", "text_encoder", "text_encoder_2")
        for name, module in getattr(pipe, component).named_modules()
        if hasattr(module, "lora_A")
    }


@pytest.mark.parametrize("name", PLACEABLE)
def test_lora_loads_every_key_and_fuses_to_the_expected_weights(kit: Kit, kit_pipeline, name: str):
    pipe, logged, warned = _load_fused(kit, name)
    factors = kit_lora_factors(kit_pipeline, name)
    targeted = {f.target.component for f in factors}

    # The one diffusers warning allowed: a component the LoRA does not touch has no keys.
    unexpected = [
        m
        for m in logged
        if not any(
            m.startswith(f"No LoRA keys associated to {cls} found") and component not in targeted
            for cls, component in (
                ("CLIPTextModel", "text_encoder"),
                ("CLIPTextModelWithProjection", "text_encoder_2"),
            )
        )
    ]
    assert not unexpected, unexpected
    assert not [w for w in warned if "lora" in w.lower() or "alpha" in w.lower()], warned

    # Every module the file targets got a LoRA layer, and nothing else did.
    assert _lora_modules(pipe) == {(f.target.component, f.target.module) for f in factors}

    for f in factors:
        base = getattr(kit_pipeline, f.target.component).get_submodule(f.target.module).weight
        layer = getattr(pipe, f.target.component).get_submodule(f.target.module)
        fused = layer.base_layer.weight
        expected = base + f.delta()
        if f.magnitude is not None:  # DoRA: rescale each output row to the stored magnitude
            norm = expected.flatten(1).norm(dim=1)
            expected = (f.magnitude.float() / norm).reshape(-1, *[1] * (base.ndim - 1)) * expected
        assert not torch.equal(fused, base), f"{f.target} unchanged"
        torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5, msg=f"{name}: {f.target}")


def test_every_lora_has_alpha_unequal_to_rank():
    for spec in SPECS.values():
        assert spec.alpha != spec.rank, spec.name


def test_kohya_files_use_kohya_names(kit: Kit):
    sgm = _keys(kit.loras["kohya_sgm"])
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sgm
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2.lora_up.weight" in sgm
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.alpha" in sgm
    assert not [k for k in sgm if "down_blocks" in k or not k.startswith("lora_unet_")]

    diffusers_style = _keys(kit.loras["kohya_diffusers"])
    assert (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight"
        in diffusers_style
    )
    assert not [k for k in diffusers_style if "input_blocks" in k]

    te = _keys(kit.loras["kohya_te"])
    assert {k.split("_")[1] for k in te} == {"unet", "te1", "te2"}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in te
    assert [k for k in te if k.startswith("lora_te2_") and "_mlp_fc1." in k]
    assert [k for k in te if k.startswith("lora_te1_") and "_mlp_fc2." in k]


def test_locon_has_conv_and_linear_layers(kit: Kit):
    keys = _keys(kit.loras["locon"])
    rank = SPECS["locon"].rank
    conv_downs = {k: s for k, s in keys.items() if k.endswith(".lora_down.weight") and len(s) == 4}
    assert any("_in_layers_2." in k for k in conv_downs) and any("_out_layers_3." in k for k in conv_downs)
    assert any(s[2:] == (3, 3) and s[0] == rank for s in conv_downs.values())
    for k in conv_downs:
        up = keys[k.replace(".lora_down.", ".lora_up.")]
        assert len(up) == 4 and up[1:] == (rank, 1, 1), k
    assert [k for k, s in keys.items() if k.endswith(".lora_down.weight") and len(s) == 2]


@pytest.mark.parametrize("name", ["peft", "dora"])
def test_peft_files_carry_their_adapter_config(kit: Kit, kit_pipeline, name: str):
    keys = _keys(kit.loras[name])
    assert all(k.startswith("unet.") for k in keys)
    assert [k for k in keys if k.endswith(".lora_A.weight")]
    config = adapter_metadata(kit.loras[name])
    assert config["unet.r"] == SPECS[name].rank
    assert config["unet.lora_alpha"] == SPECS[name].alpha != config["unet.r"]
    assert config["unet.use_dora"] is (name == "dora")
    if name == "dora":
        assert [k for k in keys if k.endswith(".lora_magnitude_vector")]
    assert sorted(config["unet.target_modules"]) == sorted(t.module for t in lora_targets(kit_pipeline, name))


def test_sd15_lora_does_not_place_on_sdxl(kit: Kit):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(kit.diffusers_dir, local_files_only=True)
    with pytest.raises((ValueError, RuntimeError, KeyError)):
        pipe.load_lora_weights(str(kit.loras["sd15"]))
