"""The kit's offline CLIP tokenizers, as a pipeline folder's from_pretrained sees them."""

from __future__ import annotations

import json

import pytest
from transformers import CLIPTokenizer

from testkit.models import Kit


@pytest.mark.parametrize(
    ("tokenizer", "encoder"), [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
)
def test_tokenizer_covers_its_encoders_vocab(kit: Kit, tokenizer: str, encoder: str):
    tok = CLIPTokenizer.from_pretrained(kit.diffusers_dir / tokenizer)
    config = json.loads((kit.diffusers_dir / encoder / "config.json").read_text())
    assert len(tok) == config["vocab_size"]
    assert tok.model_max_length == 77
    assert tok.bos_token_id == config["bos_token_id"]
    assert tok.eos_token_id == config["eos_token_id"]


def test_pad_tokens_are_sdxls(kit: Kit):
    tok1 = CLIPTokenizer.from_pretrained(kit.diffusers_dir / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(kit.diffusers_dir / "tokenizer_2")
    assert tok1.pad_token == "<|endoftext|>"
    assert tok2.pad_token == "!"
    ids = tok2("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[-1] == tok2.convert_tokens_to_ids("!")


def test_long_prompt_tokenizes_past_77_when_not_truncated(kit: Kit):
    tok = CLIPTokenizer.from_pretrained(kit.config_dir / "tokenizer")
    prompt = " ".join(["a red cat"] * 20)  # 180 characters
    ids = tok(prompt, truncation=False).input_ids
    assert len(ids) > 77
    assert tok.decode(ids, skip_special_tokens=True) == prompt
    assert len(tok(prompt, truncation=True, max_length=77).input_ids) == 77
