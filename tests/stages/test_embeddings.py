"""Textual-inversion embeddings at build time (stages/embeddings.py, the merge's copy into the export, the
fetch group): SDXL files with clip_l/clip_g fitting the base's text encoders pass, anything else fails
naming the file, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fuseline.core.catalog.loading import parse_catalog
from fuseline.core.manifest import CheckpointRef, ModelManifest, VaeRef
from stages.embeddings import EmbeddingInput, check_tokens_free, read_embedding, text_encoder_widths
from stages.errors import StageError
from stages.fetch import group_sources
from stages.merge import TemplateIdentity, merge_template, read_base_layout

IDENTITY = TemplateIdentity(
    template="emb",
    checkpoint=CheckpointRef(id="tiny", source="file:tiny"),
    vae=VaeRef(source="file:vae"),
    spec_hash="e" * 64,
)


@pytest.fixture(scope="module")
def widths(kit) -> dict[str, int]:
    shapes, _ = read_base_layout(kit.diffusers_dir)
    return text_encoder_widths(shapes)


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def test_the_kit_embeddings_fit_the_kit_encoders(kit_embeddings, widths) -> None:
    assert widths == {"text_encoder": 32, "text_encoder_2": 64}
    single = read_embedding(EmbeddingInput(kit_embeddings["single"], "one", "file:single"), widths)
    triple = read_embedding(EmbeddingInput(kit_embeddings["triple"], "three", "file:triple"), widths)
    assert (single.vectors, triple.vectors) == (1, 3)
    assert len(triple.sha256) == 64


@pytest.mark.parametrize(
    ("tensors", "code", "words"),
    [
        (
            {"emb_params": torch.zeros(2, 768)},
            "EMBEDDING_NOT_SDXL",
            "holds emb_params, not the clip_l and clip_g",
        ),
        ({"clip_l": torch.zeros(2, 32)}, "EMBEDDING_INVALID", "lacks clip_g"),
        (
            {"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(2, 64), "extra": torch.zeros(1)},
            "EMBEDDING_INVALID",
            "has extra tensors extra",
        ),
        (
            {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 64)},
            "EMBEDDING_SHAPE",
            "clip_l is F32 [2, 768]",
        ),
        (
            {"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(3, 64)},
            "EMBEDDING_SHAPE",
            "clip_l has 2 vectors",
        ),
        (
            {"clip_l": torch.zeros(2, 32, dtype=torch.int64), "clip_g": torch.zeros(2, 64)},
            "EMBEDDING_SHAPE",
            "I64",
        ),
    ],
)
def test_files_that_are_not_sdxl_embeddings_of_this_base_are_refused(tmp_path, widths, tensors, code, words):
    path = write(tmp_path / "e.safetensors", tensors)
    with pytest.raises(StageError) as caught:
        read_embedding(EmbeddingInput(path, "tok", "file:e"), widths)
    assert caught.value.code == code
    assert str(caught.value).startswith(f"[{code}] embedding tok (file:e): ") and words in str(caught.value)


def test_a_pickle_a_truncated_file_and_a_wrong_pin_are_refused(tmp_path, kit_embeddings, widths) -> None:
    pickle = tmp_path / "e.safetensors"
    torch.save({"clip_l": torch.zeros(1, 32)}, pickle)
    with pytest.raises(StageError, match="EMBEDDING_PICKLE"):
        read_embedding(EmbeddingInput(pickle, "tok", "file:e"), widths)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(kit_embeddings["triple"].read_bytes()[:-10])
    with pytest.raises(StageError, match="EMBEDDING_TRUNCATED"):
        read_embedding(EmbeddingInput(truncated, "tok", "file:t"), widths)
    with pytest.raises(StageError, match="EMBEDDING_SHA256_MISMATCH"):
        read_embedding(EmbeddingInput(kit_embeddings["single"], "tok", "file:s", sha256="0" * 64), widths)


def test_a_token_the_tokenizer_already_has_is_refused(kit, kit_embeddings, widths) -> None:
    loaded = read_embedding(EmbeddingInput(kit_embeddings["triple"], "a", "file:triple"), widths)
    # "a" is a token of the kit's byte-level vocab, as most short words are of CLIP's.
    with pytest.raises(
        StageError, match=r"EMBEDDING_TOKEN_TAKEN.*a is already a token of the checkpoint's tokenizer"
    ):
        check_tokens_free(kit.diffusers_dir, [loaded])
    free = read_embedding(EmbeddingInput(kit_embeddings["triple"], "embTrio", "file:triple"), widths)
    check_tokens_free(kit.diffusers_dir, [free])


def test_the_merge_copies_embeddings_into_the_export_and_names_them(kit, kit_embeddings, tmp_path) -> None:
    out = tmp_path / "emb"
    merge_template(
        kit.diffusers_dir,
        kit.vae_dir,
        [],
        out,
        identity=IDENTITY,
        prediction_type="epsilon",
        shard_size_mb=100,
        embeddings=[
            EmbeddingInput(kit_embeddings["single"], "embOne", "file:single"),
            EmbeddingInput(kit_embeddings["triple"], "embThree", "file:triple"),
        ],
    )
    manifest = ModelManifest.read(out)
    assert [(e.token, e.vectors, e.file) for e in manifest.embeddings] == [
        ("embOne", 1, "embeddings/embOne.safetensors"),
        ("embThree", 3, "embeddings/embThree.safetensors"),
    ]
    assert (out / "embeddings/embThree.safetensors").read_bytes() == kit_embeddings["triple"].read_bytes()


def test_a_bad_embedding_fails_the_merge_before_anything_is_written(kit, kit_embeddings, tmp_path) -> None:
    out = tmp_path / "emb"
    with pytest.raises(StageError, match="EMBEDDING_NOT_SDXL"):
        merge_template(
            kit.diffusers_dir,
            kit.vae_dir,
            [],
            out,
            identity=IDENTITY,
            prediction_type="epsilon",
            shard_size_mb=100,
            embeddings=[EmbeddingInput(kit_embeddings["sd15"], "embOld", "file:sd15")],
        )
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_template_without_embeddings_writes_no_embeddings_key(kit, tmp_path) -> None:
    merge_template(
        kit.diffusers_dir,
        kit.vae_dir,
        [],
        tmp_path / "e",
        identity=IDENTITY,
        prediction_type="epsilon",
        shard_size_mb=100,
    )
    assert "embeddings" not in json.loads((tmp_path / "e" / "fuseline.json").read_text())
    assert not (tmp_path / "e" / "embeddings").exists()


def test_the_fetch_group_of_a_template_holds_its_embeddings() -> None:
    catalog = parse_catalog(
        json.dumps(
            {
                "version": 1,
                "vae": {"source": "file:vae"},
                "checkpoints": {"c": {"source": "file:c.safetensors"}},
                "templates": {
                    "t": {
                        "checkpoint": "c",
                        "loras": [{"source": "file:l.safetensors"}],
                        "embeddings": [{"source": "file:e.safetensors", "token": "embE"}],
                    }
                },
            }
        )
    )
    assert [where for where, _, _ in group_sources(catalog, "templates.t")] == [
        "templates.t.loras[0]",
        "templates.t.embeddings[0]",
    ]
