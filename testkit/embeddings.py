"""Textual-inversion embeddings for the tiny SDXL kit: safetensors files laid out as SDXL embeddings are
(`clip_l` vectors for text encoder 1, `clip_g` for text encoder 2, the same count in both), sized for the
kit's two text encoders, random from fixed seeds. Also an SD 1.x-layout file (`emb_params`), which fuseline
must refuse by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from testkit.models import TEXT_ENCODER_2_CONFIG, TEXT_ENCODER_CONFIG


@dataclass(frozen=True)
class EmbeddingSpec:
    name: str
    seed: int
    vectors: int
    # Far from the kit's token embeddings (std 0.02 at init): the embedding visibly changes an encoding.
    std: float = 1.0


EMBEDDINGS: dict[str, EmbeddingSpec] = {
    spec.name: spec
    for spec in (
        EmbeddingSpec("single", seed=201, vectors=1),
        EmbeddingSpec("triple", seed=202, vectors=3),
    )
}


def embedding_tensors(spec: EmbeddingSpec) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(spec.seed)
    widths = {"clip_l": TEXT_ENCODER_CONFIG["hidden_size"], "clip_g": TEXT_ENCODER_2_CONFIG["hidden_size"]}
    return {
        key: torch.randn(spec.vectors, width, generator=generator) * spec.std for key, width in widths.items()
    }


def write_embedding(spec: EmbeddingSpec, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(embedding_tensors(spec), str(path))
    return path


def write_sd15_embedding(path: Path, vectors: int = 2) -> Path:
    """A1111's SD 1.x safetensors layout: one `emb_params` tensor for the one text encoder (768 wide)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": torch.zeros(vectors, 768)}, str(path))
    return path


def write_embeddings(root: Path) -> dict[str, Path]:
    """Every kit embedding under `root`, by name, plus "sd15" (the layout to refuse)."""
    paths = {name: write_embedding(spec, root / f"{name}.safetensors") for name, spec in EMBEDDINGS.items()}
    paths["sd15"] = write_sd15_embedding(root / "sd15.safetensors")
    return paths
