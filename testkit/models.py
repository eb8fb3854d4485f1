"""Tiny SDXL-shaped models built from configs with fixed seeds: the offline kit every other test uses.

`build_kit(root)` writes, under `root`:
  diffusers/        a tiny StableDiffusionXLPipeline (fp32 safetensors, no variant)
  config/           the same layout without weights (usable as `from_single_file(config=...)`)
  sdxl-tiny.safetensors   the same weights in the original SGM/LDM single-file key layout
  vae/              a second tiny AutoencoderKL (other seed): stand-in for the fp16-fix VAE
  block-vae/        an AutoencoderKL set by hand to reproduce 8x8-block pictures (testkit.block_vae)
  inpaint/          a tiny SDXL inpainting pipeline: the same text encoders and VAE, a 9-channel UNet
  sdxl-tiny-inpaint.safetensors   that inpainting model as an SGM/LDM single file
  loras/<name>.safetensors   LoRA files in the formats fuseline must handle (see testkit.loras)
and writes its marker file last, so an interrupted build is never taken for a complete one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuseline.core.files import local_lock

# Bump when what the kit writes changes for a reason its sources do not show (the marker also records a
# hash of the kit's source files and library versions, so editing them rebuilds cached kits by itself).
KIT_VERSION = "1"
KIT_SOURCES = ("models.py", "tokenizers.py", "sgm.py", "loras.py", "block_vae.py")
MARKER_NAME = ".fuseline-kit-complete"

# Every component gets its own seed so that changing one never reshuffles the others.
SEEDS = {"unet": 1, "vae": 2, "text_encoder": 3, "text_encoder_2": 4, "fp16_fix_vae": 5, "inpaint_unet": 6}

# Text encoder widths differ on purpose: with equal widths diffusers' single-file loader puts encoder 1's
# weights into encoder 2 without an error. Encoder 2 needs >= 10 layers: diffusers detects SDXL by
# `conditioner.embedders.1.model.transformer.resblocks.9...`.
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 10,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    # Not equal to hidden_size, so a transposed text_projection cannot load by accident.
    "projection_dim": 48,
}

ADDITION_TIME_EMBED_DIM = 8
UNET_CONFIG: dict[str, Any] = {
    # 8 latent pixels -> pipeline default of 64 px images.
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    # > 1 somewhere, as in SDXL's (1, 2, 10): LoRA and single-file key maps must handle several blocks.
    "transformer_layers_per_block": (1, 1, 2),
    # SDXL's config names the head count `attention_head_dim`; kept that way so key handling matches.
    "attention_head_dim": (2, 4, 4),
    "cross_attention_dim": TEXT_ENCODER_CONFIG["hidden_size"] + TEXT_ENCODER_2_CONFIG["hidden_size"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
    # pooled text embeds (te2 projection) + 6 micro-conditioning values (sizes, crop) embedded each.
    "projection_class_embeddings_input_dim": TEXT_ENCODER_2_CONFIG["projection_dim"]
    + 6 * ADDITION_TIME_EMBED_DIM,
    "norm_num_groups": 32,
}

# An inpainting checkpoint's UNet (SDXL inpainting 0.1's layout): 4 latent + 1 mask + 4 masked-image channels.
INPAINT_UNET_CONFIG: dict[str, Any] = {**UNET_CONFIG, "in_channels": 9}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    # SDXL's VAE values.
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (the values the scheduler takes).
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


@dataclass(frozen=True)
class Kit:
    root: Path
    diffusers_dir: Path
    config_dir: Path
    single_file: Path
    vae_dir: Path
    loras: dict[str, Path]
    block_vae_dir: Path
    inpaint_dir: Path
    inpaint_single_file: Path


def kit_paths(root: Path) -> Kit:
    from testkit.loras import LORA_NAMES

    root = Path(root)
    return Kit(
        root=root,
        diffusers_dir=root / "diffusers",
        config_dir=root / "config",
        single_file=root / "sdxl-tiny.safetensors",
        vae_dir=root / "vae",
        loras={name: root / "loras" / f"{name}.safetensors" for name in LORA_NAMES},
        block_vae_dir=root / "block-vae",
        inpaint_dir=root / "inpaint",
        inpaint_single_file=root / "sdxl-tiny-inpaint.safetensors",
    )


def _text_encoder_config(base: dict[str, Any]):
    from transformers import CLIPTextConfig

    from testkit import tokenizers

    return CLIPTextConfig(
        **base,
        vocab_size=tokenizers.vocab_size(),
        bos_token_id=tokenizers.token_id(tokenizers.BOS_TOKEN),
        eos_token_id=tokenizers.token_id(tokenizers.EOS_TOKEN),
        pad_token_id=tokenizers.token_id(tokenizers.EOS_TOKEN),
    )


def build_vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG).eval()


def build_pipeline():
    """The tiny SDXL pipeline in memory, fp32, same weights every call."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from testkit.tokenizers import build_tokenizers

    torch.manual_seed(SEEDS["unet"])
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    vae = build_vae(SEEDS["vae"])
    torch.manual_seed(SEEDS["text_encoder"])
    text_encoder = CLIPTextModel(_text_encoder_config(TEXT_ENCODER_CONFIG)).eval()
    torch.manual_seed(SEEDS["text_encoder_2"])
    text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(TEXT_ENCODER_2_CONFIG)).eval()
    tokenizer, tokenizer_2 = build_tokenizers()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )


