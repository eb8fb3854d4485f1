"""Long and weighted prompts for SDXL: chunked, A1111-weighted embeddings from both text encoders.

Each encoder sees the prompt in chunks of 75 tokens wrapped in BOS/EOS and padded to 77 (the layout the
stock pipeline uses for one chunk, so a short unweighted prompt encodes exactly as diffusers does).
Chunk outputs (penultimate hidden states, as SDXL uses; an earlier layer with clip skip, see
core.serving.hidden_state_index) are concatenated along the sequence axis; the UNet's cross-attention
takes any length. Weights are applied the A1111 way: multiply each token's embedding by its weight, then
rescale the chunk so its mean is what it was unweighted. The pooled embedding comes from encoder 2's first
chunk, unweighted, as in A1111. A textual-inversion token stands for all its vectors, kept in one chunk as
A1111 keeps them (worker/embeddings.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fuseline.core.serving import hidden_state_index
from worker.embeddings import embedding_vectors
from worker.errors import InvalidInput
from worker.prompt_syntax import MAX_WEIGHT, Fragment, parse_prompt_weights

# 16 chunks = 1200 tokens: far beyond what a 4000-character prompt needs with the real CLIP vocab
# (about 4 characters per token); a limit so a pathological prompt cannot make attention explode.
MAX_CHUNKS = 16


@dataclass(frozen=True)
class WeightedChunks:
    """Token ids and weights for one tokenizer, `chunks` rows of `model_max_length` each."""

    input_ids: torch.Tensor  # (chunks, 77) long
    weights: torch.Tensor  # (chunks, 77) float, 1.0 on BOS/EOS/padding
    token_count: int  # prompt tokens before any limit (without BOS/EOS/padding)
    dropped_tokens: int  # tokens beyond MAX_CHUNKS that were not encoded
    chunk_count: int = 0  # chunks the prompt makes before the limit (BREAK ends one early)


@dataclass
class PromptEmbeddings:
    prompt_embeds: torch.Tensor  # (1, chunks*77, d1+d2)
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor  # (1, projection_dim)
    negative_pooled_prompt_embeds: torch.Tensor
    warnings: list[str] = field(default_factory=list)


def _tokenize(tokenizer, text: str) -> list[int]:
    if not text.strip():
        return []
    # No special tokens and no truncation: chunking below decides where the prompt is cut.
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def weighted_chunks(tokenizer, fragments: list[Fragment], max_chunks: int = MAX_CHUNKS) -> WeightedChunks:
    """Lay the weighted fragments out as BOS + 75 tokens + EOS + padding rows; BREAK starts a new row. A
    multi-vector embedding's token becomes all its vectors, moved whole to the next row when they do not
    fit in this one (A1111's rule; one longer than a row is split)."""
    length = tokenizer.model_max_length
    per_chunk = length - 2
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    vectors = embedding_vectors(tokenizer)
    rows: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    for fragment in fragments:
        if fragment.is_break:
            rows.append(current)
            current = []
            continue
        for token in _tokenize(tokenizer, fragment.text):
            ids = vectors.get(token, [token])
            if current and len(current) + len(ids) > per_chunk and len(ids) <= per_chunk:
                rows.append(current)
                current = []
            for part in ids:
                if len(current) == per_chunk:
                    rows.append(current)
                    current = []
                current.append((part, fragment.weight))
    if current or not rows:
        rows.append(current)

    token_count = sum(len(row) for row in rows)
    dropped = sum(len(row) for row in rows[max_chunks:])
    chunk_count = len(rows)
    rows = rows[:max_chunks]
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    weights = torch.ones((len(rows), length), dtype=torch.float32)
    for r, row in enumerate(rows):
        ids[r, 0] = bos
        for i, (token, weight) in enumerate(row, start=1):
            ids[r, i] = token
            weights[r, i] = weight
        ids[r, len(row) + 1] = eos
    return WeightedChunks(ids, weights, token_count, dropped, chunk_count)


def _pad_rows(chunks: WeightedChunks, rows: int, tokenizer) -> WeightedChunks:
    """Append empty chunks (BOS EOS padding) so both sides of classifier-free guidance have equal length."""
    missing = rows - chunks.input_ids.shape[0]
    if missing <= 0:
        return chunks
    empty = weighted_chunks(tokenizer, [Fragment("")])
    return WeightedChunks(
        torch.cat([chunks.input_ids, empty.input_ids.repeat(missing, 1)]),
        torch.cat([chunks.weights, empty.weights.repeat(missing, 1)]),
        chunks.token_count,
        chunks.dropped_tokens,
        chunks.chunk_count,
    )


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 weighting of `hidden` (chunks, 77, d) by `weights` (chunks, 77): scale each token by its
    weight, then restore each chunk's original mean. Done in float32 and cast back: in fp16 (CUDA) a
    weighted value past 65504 is inf and the mean restore turns it into NaN, a black image. Weights are
    capped at +-MAX_WEIGHT (far past any useful emphasis) so float32 stays finite too."""
    if torch.all(weights == 1):
        return hidden
    h = hidden.float()
    w = weights.to(device=h.device, dtype=torch.float32).clamp(-MAX_WEIGHT, MAX_WEIGHT)
    original_mean = h.mean(dim=(1, 2), keepdim=True)
    h = h * w.unsqueeze(-1)
    new_mean = h.mean(dim=(1, 2), keepdim=True)
    h = torch.where(new_mean != 0, h * (original_mean / new_mean), h)
    if hidden.dtype.is_floating_point:
        limit = torch.finfo(hidden.dtype).max
        h = h.clamp(-limit, limit)  # a strongly weighted token saturates rather than becoming inf
    return h.to(hidden.dtype)


def _encode(
    text_encoder, chunks: WeightedChunks, clip_skip: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted hidden states as (1, chunks*77, d), pooled/projected output of the first chunk)."""
    device = text_encoder.device
    output = text_encoder(chunks.input_ids.to(device), output_hidden_states=True)
    index = hidden_state_index(clip_skip)
    if -index >= len(output.hidden_states):  # hidden_states[0] is the token embedding, before any layer
        raise InvalidInput(
            f"1 problem(s): clip_skip: {clip_skip} is deeper than this template's text encoder "
            f"({len(output.hidden_states) - 1} layers); use a smaller clip_skip"
        )
    # The pooled output stays the final layer's whatever the clip skip, as in diffusers, A1111 and ComfyUI.
    hidden = output.hidden_states[index]
    hidden = apply_weights(hidden, chunks.weights.to(device))
    pooled = output[0][:1] if output[0].ndim == 2 else None
    return hidden.reshape(1, -1, hidden.shape[-1]), pooled


def _limit_warning(side: str, chunks: WeightedChunks, per_chunk: int) -> str | None:
    # Counted in chunks and tokens apart: with BREAK a chunk holds fewer than `per_chunk` tokens, so the
    # tokens kept are not MAX_CHUNKS * per_chunk.
    if not chunks.dropped_tokens:
        return None
    kept = chunks.token_count - chunks.dropped_tokens
    return (
        f"{side} has {chunks.token_count} tokens in {chunks.chunk_count} chunks ({per_chunk} tokens each at "
        f"most; BREAK starts a new one); only the first {MAX_CHUNKS} chunks ({kept} tokens) were used, "
        f"{chunks.dropped_tokens} tokens were dropped"
    )


@torch.no_grad()
def encode_prompts(pipe, prompt: str, negative_prompt: str, clip_skip: int | None = None) -> PromptEmbeddings:
    """Embeddings for StableDiffusionXLPipeline(prompt_embeds=..., ...) from A1111-syntax prompts.

    An empty negative prompt gives zero embeddings when the pipeline's `force_zeros_for_empty_prompt`
    is set (SDXL's default), exactly as the stock pipeline does when no negative prompt is given.
    `clip_skip` in the A1111 numbering (core.serving): None, 1 and 2 take SDXL's penultimate layer.
    """
    # An SDXL refiner has text_encoder_2 alone: it is encoded with that one (pooled: the last encoder's).
    pairs = [
        (t, e) for t, e in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
    ]
    tokenizers = [t for t, e in pairs if e is not None]
    encoders = [e for _, e in pairs if e is not None]
    positive_fragments = parse_prompt_weights(prompt)
    zero_negative = not negative_prompt.strip() and bool(
        pipe.config.get("force_zeros_for_empty_prompt", False)
    )
    negative_fragments = parse_prompt_weights(negative_prompt)

    positive = [weighted_chunks(t, positive_fragments) for t in tokenizers]
    negative = [weighted_chunks(t, negative_fragments) for t in tokenizers]
    rows = max(c.input_ids.shape[0] for c in positive + negative)
    positive = [_pad_rows(c, rows, t) for c, t in zip(positive, tokenizers, strict=True)]
    negative = [_pad_rows(c, rows, t) for c, t in zip(negative, tokenizers, strict=True)]

    warnings = []
    per_chunk = tokenizers[-1].model_max_length - 2
    for side, chunks in (("prompt", positive[-1]), ("negative_prompt", negative[-1])):
        message = _limit_warning(side, chunks, per_chunk)
        if message:
            warnings.append(message)

    pos_hidden, pos_pooled = zip(
        *(_encode(e, c, clip_skip) for e, c in zip(encoders, positive, strict=True)), strict=True
    )
    prompt_embeds = torch.cat(pos_hidden, dim=-1)
    pooled = pos_pooled[-1]
    if zero_negative:
        negative_embeds = torch.zeros_like(prompt_embeds)
        negative_pooled = torch.zeros_like(pooled)
    else:
        neg_hidden, neg_pooled = zip(
            *(_encode(e, c, clip_skip) for e, c in zip(encoders, negative, strict=True)), strict=True
        )
        negative_embeds = torch.cat(neg_hidden, dim=-1)
        negative_pooled = neg_pooled[-1]
    return PromptEmbeddings(prompt_embeds, negative_embeds, pooled, negative_pooled, warnings)
