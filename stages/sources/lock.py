"""`lock_catalog`: fill in missing sha256 pins of civitai: and hf: file sources from their metadata
(Civitai's API, the hub's LFS metadata), editing templates.json surgically.

The file is edited as text, not re-dumped: only the inserted `"sha256": "…"` members change, so the
user's formatting, key order and inline objects survive, and an already-locked file stays
byte-identical. A small position-tracking JSON scanner finds where each source object sits.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from json.decoder import scanstring
from pathlib import Path
from typing import Any

from fuseline.core.catalog.loading import parse_catalog
from fuseline.core.catalog.problems import CatalogError, format_path
from fuseline.core.catalog.sources import SourceStringError, parse_source
from fuseline.core.files import atomic_write
from stages.sources.base_models import FAMILIES
from stages.sources.civitai import CivitaiClient
from stages.sources.download import RetryPolicy
from stages.sources.errors import SourceError
from stages.sources.hf import hf_file_sha256

# ------------------------------------------------------------------------------------ JSON with spans


@dataclass
class _Node:
    kind: str  # "object" | "array" | "string" | "number" | "literal"
    start: int
    end: int  # one past the last character
    value: Any = None
    members: list[tuple[str, int, _Node]] = field(default_factory=list)  # objects: (key, key_start, value)
    items: list[_Node] = field(default_factory=list)  # arrays

    def get(self, key: str) -> _Node | None:
        return next((v for k, _, v in self.members if k == key), None)

    def key_start(self, key: str) -> int | None:
        return next((s for k, s, _ in self.members if k == key), None)


_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text

    def ws(self, i: int) -> int:
        return _WS.match(self.text, i).end()  # type: ignore[union-attr]

    def value(self, i: int) -> _Node:
        i = self.ws(i)
        ch = self.text[i : i + 1]
        if ch == "{":
            return self.obj(i)
        if ch == "[":
            return self.arr(i)
        if ch == '"':
            s, end = scanstring(self.text, i + 1)
            return _Node("string", i, end, s)
        for word, val in (("true", True), ("false", False), ("null", None)):
            if self.text.startswith(word, i):
                return _Node("literal", i, i + len(word), val)
        m = _NUMBER.match(self.text, i)
        if not m or m.end() == i:
            raise ValueError(f"unexpected character at offset {i}")
        return _Node("number", i, m.end(), json.loads(m.group()))

    def obj(self, i: int) -> _Node:
        node = _Node("object", i, i)
        i = self.ws(i + 1)
        if self.text[i] == "}":
            node.end = i + 1
            return node
        while True:
            i = self.ws(i)
            key_start = i
            key, i = scanstring(self.text, i + 1)
            i = self.ws(i)
            assert self.text[i] == ":"
            val = self.value(i + 1)
            node.members.append((key, key_start, val))
            i = self.ws(val.end)
            if self.text[i] == "}":
                node.end = i + 1
                return node
            assert self.text[i] == ","
            i += 1

    def arr(self, i: int) -> _Node:
        node = _Node("array", i, i)
        i = self.ws(i + 1)
        if self.text[i] == "]":
            node.end = i + 1
            return node
        while True:
            val = self.value(i)
            node.items.append(val)
            i = self.ws(val.end)
            if self.text[i] == "]":
                node.end = i + 1
                return node
            assert self.text[i] == ","
            i += 1


def _source_objects(root: _Node) -> Iterator[tuple[str, _Node]]:
    """Each object that holds a pinnable `source`, with its catalog path (same order as the catalog)."""
    vae = root.get("vae")
    if vae is not None and vae.kind == "object":
        yield "vae", vae
    checkpoints = root.get("checkpoints")
    if checkpoints is not None and checkpoints.kind == "object":
        for key, _, node in checkpoints.members:
            recipe = node.get("recipe") if node.kind == "object" else None
            if recipe is not None and recipe.kind == "object":
                for role, _, model in recipe.members:
                    if role in ("a", "b", "c") and model.kind == "object":
                        yield format_path(("checkpoints", key, "recipe", role)), model
            elif node.kind == "object":
                yield format_path(("checkpoints", key)), node
    templates = root.get("templates")
    if templates is not None and templates.kind == "object":
        for key, _, template in templates.members:
            for kind in ("loras", "embeddings"):
                items = template.get(kind) if template.kind == "object" else None
                if items is not None and items.kind == "array":
                    for index, node in enumerate(items.items):
                        if node.kind == "object":
                            yield format_path(("templates", key, kind, index)), node
    addons = root.get("addons")
    if addons is not None and addons.kind == "object":
        for key, _, node in addons.members:
            if node.kind == "object":
                yield format_path(("addons", key)), node


# ------------------------------------------------------------------------------------------ locking


@dataclass
class LockEntry:
    path: str  # catalog path, e.g. templates.cinematic.loras[0]
    source: str
    status: str  # "filled" | "locked" (already pinned) | "mismatch" | "skipped"
    sha256: str | None = None
    base_model: str | None = None  # civitai only
    note: str = ""

    def line(self) -> str:
        base = f" baseModel={self.base_model!r}" if self.base_model else ""
        sha = f" {self.sha256}" if self.sha256 else ""
        note = f" ({self.note})" if self.note else ""
        return f"{self.status:8} {self.path}: {self.source}{sha}{base}{note}"


@dataclass
class LockReport:
    path: Path
    entries: list[LockEntry]
    changed: bool  # the pins found change the catalog (written unless dry_run)
    dry_run: bool = False

    def format(self) -> str:
        if not self.changed:
            state = "unchanged"
        elif self.dry_run:
            state = "would be updated (dry run: nothing written)"
        else:
            state = "updated"
        head = f"{self.path}: {state}"
        return "\n".join([head, *(e.line() for e in self.entries)])

    @property
    def mismatches(self) -> list[LockEntry]:
        return [e for e in self.entries if e.status == "mismatch"]


def lock_catalog(
    path: str | os.PathLike[str],
    *,
    civitai: CivitaiClient | None = None,
    hf_api: Any = None,
    verify: bool = False,
    dry_run: bool = False,
    family: str = "sdxl",
    policy: RetryPolicy | None = None,
) -> LockReport:
    """Fill missing sha256 pins of civitai: and hf:<file> sources in the catalog at `path`.

    Already-pinned sources are left alone without any request, unless `verify` (then a pin that
    disagrees with the metadata is reported as "mismatch", never overwritten). Civitai's baseModel is
    reported per entry (the catalog has no field for it). `dry_run` computes the report and writes nothing.
    The result is validated with the catalog parser before it is written.
    """
    path = Path(path)
    text = path.read_bytes().decode("utf-8")  # not read_text: keep CRLF line ends as they are
    try:
        root = _Scanner(text).value(0)
    except (ValueError, AssertionError, IndexError) as exc:
        raise SourceError(
            "CATALOG_INVALID", f"{path} is not valid JSON ({exc}); run `fuseline validate {path}`"
        ) from None
    client = civitai
    edits: list[tuple[int, int, str]] = []
    entries: list[LockEntry] = []
    for where, node in _source_objects(root):
        src_node = node.get("source")
        if src_node is None or src_node.kind != "string":
            continue
        raw = src_node.value
        try:
            parsed = parse_source(raw)
        except SourceStringError as exc:
            entries.append(LockEntry(where, raw, "skipped", note=f"invalid source: {exc}"))
            continue
        sha_node = node.get("sha256")
        pinned = sha_node.value.lower() if sha_node is not None and isinstance(sha_node.value, str) else None
        if parsed.scheme not in ("civitai", "hf") or (parsed.scheme == "hf" and not parsed.path):
            status = "locked" if pinned else "skipped"
            note = "" if pinned else f"{parsed.scheme} source: no metadata to read a sha256 from"
            if parsed.scheme == "hf":
                note = "" if pinned else "hf folder: pinned by its revision"
            entries.append(LockEntry(where, raw, status, pinned, note=note))
            continue
        if pinned and not verify:
            entries.append(LockEntry(where, raw, "locked", pinned))
            continue
        base_model = None
        if parsed.scheme == "civitai":
            client = client or CivitaiClient(policy=policy)
            version = client.model_version(parsed.version_id or "0")
            base_model = version.base_model
            found = version.primary_file().sha256
        else:
            found = _hf_sha(parsed, hf_api)
        note = ""
        if base_model is not None and base_model not in FAMILIES.get(family, ()):
            note = f"baseModel {base_model!r} is not {family.upper()}: fetching it will be refused"
        if found is None:
            entries.append(
                LockEntry(where, raw, "locked" if pinned else "skipped", pinned, base_model,
                          note or "metadata has no sha256 (a non-LFS hf file is pinned by its revision)")
            )  # fmt: skip
            continue
        if pinned:
            status = "locked" if pinned == found else "mismatch"
            if status == "mismatch":
                note = f"catalog pins {pinned}, metadata says {found}; check the source" + (
                    f"; {note}" if note else ""
                )
            entries.append(LockEntry(where, raw, status, found, base_model, note))
            continue
        edits.append(_pin_edit(text, node, sha_node, found))
        entries.append(LockEntry(where, raw, "filled", found, base_model, note))

    new_text = text
    for start, end, replacement in sorted(edits, reverse=True):
        new_text = new_text[:start] + replacement + new_text[end:]
    changed = new_text != text
    if changed:
        try:
            parse_catalog(new_text, file=str(path))
        except CatalogError as exc:
            raise SourceError(
                "CATALOG_INVALID",
                f"{path}: after filling sha256 pins the catalog does not validate (nothing written):\n{exc}",
            ) from None
        if not dry_run:
            # Text as it is (CRLF line ends kept); the file's permission bits too.
            atomic_write(path, new_text, mode=path.stat().st_mode & 0o7777)
    return LockReport(path, entries, changed, dry_run)


def _hf_sha(parsed: Any, hf_api: Any) -> str | None:
    try:
        return hf_file_sha256(parsed, api=hf_api)
    except Exception as exc:  # huggingface_hub raises many types; the message is what matters
        raise SourceError(
            "HF_ERROR", f"{parsed.raw}: cannot read file metadata from the hub: {exc}"
        ) from None


def _pin_edit(text: str, node: _Node, sha_node: _Node | None, sha: str) -> tuple[int, int, str]:
    """Where and what to write so the object gets `"sha256": "<sha>"`, in the file's own style."""
    if sha_node is not None:  # "sha256": null or "" -> replace the value only
        return sha_node.start, sha_node.end, json.dumps(sha)
    source_node = node.get("source")
    key_start = node.key_start("source")
    assert source_node is not None and key_start is not None
    line_start = text.rfind("\n", 0, key_start) + 1
    between = text[line_start:key_start]
    if "\n" in text[node.start : node.end] and not between.strip():
        # Multi-line object with "source" on its own line: same indentation on a new line.
        newline = "\r\n" if "\r\n" in text else "\n"
        return source_node.end, source_node.end, f',{newline}{between}"sha256": {json.dumps(sha)}'
    return source_node.end, source_node.end, f', "sha256": {json.dumps(sha)}'
