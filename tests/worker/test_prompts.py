"""Chunked, weighted prompt embeddings for both SDXL text encoders, compared against diffusers' own."""

from __future__ import annotations

import pytest
import torch

from worker.prompt_syntax import Fragment, parse_prompt_weights
from worker.prompts import MAX_CHUNKS, encode_prompts, weighted_chunks


def stock(pipe, prompt: str, negative: str | None = None):
    """diffusers' encode_prompt: the oracle for anything that fits in one chunk."""
    return pipe.encode_prompt(
        prompt,
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=negative,
    )


def words(count: int) -> str:
    """`count` one-character words: the kit's tokenizer makes each exactly one token."""
    return " ".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(count))


def test_short_prompt_matches_diffusers_exactly(kit_pipeline) -> None:
    ours = encode_prompts(kit_pipeline, "a cat sitting on a mat", "")
    prompt_embeds, negative, pooled, _ = stock(kit_pipeline, "a cat sitting on a mat")
    torch.testing.assert_close(ours.prompt_embeds, prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled_prompt_embeds, pooled, rtol=0, atol=0)
    # SDXL's force_zeros_for_empty_prompt: no negative prompt means zero embeddings, as in the stock pipeline.
    assert not ours.negative_prompt_embeds.any() and not ours.negative_pooled_prompt_embeds.any()
    torch.testing.assert_close(ours.negative_prompt_embeds, negative, rtol=0, atol=0)
    assert ours.warnings == []


def test_negative_prompt_matches_diffusers(kit_pipeline) -> None:
    ours = encode_prompts(kit_pipeline, "a cat", "blurry, ugly")
    _, negative, _, negative_pooled = stock(kit_pipeline, "a cat", "blurry, ugly")
    torch.testing.assert_close(ours.negative_prompt_embeds, negative, rtol=0, atol=0)
    torch.testing.assert_close(ours.negative_pooled_prompt_embeds, negative_pooled, rtol=0, atol=0)


def test_long_prompt_is_chunked_not_truncated(kit_pipeline) -> None:
    prompt = words(200)
    ours = encode_prompts(kit_pipeline, prompt, "")
    width = kit_pipeline.text_encoder.config.hidden_size + kit_pipeline.text_encoder_2.config.hidden_size
    # 200 tokens -> 3 chunks of 75 (+ BOS/EOS each) for both encoders, side by side.
    assert ours.prompt_embeds.shape == (1, 3 * 77, width)
    assert ours.negative_prompt_embeds.shape == ours.prompt_embeds.shape
    # The first chunk is the stock encoding of the first 75 tokens; the rest is new information.
    first, *_ = stock(kit_pipeline, words(75))
    torch.testing.assert_close(ours.prompt_embeds[:, :77], first, rtol=0, atol=0)
    truncated = encode_prompts(kit_pipeline, words(75), "")
    assert truncated.prompt_embeds.shape[1] == 77
    # The pooled embedding is the first chunk's (batched with the other chunks: equal up to rounding).
    torch.testing.assert_close(ours.pooled_prompt_embeds, truncated.pooled_prompt_embeds)


def test_negative_and_positive_are_padded_to_equal_length(kit_pipeline) -> None:
    ours = encode_prompts(kit_pipeline, "a cat", words(100))
    assert ours.prompt_embeds.shape == ours.negative_prompt_embeds.shape == (1, 2 * 77, 96)
    # The padding chunk of the positive side is the encoding of an empty prompt.
    empty = encode_prompts(kit_pipeline, "", "x").prompt_embeds
    torch.testing.assert_close(ours.prompt_embeds[:, 77:], empty, rtol=0, atol=0)


def test_weight_changes_the_embedding_and_escape_does_not(kit_pipeline) -> None:
    plain = encode_prompts(kit_pipeline, "a cat on a mat", "").prompt_embeds
    weighted = encode_prompts(kit_pipeline, "a (cat:1.5) on a mat", "").prompt_embeds
    assert not torch.allclose(plain, weighted)
    # Escaped brackets are literal text: exactly the stock encoding of the literal prompt.
    escaped = encode_prompts(kit_pipeline, r"a \(cat:1.5\) on a mat", "").prompt_embeds
    literal, *_ = stock(kit_pipeline, "a (cat:1.5) on a mat")
    torch.testing.assert_close(escaped, literal, rtol=0, atol=0)


