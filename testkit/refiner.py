"""A tiny SDXL refiner beside the kit's tiny SDXL base: the refiner's layout (only the OpenCLIP text
encoder, a four-level UNet with aesthetic-score conditioning, `requires_aesthetics_score`), small enough
for CPU tests.

`build_refiner(root)` writes, under `root`:
  sdxl-refiner-tiny.safetensors   the refiner in the SGM single-file layout (text encoder as embedder 0)
  refiner-config/                 its diffusers layout without weights (`from_single_file(config=...)`)
  refiner-diffusers/              the same as a StableDiffusionXLImg2ImgPipeline folder (fp32)
Its text encoder 2, tokenizer 2 and VAE are the kit base's (same seeds), as SDXL refiner 1.0's OpenCLIP
encoder is SDXL base 1.0's: the worker shares an identical encoder between the two.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuseline.core.files import local_lock
from testkit.models import (
    ADDITION_TIME_EMBED_DIM,
    SCHEDULER_CONFIG,
    TEXT_ENCODER_2_CONFIG,
    build_pipeline,
    kit_fingerprint,
    write_config_dir,
)

REFINER_SEED = 6
MARKER_NAME = ".fuseline-refiner-complete"

REFINER_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    # SDXL refiner's shape: attention only at the two middle levels of four.
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64, 64),
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "attention_head_dim": (2, 4, 4, 4),
    # Only encoder 2 conditions the refiner.
    "cross_attention_dim": TEXT_ENCODER_2_CONFIG["hidden_size"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
    # pooled text embeds + 5 micro-conditioning values (original size, crop, aesthetic score).
    "projection_class_embeddings_input_dim": TEXT_ENCODER_2_CONFIG["projection_dim"]
    + 5 * ADDITION_TIME_EMBED_DIM,
    "norm_num_groups": 32,
}


@dataclass(frozen=True)
class RefinerKit:
    root: Path
    single_file: Path
    config_dir: Path
    diffusers_dir: Path


def refiner_paths(root: Path) -> RefinerKit:
    root = Path(root)
    return RefinerKit(
        root=root,
        single_file=root / "sdxl-refiner-tiny.safetensors",
        config_dir=root / "refiner-config",
        diffusers_dir=root / "refiner-diffusers",
    )


def build_refiner_pipeline():
    """The tiny refiner in memory, fp32, same weights every call (encoder 2 and VAE: the kit base's)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    base = build_pipeline()
    torch.manual_seed(REFINER_SEED)
    unet = UNet2DConditionModel(**REFINER_UNET_CONFIG).eval()
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def build_refiner(root: Path) -> RefinerKit:
    """Build the tiny refiner under `root`, or return the one already there (same kit fingerprint)."""
    from testkit.sgm import write_single_file

    kit = refiner_paths(root)
    kit.root.mkdir(parents=True, exist_ok=True)
    marker = kit.root / MARKER_NAME
    with local_lock(kit.root / ".refiner.lock"):
        try:
            if json.loads(marker.read_text()).get("fingerprint") == kit_fingerprint():
                return kit
        except (OSError, ValueError):
            pass
        marker.unlink(missing_ok=True)
        for stale in (kit.config_dir, kit.diffusers_dir):
            shutil.rmtree(stale, ignore_errors=True)
        pipe = build_refiner_pipeline()
        pipe.save_pretrained(kit.diffusers_dir, safe_serialization=True)
        write_config_dir(kit.diffusers_dir, kit.config_dir)
        write_single_file(pipe, kit.single_file)
        marker.write_text(json.dumps({"fingerprint": kit_fingerprint()}))
    return kit
