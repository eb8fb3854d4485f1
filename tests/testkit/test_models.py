"""The tiny SDXL pipeline, its config folder and the stand-in VAE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from testkit.models import MARKER_NAME, Kit, build_kit

COMPONENT_CONFIGS = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer_config.json",
)


def _config(kit: Kit, relpath: str) -> dict:
    return json.loads((kit.diffusers_dir / relpath).read_text())


def test_diffusers_folder_is_fp32_safetensors_without_variant(kit: Kit):
    weights = sorted(
        p.relative_to(kit.diffusers_dir).as_posix() for p in kit.diffusers_dir.rglob("*.safetensors")
    )
    assert weights == [
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    for relpath in weights:
        with safe_open(str(kit.diffusers_dir / relpath), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        assert dtypes == {"F32"}, relpath


def test_config_dir_has_every_config_and_no_weights(kit: Kit):
    for relpath in COMPONENT_CONFIGS:
        assert (kit.config_dir / relpath).read_bytes() == (kit.diffusers_dir / relpath).read_bytes(), relpath
    assert (kit.config_dir / "tokenizer" / "tokenizer.json").is_file()
    assert (kit.config_dir / "tokenizer_2" / "tokenizer.json").is_file()
    assert not [p for p in kit.config_dir.rglob("*") if p.suffix in {".safetensors", ".bin"}]


def test_model_shapes_follow_sdxl(kit: Kit):
    unet = _config(kit, "unet/config.json")
    te1 = _config(kit, "text_encoder/config.json")
    te2 = _config(kit, "text_encoder_2/config.json")
    vae = _config(kit, "vae/config.json")
    assert list(unet["down_block_types"]) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert max(unet["transformer_layers_per_block"]) > 1
    assert unet["addition_embed_type"] == "text_time"
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert (
        unet["projection_class_embeddings_input_dim"]
        == te2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    )
    # Equal widths make diffusers' single-file loader fill encoder 2 with encoder 1's weights.
    assert te1["hidden_size"] != te2["hidden_size"]
    # diffusers detects SDXL by resblocks.9 of encoder 2.
    assert te2["num_hidden_layers"] >= 10
    assert len(vae["block_out_channels"]) == 4
    assert _config(kit, "model_index.json")["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]


def test_generates_a_64px_image(kit_pipeline):
    image = kit_pipeline(
        prompt="a photo of a cat",
        num_inference_steps=3,
        height=64,
        width=64,
        guidance_scale=4.5,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.01


def test_fp16_fix_vae_stand_in_has_same_config_other_weights(kit: Kit):
    from diffusers import AutoencoderKL

    ours = AutoencoderKL.from_pretrained(kit.vae_dir, local_files_only=True)
    base = AutoencoderKL.from_pretrained(kit.diffusers_dir / "vae", local_files_only=True)
    assert {k: v for k, v in ours.config.items() if k != "_name_or_path"} == {
        k: v for k, v in base.config.items() if k != "_name_or_path"
    }
    a, b = ours.state_dict(), base.state_dict()
    assert a.keys() == b.keys()
    assert not torch.equal(a["decoder.conv_out.weight"], b["decoder.conv_out.weight"])


def test_build_kit_returns_a_complete_kit_without_rebuilding(kit: Kit):
    unet = kit.diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet.stat().st_mtime_ns
    again = build_kit(kit.root)
    assert again == kit
    assert unet.stat().st_mtime_ns == before


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_build_is_deterministic_and_rebuilds_an_incomplete_kit(kit: Kit, tmp_path):
    other = build_kit(tmp_path / "kit")
    files = sorted(p.relative_to(kit.root) for p in kit.root.rglob("*") if p.is_file() and p.name != ".lock")
    assert files == sorted(
        p.relative_to(other.root) for p in other.root.rglob("*") if p.is_file() and p.name != ".lock"
    )
    for relpath in files:
        if relpath.suffix == ".safetensors":
            a, b = _tensors(kit.root / relpath), _tensors(other.root / relpath)
            assert a.keys() == b.keys(), relpath
            assert all(torch.equal(a[k], b[k]) for k in a), relpath
        else:
            assert (kit.root / relpath).read_bytes() == (other.root / relpath).read_bytes(), relpath

    # No marker (as after a crash mid-build): the next call rebuilds instead of trusting the folder.
    (other.root / MARKER_NAME).unlink()
    (other.single_file).write_bytes(b"torn")
    rebuilt = build_kit(other.root)
    assert (rebuilt.root / MARKER_NAME).is_file()
    assert rebuilt.single_file.stat().st_size > 1000


@pytest.mark.parametrize("name", ["kohya_sgm", "peft"])
def test_a_fused_lora_visibly_changes_the_image(kit: Kit, kit_pipeline, name: str):
    from diffusers import StableDiffusionXLPipeline

    def render(pipe):
        return pipe(
            prompt="a photo of a cat",
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images

    fused = StableDiffusionXLPipeline.from_pretrained(kit.diffusers_dir, local_files_only=True)
    fused.load_lora_weights(str(kit.loras[name]))
    fused.fuse_lora()
    assert np.abs(render(fused) - render(kit_pipeline)).mean() > 0.01


def test_block_vae_reproduces_block_pictures_after_fp16_storage(kit: Kit):
    """The block VAE (testkit.block_vae) gives back a picture of 8x8 one-colour blocks exactly, also with its
    weights rounded to fp16 as an export stores them, and its latents spread like SDXL's (std ~1)."""
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    vae = AutoencoderKL.from_pretrained(kit.block_vae_dir, local_files_only=True).half().float()
    blocks = np.random.default_rng(0).integers(0, 256, (8, 12, 3)).astype(np.uint8)
    picture = np.kron(blocks, np.ones((8, 8, 1), np.uint8))
    pixels = VaeImageProcessor().preprocess(Image.fromarray(picture))
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
        decoded = vae.decode(latents).sample
    back = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round()[0].permute(1, 2, 0).numpy()
    assert latents.shape == (1, 4, 8, 12)
    assert np.abs(back - picture).max() == 0
    assert 0.8 < float(latents.std()) < 1.3


def test_inpainting_model_shares_all_but_a_9_channel_unet(kit: Kit):
    index = json.loads((kit.inpaint_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline"
    unet = json.loads((kit.inpaint_dir / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 9 and unet["out_channels"] == 4
    for component in ("vae", "text_encoder", "text_encoder_2"):
        (weights,) = (kit.inpaint_dir / component).glob("*.safetensors")
        assert weights.read_bytes() == (kit.diffusers_dir / component / weights.name).read_bytes(), component
    header = _tensors(kit.inpaint_single_file)["model.diffusion_model.input_blocks.0.0.weight"]
    assert header.shape[1] == 9
