"""Textual-inversion embeddings in the worker (worker/embeddings.py, worker/prompts.py): loaded into both
text encoders at pipeline load, their tokens usable in prompts and negative prompts, with A1111 weights and
long-prompt chunking. diffusers' own encode_prompt with the same embeddings loaded is the oracle where it
applies (lowercase tokens, one chunk)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fuseline.core.manifest import CheckpointRef, VaeRef
from stages.embeddings import EmbeddingInput
from stages.merge import TemplateIdentity, merge_template
from tests.worker.conftest import SMALL, TEST_ENV
from worker.embeddings import EmbeddingFile, embedding_vectors, load_embeddings
from worker.errors import ModelInvalid
from worker.prompt_syntax import parse_prompt_weights
from worker.prompts import encode_prompts, weighted_chunks


def fresh_pipeline(kit):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(kit.diffusers_dir, local_files_only=True)


@pytest.fixture(scope="module")
def embedded(kit, kit_embeddings):
    """The kit pipeline with "single" as `solo` and "triple" as `trio` (lowercase: diffusers' own prompt
    expansion finds them, so it can serve as the oracle)."""
    pipe = fresh_pipeline(kit)
    load_embeddings(
        pipe,
        "t",
        [
            EmbeddingFile("solo", kit_embeddings["single"], "file:single"),
            EmbeddingFile("trio", kit_embeddings["triple"], "file:triple"),
        ],
    )
    return pipe


def stock(pipe, prompt: str, negative: str):
    return pipe.encode_prompt(
        prompt,
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=negative,
    )


def test_tokens_and_vectors_are_added_to_both_encoders(embedded, kit) -> None:
    for tokenizer, encoder in (
        (embedded.tokenizer, embedded.text_encoder),
        (embedded.tokenizer_2, embedded.text_encoder_2),
    ):
        added = tokenizer.added_tokens_encoder
        assert {"solo", "trio", "trio_1", "trio_2"} <= set(added)
        assert embedding_vectors(tokenizer) == {
            added["trio"]: [added["trio"], added["trio_1"], added["trio_2"]]
        }
        assert encoder.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_embedding_tokens_in_prompt_and_negative_match_diffusers(embedded) -> None:
    prompt, negative = "a photo of solo and trio by the sea", "blurry, trio"
    ours = encode_prompts(embedded, prompt, negative)
    prompt_embeds, negative_embeds, pooled, negative_pooled = stock(embedded, prompt, negative)
    torch.testing.assert_close(ours.prompt_embeds, prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.negative_prompt_embeds, negative_embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled_prompt_embeds, pooled, rtol=0, atol=0)
    torch.testing.assert_close(ours.negative_pooled_prompt_embeds, negative_pooled, rtol=0, atol=0)
    # And the embedding is what makes the difference.
    without = encode_prompts(embedded, "a photo of and by the sea", "blurry,")
    assert ours.prompt_embeds.shape == without.prompt_embeds.shape
    assert not torch.equal(ours.prompt_embeds, without.prompt_embeds)


def test_a_capitalised_multi_vector_token_gets_all_its_vectors(kit, kit_embeddings, embedded) -> None:
    """CLIP's tokenizer lowercases what it finds, so diffusers' text expansion misses `Trio`'s extra vectors
    (it looks for `trio` among the added tokens, which hold `Trio`); the expansion on token ids does not."""
    pipe = fresh_pipeline(kit)
    load_embeddings(pipe, "t", [EmbeddingFile("Trio", kit_embeddings["triple"], "file:triple")])
    capital = encode_prompts(pipe, "a photo of Trio by the sea", "")
    lower = encode_prompts(embedded, "a photo of trio by the sea", "")
    torch.testing.assert_close(capital.prompt_embeds, lower.prompt_embeds, rtol=0, atol=0)


def test_weights_apply_to_every_vector_of_the_token(embedded) -> None:
    tokenizer = embedded.tokenizer
    chunks = weighted_chunks(tokenizer, parse_prompt_weights("a (trio:1.3) b"))
    added = tokenizer.added_tokens_encoder
    row = chunks.input_ids[0].tolist()
    start = row.index(added["trio"])
    assert row[start : start + 3] == [added["trio"], added["trio_1"], added["trio_2"]]
    assert chunks.weights[0, start : start + 3].tolist() == pytest.approx([1.3, 1.3, 1.3])
    assert chunks.weights[0, start - 1].item() == 1.0 and chunks.weights[0, start + 3].item() == 1.0


def test_a_multi_vector_token_is_never_split_across_chunks(embedded) -> None:
    """A1111 moves an embedding that does not fit in the current 75-token chunk whole to the next one."""
    tokenizer = embedded.tokenizer
    added = tokenizer.added_tokens_encoder
    words = " ".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(74))  # 74 one-token words
    chunks = weighted_chunks(tokenizer, parse_prompt_weights(f"{words} trio z"))
    first, second = chunks.input_ids.tolist()
    assert first[75] == tokenizer.eos_token_id and added["trio"] not in first  # 74 words, then EOS
    assert second[1:5] == [
        added["trio"],
        added["trio_1"],
        added["trio_2"],
        tokenizer.convert_tokens_to_ids("z</w>"),
    ]
    # Two words fewer (72 + 3 = 75): the three vectors fit and stay in the first chunk.
    fits = weighted_chunks(tokenizer, parse_prompt_weights(f"{words[:-4]} trio"))
    assert fits.input_ids.shape[0] == 1 and fits.input_ids[0, 73:76].tolist() == [
        added["trio"],
        added["trio_1"],
        added["trio_2"],
    ]


def test_an_embedding_that_does_not_load_is_model_invalid(kit, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    bad = tmp_path / "wide.safetensors"
    save_file({"clip_l": torch.zeros(1, 999), "clip_g": torch.zeros(1, 999)}, str(bad))
    with pytest.raises(ModelInvalid, match=r"embedding 'wide' \(file:wide, .*could not be loaded"):
        load_embeddings(fresh_pipeline(kit), "t", [EmbeddingFile("wide", bad, "file:wide")])


def test_a_template_with_embeddings_serves_them(kit, kit_embeddings, tmp_path: Path) -> None:
    """The merge copies the files into the export; the worker loads them with the pipeline."""
    from worker.serving import Worker
    from worker.settings import load_settings

    out = tmp_path / "volume" / "models" / "emb"
    merge_template(
        kit.diffusers_dir,
        kit.vae_dir,
        [],
        out,
        identity=TemplateIdentity(
            template="emb",
            checkpoint=CheckpointRef(id="tiny", source="file:tiny"),
            vae=VaeRef(source="file:vae"),
            spec_hash="e" * 64,
        ),
        prediction_type="epsilon",
        shard_size_mb=100,
        embeddings=[EmbeddingInput(kit_embeddings["triple"], "embTrio", "file:triple")],
    )
    assert json.loads((out / "fuseline.json").read_text())["embeddings"][0]["vectors"] == 3
    worker = Worker(load_settings({**TEST_ENV, "FUSELINE_VOLUME": str(tmp_path / "volume")}))
    job = {"template": "emb", "prompt": "a lighthouse", "negative_prompt": "embTrio", "seed": 2, **SMALL}
    with_token = worker.run(job)
    without = worker.run({**job, "negative_prompt": "blurry"})
    assert with_token["images"][0]["data"] != without["images"][0]["data"]
    entry, _ = worker.cache.get("emb")
    assert "embTrio_2" in entry.pipe.tokenizer_2.added_tokens_encoder
    shutil.rmtree(tmp_path / "volume")
