"""Fuzz: the catalog parser and source strings return a value or raise the project's coded errors
(CatalogError, SourceStringError), never anything else, whatever the text."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuseline.core.catalog.loading import load_catalog, parse_catalog
from fuseline.core.catalog.model import Catalog
from fuseline.core.catalog.problems import CatalogError
from fuseline.core.catalog.sources import SOURCE_PATTERN, SourceStringError, parse_source
from tests.fixtures.fuzz import any_text, coded_or_value, hostile_documents, json_bytes, raw_bytes

pytestmark = pytest.mark.fuzz

BASE = {
    "version": 1,
    "vae": {"source": "hf:madebyollin/sdxl-vae-fp16-fix@" + "a" * 40},
    "checkpoints": {"base": {"source": "civitai:1", "sha256": "b" * 64, "prediction": "epsilon"}},
    "templates": {
        "one": {
            "checkpoint": "base",
            "loras": [{"source": "civitai:2", "sha256": "c" * 64, "scale": 0.8, "block_weights": "SDXL-ALL"}],
            "defaults": {"steps": 24, "guidance_scale": 4.5, "width": 1024, "height": 1024},
        }
    },
}
# Where a hostile value goes: every field of the catalog, and the keys that name things.
PLACES: list[tuple[Any, ...]] = [
    ("version",),
    ("vae",),
    ("vae", "source"),
    ("checkpoints",),
    ("checkpoints", "base"),
    ("checkpoints", "base", "source"),
    ("checkpoints", "base", "sha256"),
    ("checkpoints", "base", "config"),
    ("checkpoints", "base", "prediction"),
    ("checkpoints", "base", "allow_pickle"),
    ("templates",),
    ("templates", "one"),
    ("templates", "one", "checkpoint"),
    ("templates", "one", "loras"),
    ("templates", "one", "loras", 0),
    ("templates", "one", "loras", 0, "source"),
    ("templates", "one", "loras", 0, "scale"),
    ("templates", "one", "loras", 0, "block_weights"),
    ("templates", "one", "defaults"),
    ("templates", "one", "defaults", "width"),
    ("templates", "one", "defaults", "steps"),
    ("templates", "one", "defaults", "scheduler"),
    ("templates", "one", "defaults", "negative_prompt"),
]


def parse(text: str) -> Catalog | CatalogError:
    result = coded_or_value(lambda: parse_catalog(text))
    assert isinstance(result, Catalog | CatalogError), result
    return result


@given(any_text)
def test_any_text(text: str) -> None:
    parse(text)


@given(raw=raw_bytes)
def test_any_file(tmp_path_factory, raw: bytes) -> None:
    # As `fuseline validate` reads a file: bytes that may not even be UTF-8.
    path = tmp_path_factory.getbasetemp() / "fuzz-templates.json"
    path.write_bytes(raw)
    result = coded_or_value(lambda: load_catalog(path))
    assert isinstance(result, Catalog | CatalogError), result


@given(hostile_documents(BASE, PLACES))
def test_a_catalog_with_hostile_fields(catalog: dict) -> None:
    result = parse(json_bytes(catalog).decode())
    if isinstance(result, CatalogError):
        assert result.problems and all(p.code.isupper() for p in result.problems)


def _plain(text: str) -> bool:
    # Characters a Python-`re` JSON Schema pattern can tell apart from printable ones: the rest (format
    # characters such as U+200B, unassigned code points) parse_source refuses (str.isprintable) and the
    # schema cannot name (no Unicode categories in `re`).
    return all(c.isprintable() or c <= "\x9f" for c in text)


@given(st.one_of(any_text, st.from_regex(SOURCE_PATTERN, fullmatch=True)))
@example("https://:")  # an empty host the schema once matched and parse_source refuses
@example("https://:80/model.safetensors")
@example("https://[")  # urlsplit raised a bare ValueError ("Invalid IPv6 URL")
@example("https://[::1]/model.safetensors")
def test_source_strings_and_the_schema_agree(text: str) -> None:
    result = coded_or_value(lambda: parse_source(text))
    if isinstance(result, SourceStringError):
        assert result.hint
    accepted = not isinstance(result, SourceStringError)
    # Editors check sources with the JSON Schema's pattern, validate with parse_source: what validates is
    # never flagged in an editor, and on text a pattern can read the two give one answer.
    matched = bool(re.match(SOURCE_PATTERN, text))
    assert matched or not accepted, text
    if _plain(text):
        assert matched == accepted, text


def test_the_strategies_reach_valid_catalogs() -> None:
    # The hostile catalogs start from a valid one: a fuzz run explores around what parses.
    assert isinstance(parse(json.dumps(BASE)), Catalog)
