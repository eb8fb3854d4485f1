"""Fuzz: the sync's `.dir` listing parser returns entries that stay inside the model folder, or raises
LISTING_UNSAFE, never anything else, whatever the bytes."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fixtures.fuzz import any_text, coded_or_value, json_values, raw_bytes
from worker.sync.errors import ListingUnsafe
from worker.sync.volume import MAX_LISTING_DEPTH, MAX_NAME_BYTES, MAX_RELPATH_BYTES, parse_listing

pytestmark = pytest.mark.fuzz

md5s = st.one_of(
    st.sampled_from(["0" * 32, "d41d8cd98f00b204e9800998ecf8427e"]),
    st.text("0123456789abcdefABCDEF", min_size=30, max_size=34),
    json_values,
)
relpaths = st.one_of(
    any_text,
    st.lists(
        st.sampled_from(["unet", "..", ".", "", "a" * 300, "é" * 130, "x.json", "/", "\\", "\x00"]),
        max_size=40,
    ).map("/".join),
    json_values,
)
entries = st.one_of(
    st.fixed_dictionaries({"md5": md5s, "relpath": relpaths}),
    st.fixed_dictionaries(
        {"md5": md5s, "relpath": relpaths},
        optional={"size": json_values, "isexec": json_values, "x": json_values},
    ),
    json_values,
)


def check(raw: bytes) -> None:
    result = coded_or_value(lambda: parse_listing(raw, "fuzz"))
    if isinstance(result, ListingUnsafe):
        return
    assert isinstance(result, list) and result
    for entry in result:
        parts = PurePosixPath(entry.relpath).parts
        assert (
            not PurePosixPath(entry.relpath).is_absolute()
            and ".." not in parts
            and "." not in entry.relpath.split("/")
        )
        assert len(parts) <= MAX_LISTING_DEPTH and len(entry.relpath.encode()) <= MAX_RELPATH_BYTES
        assert all(len(part.encode()) <= MAX_NAME_BYTES for part in parts)


@given(raw_bytes)
def test_any_bytes(raw: bytes) -> None:
    check(raw)


@given(st.lists(entries, min_size=1, max_size=6))
def test_listings_with_hostile_entries(listing: list) -> None:
    check(json.dumps(listing).encode())