def test_weights_follow_a1111_math(kit_pipeline) -> None:
    """Weighted = plain * weight per token, rescaled so each encoder's chunk keeps its mean."""
    plain = encode_prompts(kit_pipeline, "a cat", "").prompt_embeds
    weighted = encode_prompts(kit_pipeline, "a (cat:1.5)", "").prompt_embeds
    widths = (kit_pipeline.text_encoder.config.hidden_size, kit_pipeline.text_encoder_2.config.hidden_size)
    ids = weighted_chunks(kit_pipeline.tokenizer, parse_prompt_weights("a (cat:1.5)"))
    weights = ids.weights[0]
    # BOS, "a", then "c" "a" "t" at 1.5, EOS and padding at 1.
    assert weights.tolist()[:7] == [1.0, 1.0, 1.5, 1.5, 1.5, 1.0, 1.0]
    start = 0
    for width in widths:
        p, w = plain[0, :, start : start + width], weighted[0, :, start : start + width]
        expected = p * weights[:, None]
        expected = expected * (p.mean() / expected.mean())
        torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.mean(), p.mean(), rtol=1e-5, atol=1e-7)
        start += width


def test_break_pads_the_chunk_and_starts_another(kit_pipeline) -> None:
    ours = encode_prompts(kit_pipeline, "a cat BREAK a dog", "")
    assert ours.prompt_embeds.shape[1] == 2 * 77
    first, *_ = stock(kit_pipeline, "a cat")
    second, *_ = stock(kit_pipeline, "a dog")
    torch.testing.assert_close(ours.prompt_embeds[:, :77], first, rtol=0, atol=0)
    torch.testing.assert_close(ours.prompt_embeds[:, 77:], second, rtol=0, atol=0)


def test_chunk_layout(kit_pipeline) -> None:
    tokenizer = kit_pipeline.tokenizer_2
    chunks = weighted_chunks(tokenizer, [Fragment(words(80))])
    ids = chunks.input_ids
    assert ids.shape == (2, 77)
    assert ids[:, 0].tolist() == [tokenizer.bos_token_id] * 2
    # Full chunk: 75 tokens then EOS; second chunk: 5 tokens, EOS, then tokenizer 2's pad ("!").
    assert ids[0, 76].item() == tokenizer.eos_token_id
    assert ids[1, 6].item() == tokenizer.eos_token_id
    assert set(ids[1, 7:].tolist()) == {tokenizer.pad_token_id}
    assert (chunks.token_count, chunks.dropped_tokens) == (80, 0)


def test_hard_limit_is_reported_not_silent(kit_pipeline) -> None:
    count = MAX_CHUNKS * 75 + 10
    ours = encode_prompts(kit_pipeline, words(count), "")
    assert ours.prompt_embeds.shape[1] == MAX_CHUNKS * 77
    assert ours.warnings == [
        f"prompt has {count} tokens in {MAX_CHUNKS + 1} chunks (75 tokens each at most; BREAK starts a new "
        f"one); only the first {MAX_CHUNKS} chunks ({MAX_CHUNKS * 75} tokens) were used, "
        "10 tokens were dropped"
    ]


def test_the_limit_warning_counts_break_chunks(kit_pipeline) -> None:
    # 20 one-token chunks: the old warning claimed "16 chunks of 75" were used for 16 tokens.
    count = MAX_CHUNKS + 4
    ours = encode_prompts(kit_pipeline, " BREAK ".join(words(count).split()), "")
    assert ours.prompt_embeds.shape[1] == MAX_CHUNKS * 77
    assert ours.warnings == [
        f"prompt has {count} tokens in {count} chunks (75 tokens each at most; BREAK starts a new one); "
        f"only the first {MAX_CHUNKS} chunks ({MAX_CHUNKS} tokens) were used, 4 tokens were dropped"
    ]


@pytest.mark.parametrize("prompt", ["(cat:0)", "[[[[cat]]]]", "(cat:-1)"])
def test_extreme_weights_stay_finite(kit_pipeline, prompt: str) -> None:
    assert torch.isfinite(encode_prompts(kit_pipeline, prompt, "").prompt_embeds).all()


def test_weighting_fp16_hidden_states_stays_finite_and_matches_fp32() -> None:
    from worker.prompts import apply_weights

    gen = torch.Generator().manual_seed(0)
    hidden32 = torch.randn((2, 77, 16), generator=gen, dtype=torch.float32) + 0.1
    weights = torch.ones((2, 77))
    weights[0, 3] = 1.5
    weights[1, 5] = 0.5
    expected = apply_weights(hidden32, weights)
    got = apply_weights(hidden32.half(), weights)
    assert got.dtype == torch.float16
    assert torch.allclose(got.float(), expected, rtol=1e-2, atol=1e-2)
    # A weight whose product overflows fp16 (> 65504): computed in float32, never inf or NaN.
    weights[0, 3] = 1e5
    huge = apply_weights(hidden32.half(), weights)
    assert torch.isfinite(huge).all()
    assert torch.allclose(huge[1].float(), expected[1], rtol=1e-2, atol=1e-2)  # the other chunk
