"""A1111 prompt-weight syntax: parse `(word:1.3)`, `(word)`, `[word]`, escapes and BREAK into weighted text.

Pure and dependency-free so it can be tested exhaustively. The grammar follows AUTOMATIC1111's
`prompt_parser.parse_prompt_attention`, which is what prompts written for SDXL on Civitai assume:
- `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1; brackets nest and multiply;
- `(text:1.3)` sets the multiplier to 1.3 (any decimal, also 0 or negative);
- `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal characters;
- brackets left open at the end still apply to the rest of the prompt; stray closers are literal text;
- `BREAK` (upper case, a word of its own) ends the current 75-token chunk.

Unlike A1111, every weight is capped at +-MAX_WEIGHT as it is computed (a written weight and each product
of nested brackets), so `(word:1e40)` or 930 unclosed `(` stay finite numbers that fit a float32 tensor,
and a capped weight times 0 is 0, never inf * 0 = NaN.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
# Emphasis weights beyond this are capped (A1111 prompts use about 0.5 to 2; float32 ends near 3.4e38).
MAX_WEIGHT = 1000.0

_ATTENTION = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\     # escapes (and a lone backslash)
    |\(|\[                         # openers
    |:\s*([+-]?[.\d]+)\s*\)        # ':1.3)' closes a round bracket with an explicit weight
    |\)|]                          # closers
    |[^\\()\[\]:]+                 # plain text
    |:                             # a colon that is not part of a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text sharing one weight; `is_break` marks a BREAK (its text is empty)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


BREAK = Fragment("", 1.0, is_break=True)


def parse_prompt_weights(prompt: str) -> list[Fragment]:
    """Split `prompt` into fragments with their A1111 weights; adjacent equal weights are merged.

    An empty prompt gives one empty fragment of weight 1, so callers always have something to encode.
    """
    # Mutable [text, weight, is_break] triples while parsing; brackets record where their span starts.
    parts: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for part in parts[start:]:
            if not part[2]:
                part[1] = _capped(part[1] * _capped(factor))

    for match in _ATTENTION.finditer(prompt):
        token = match.group(0)
        weight = match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0, False])
        elif token == "(":
            round_open.append(len(parts))
        elif token == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open and _is_number(weight):
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, piece in enumerate(_BREAK.split(token)):
                if i > 0:
                    parts.append(["", 1.0, True])
                parts.append([piece, 1.0, False])

    # Unclosed brackets apply to everything after them, as in A1111.
    for start in round_open:
        multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER)

    fragments: list[Fragment] = []
    for text, weight, is_break in parts:
        if is_break:
            fragments.append(BREAK)
        elif not text:
            continue
        elif fragments and not fragments[-1].is_break and fragments[-1].weight == weight:
            fragments[-1] = Fragment(fragments[-1].text + text, weight)
        else:
            fragments.append(Fragment(text, weight))
    return fragments or [Fragment("", 1.0)]


def _capped(weight: float) -> float:
    return max(-MAX_WEIGHT, min(MAX_WEIGHT, weight))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
