"""The A1111 prompt-weight parser: a pure function, checked case by case against A1111's rules."""

from __future__ import annotations

import math

import pytest

from worker.prompt_syntax import BREAK, MAX_WEIGHT, Fragment, parse_prompt_weights


def pairs(prompt: str) -> list[tuple[str, float]]:
    return [
        (f.text, round(f.weight, 6)) if not f.is_break else ("BREAK", -1)
        for f in parse_prompt_weights(prompt)
    ]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("", [("", 1.0)]),
        ("(cat)", [("cat", 1.1)]),
        ("[cat]", [("cat", round(1 / 1.1, 6))]),
        ("((cat))", [("cat", 1.21)]),
        ("[[cat]]", [("cat", round(1 / 1.21, 6))]),
        ("(cat:1.3)", [("cat", 1.3)]),
        ("(cat: 1.3 )", [("cat", 1.3)]),
        ("(cat:0)", [("cat", 0.0)]),
        ("(cat:-0.5)", [("cat", -0.5)]),
        ("a (cat:1.5) dog", [("a ", 1.0), ("cat", 1.5), (" dog", 1.0)]),
        ("((a (b:2)) c)", [("a ", 1.21), ("b", 2.42), (" c", 1.1)]),
        ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
        ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
        # Escapes are literal characters with weight 1.
        (r"\(cat:1.5\)", [("(cat:1.5)", 1.0)]),
        (r"\[cat\]", [("[cat]", 1.0)]),
        (r"a \\ b", [("a \\ b", 1.0)]),
        (r"(\(x\))", [("(x)", 1.1)]),
        # Unclosed brackets apply to the rest; stray closers are text.
        ("(cat", [("cat", 1.1)]),
        ("[cat", [("cat", round(1 / 1.1, 6))]),
        ("cat)", [("cat)", 1.0)]),
        ("cat]", [("cat]", 1.0)]),
        ("cat:1.5)", [("cat:1.5)", 1.0)]),
        ("a: b", [("a: b", 1.0)]),
        # A weight that is not a number leaves the text as written.
        ("(cat:1.2.3)", [("cat:1.2.3)", 1.1)]),
        ("cat:1.5", [("cat:1.5", 1.0)]),
    ],
)
def test_weights(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert pairs(prompt) == expected


def test_break_starts_a_new_chunk_and_swallows_surrounding_space() -> None:
    assert pairs("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1), ("a dog", 1.0)]
    assert parse_prompt_weights("x BREAK y")[1] is BREAK


def test_break_inside_weights_and_lowercase_break() -> None:
    assert pairs("(a BREAK b:1.5)") == [("a", 1.5), ("BREAK", -1), ("b", 1.5)]
    # Only the upper-case word is the keyword, as in A1111.
    assert pairs("a break b") == [("a break b", 1.0)]
    assert pairs("aBREAKb") == [("aBREAKb", 1.0)]


def test_fragments_are_typed() -> None:
    assert parse_prompt_weights("(x:2)") == [Fragment("x", 2.0)]


@pytest.mark.parametrize(
    ("prompt", "weight"),
    [
        ("(lighthouse:1" + "0" * 40 + ")", MAX_WEIGHT),  # 1e40: beyond float32
        ("(lighthouse:-1" + "0" * 40 + ")", -MAX_WEIGHT),
        ("(lighthouse:" + "9" * 400 + ")", MAX_WEIGHT),  # inf as a Python float
        ("(" * 930 + "lighthouse", MAX_WEIGHT),  # 1.1 ** 930 is about 3e38, float32's limit
        ("[" * 930 + "lighthouse", (1 / 1.1) ** 930),  # tiny, not capped: float32 takes it as 0
        # Capped at every step: 0 times a capped weight is 0, never inf * 0 = NaN.
        ("((lighthouse:0):" + "9" * 400 + ")", 0.0),
        ("((lighthouse:" + "9" * 400 + "):0.5)", MAX_WEIGHT / 2),
    ],
)
def test_weights_are_capped_at_max_weight(prompt: str, weight: float) -> None:
    (fragment,) = parse_prompt_weights(prompt)
    assert fragment.text == "lighthouse"
    assert fragment.weight == pytest.approx(weight)
    assert math.isfinite(fragment.weight)