def build_inpaint_pipeline(pipe=None):
    """The tiny SDXL inpainting pipeline: `pipe`'s (default: build_pipeline()'s) text encoders, tokenizers,
    VAE and scheduler with a 9-channel UNet of its own seed."""
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    pipe = pipe if pipe is not None else build_pipeline()
    torch.manual_seed(SEEDS["inpaint_unet"])
    unet = UNet2DConditionModel(**INPAINT_UNET_CONFIG).eval()
    return StableDiffusionXLInpaintPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        unet=unet,
        scheduler=pipe.scheduler,
    )


def write_config_dir(diffusers_dir: Path, config_dir: Path) -> None:
    """Copy every config and tokenizer file of a pipeline folder, leaving the weights behind."""
    for path in sorted(diffusers_dir.rglob("*")):
        if path.is_file() and path.suffix != ".safetensors":
            target = config_dir / path.relative_to(diffusers_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def kit_fingerprint() -> str:
    """What a cached kit must have been built by: this KIT_VERSION, these sources, these libraries."""
    from importlib.metadata import version

    digest = hashlib.sha256(KIT_VERSION.encode())
    for name in KIT_SOURCES:
        digest.update((Path(__file__).parent / name).read_bytes())
    for package in ("torch", "diffusers", "transformers", "peft", "safetensors"):
        digest.update(f"{package}=={version(package)}".encode())
    return digest.hexdigest()


def _is_complete(root: Path) -> bool:
    marker = root / MARKER_NAME
    try:
        return json.loads(marker.read_text()).get("fingerprint") == kit_fingerprint()
    except (OSError, ValueError):
        return False


def build_kit(root: Path) -> Kit:
    """Build the kit under `root`, or return the one already there (complete, same `kit_fingerprint()`)."""
    kit = kit_paths(root)
    kit.root.mkdir(parents=True, exist_ok=True)
    if _is_complete(kit.root):
        return kit
    # A lock, so that parallel test processes sharing FUSELINE_KIT_DIR build once.
    with local_lock(kit.root / ".lock"):
        if _is_complete(kit.root):
            return kit
        _build(kit)
    return kit


def _build(kit: Kit) -> None:
    from testkit.block_vae import build_block_vae
    from testkit.loras import write_loras
    from testkit.sgm import write_single_file

    (kit.root / MARKER_NAME).unlink(missing_ok=True)
    for stale in (
        kit.diffusers_dir,
        kit.config_dir,
        kit.vae_dir,
        kit.block_vae_dir,
        kit.inpaint_dir,
        kit.root / "loras",
    ):
        shutil.rmtree(stale, ignore_errors=True)
    kit.single_file.unlink(missing_ok=True)
    kit.inpaint_single_file.unlink(missing_ok=True)

    pipe = build_pipeline()
    pipe.save_pretrained(kit.diffusers_dir, safe_serialization=True)
    write_config_dir(kit.diffusers_dir, kit.config_dir)
    build_vae(SEEDS["fp16_fix_vae"]).save_pretrained(kit.vae_dir, safe_serialization=True)
    write_single_file(pipe, kit.single_file)
    build_block_vae().save_pretrained(kit.block_vae_dir, safe_serialization=True)
    inpaint = build_inpaint_pipeline(pipe)
    inpaint.save_pretrained(kit.inpaint_dir, safe_serialization=True)
    write_single_file(inpaint, kit.inpaint_single_file)
    write_loras(pipe, kit.loras)
    (kit.root / MARKER_NAME).write_text(
        json.dumps({"version": KIT_VERSION, "fingerprint": kit_fingerprint()})
    )
