"""Textual-inversion embeddings of a template, loaded into a pipeline's two text encoders at pipeline load.

An SDXL embedding file holds `clip_l` (text encoder 1) and `clip_g` (text encoder 2) vectors; diffusers'
`load_textual_inversion` adds the token (and `<token>_1`, `<token>_2`, ... for a multi-vector embedding) to
each tokenizer and the vectors to each encoder's token embedding. Prompts then reach them through the
tokenizer: worker/prompts.py expands a multi-vector token into its vectors and keeps them in one chunk.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.device import unrecoverable_device_error
from worker.errors import ModelInvalid

_CONTINUATION = re.compile(r"^(?P<base>.+)_(?P<index>[0-9]+)$")


@dataclass(frozen=True)
class EmbeddingFile:
    token: str
    path: Path
    source: str  # the catalog source, for messages


def load_embeddings(pipe: Any, template_id: str, embeddings: Sequence[EmbeddingFile]) -> None:
    """Load each embedding into both text encoders of `pipe`; ModelInvalid naming the file on failure."""
    if not embeddings:
        return
    import torch
    from safetensors.torch import load_file

    for embedding in embeddings:
        try:
            tensors = load_file(str(embedding.path))
            for key, encoder, tokenizer in (
                ("clip_l", pipe.text_encoder, pipe.tokenizer),
                ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2),
            ):
                pipe.load_textual_inversion(
                    tensors[key], token=embedding.token, text_encoder=encoder, tokenizer=tokenizer
                )
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            if unrecoverable_device_error(exc) is not None:
                raise
            raise ModelInvalid(
                f"template {template_id!r}: embedding {embedding.token!r} ({embedding.source}, "
                f"{embedding.path}) could not be loaded into the text encoders: {type(exc).__name__}: {exc}; "
                "rebuild the template"
            ) from None


def embedding_vectors(tokenizer: Any) -> dict[int, list[int]]:
    """First token id -> the ids of all its vectors, for each multi-vector embedding in the tokenizer.

    diffusers names the extra vectors `<token>_1`, `<token>_2`, ... and expands a prompt by replacing the
    token text (`maybe_convert_prompt`); that misses tokens with capitals, because CLIP's tokenizer
    lowercases what it finds, and it cannot keep the vectors together across a chunk boundary. So the
    expansion happens on token ids (worker/prompts.py), from this table."""
    added: dict[str, int] = dict(tokenizer.added_tokens_encoder)
    groups: dict[int, list[int]] = {}
    for token, first in added.items():
        match = _CONTINUATION.match(token)
        if match and match["base"] in added:
            continue  # a vector of another token's group
        ids = [first]
        while f"{token}_{len(ids)}" in added:
            ids.append(added[f"{token}_{len(ids)}"])
        if len(ids) > 1:
            groups[first] = ids
    return groups
