"""The kit's single-file SGM checkpoint, checked against diffusers' own SGM -> diffusers conversion."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from testkit.models import Kit
from testkit.sgm import (
    TEXT_ENCODER_2_PREFIX,
    UnmappedKeyError,
    open_clip_to_sgm,
    unet_block_names,
    unet_key_to_sgm,
)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def single_file_keys(kit: Kit) -> dict[str, tuple[int, ...]]:
    with safe_open(str(kit.single_file), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def test_from_single_file_gives_back_every_tensor_bit_for_bit(kit: Kit, kit_pipeline, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(kit.single_file), config=str(kit.config_dir), local_files_only=True
    )
    for name in COMPONENTS:
        expected = getattr(kit_pipeline, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert got.keys() == expected.keys(), name
        for key, tensor in expected.items():
            assert got[key].device.type != "meta", f"{name}.{key} was never loaded"
            assert got[key].dtype == tensor.dtype, f"{name}.{key}"
            assert torch.equal(got[key], tensor), f"{name}.{key} differs after the round trip"
    assert type(loaded.scheduler).__name__ == "EulerDiscreteScheduler"


def test_single_file_uses_the_sgm_layout(kit: Kit, single_file_keys):
    prefixes = {
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.embedders.0.transformer.",
        "conditioner.embedders.1.model.",
    }
    assert {next(p for p in prefixes if k.startswith(p)) for k in single_file_keys} == prefixes
    # The key diffusers detects SDXL by.
    assert "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias" in single_file_keys
    te2 = json.loads((kit.config_dir / "text_encoder_2" / "config.json").read_text())
    hidden, projection = te2["hidden_size"], te2["projection_dim"]
    assert single_file_keys[f"{TEXT_ENCODER_2_PREFIX}transformer.resblocks.0.attn.in_proj_weight"] == (
        3 * hidden,
        hidden,
    )
    assert single_file_keys[f"{TEXT_ENCODER_2_PREFIX}text_projection"] == (hidden, projection)
    # SGM's VAE attention is 1x1 convolutions.
    assert len(single_file_keys["first_stage_model.decoder.mid.attn_1.q.weight"]) == 4
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in single_file_keys
    assert "model.diffusion_model.label_emb.0.0.weight" in single_file_keys
    with safe_open(str(kit.single_file), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118


def test_unet_block_table_matches_sdxl_numbering(kit_pipeline):
    blocks = unet_block_names(kit_pipeline.unet.config)
    assert blocks["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert blocks["down_blocks.1.attentions.0"] == "input_blocks.4.1"
    assert blocks["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert blocks["up_blocks.2.resnets.2"] == "output_blocks.8.0"
    assert (
        unet_key_to_sgm("down_blocks.1.resnets.0.conv_shortcut.weight", blocks)
        == "model.diffusion_model.input_blocks.4.0.skip_connection.weight"
    )


def test_unknown_keys_are_refused_by_name(kit_pipeline):
    blocks = unet_block_names(kit_pipeline.unet.config)
    with pytest.raises(UnmappedKeyError, match=r"down_blocks\.7\.resnets\.0\.conv1\.weight.*sgm\.py"):
        unet_key_to_sgm("down_blocks.7.resnets.0.conv1.weight", blocks)
    with pytest.raises(UnmappedKeyError, match="logit_scale"):
        open_clip_to_sgm({"logit_scale": torch.zeros(())})
