"""Fuzz: the A1111 prompt syntax and the weighting that turns it into token weights (issue 16, defect 1)
never raise on any prompt, and every weight they produce is a finite number within the documented cap.

Prompts are valid Unicode text: the job input refuses a lone surrogate (which JSON can carry) with
INVALID_INPUT before any of this runs (tests/worker/test_handler.py), and the tokenizer cannot encode one."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from testkit.tokenizers import PAD_TOKEN_2, build_tokenizer
from worker.prompt_syntax import MAX_WEIGHT, parse_prompt_weights
from worker.prompts import MAX_CHUNKS, apply_weights, weighted_chunks

pytestmark = pytest.mark.fuzz

TOKENIZER = build_tokenizer(PAD_TOKEN_2)

# Prompts made of the syntax's own pieces: brackets, weights (huge, tiny, signed, malformed), escapes, BREAK.
pieces = st.one_of(
    st.sampled_from(["(", ")", "[", "]", ":", "\\", "\\(", "\\)", " BREAK ", "BREAK", "a cat", ",", " "]),
    st.builds(lambda n: f":{n})", st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False))),
    st.builds(lambda d: f":{d})", st.text("0123456789.-+e", max_size=400)),
    st.integers(min_value=0, max_value=1000).map(lambda n: "(" * n),
    st.integers(min_value=0, max_value=1000).map(lambda n: "[" * n),
    st.text(st.characters(codec="utf-8"), max_size=80),
)
prompts = st.lists(pieces, max_size=30).map("".join).map(lambda p: p[:4000])  # the input's length limit


@given(prompts)
def test_any_prompt_parses_to_capped_finite_weights(prompt: str) -> None:
    fragments = parse_prompt_weights(prompt)
    assert fragments
    for fragment in fragments:
        assert math.isfinite(fragment.weight) and abs(fragment.weight) <= MAX_WEIGHT, fragment


@given(prompts)
def test_any_prompt_becomes_finite_token_weights(prompt: str) -> None:
    chunks = weighted_chunks(TOKENIZER, parse_prompt_weights(prompt))
    assert chunks.input_ids.shape == chunks.weights.shape and chunks.input_ids.shape[0] <= MAX_CHUNKS
    assert torch.isfinite(chunks.weights).all()
    hidden = torch.randn((chunks.weights.shape[0], 77, 8), dtype=torch.float16) + 0.1
    assert torch.isfinite(apply_weights(hidden, chunks.weights)).all()
