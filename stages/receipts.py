"""Fetch receipts: the small JSON file a fetch-* stage writes for a group of catalog sources (the VAE, one
checkpoint with its config folder, or one template's LoRAs) and the convert, vae and merge stages read.

    {"receipt": 1, "group": "templates.<id>", "sources": [{"where", "source", "kind", "sha256", "size"}]}

A receipt holds no local path, no time and no secret, so it is byte-identical on every machine (the DVC
run-cache and `dvc pull` agree). Its location is the stage's business: dvc.yaml passes it on the command
line of the stage that writes it and of the stages that read it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fuseline.core.files import atomic_write
from stages.errors import StageError

RECEIPT_VERSION = 1
GROUP_KINDS = ("checkpoints", "templates")


def check_group(group: str) -> str:
    """`group` when it is a receipt group (vae, checkpoints.<id>, templates.<id>); StageError otherwise."""
    kind, _, key = group.partition(".")
    if group == "vae" or (kind in GROUP_KINDS and key):
        return group
    raise StageError(
        "RECEIPT_GROUP", f"{group!r} is not a receipt group; use vae, checkpoints.<id> or templates.<id>"
    )


def write_receipt_file(path: str | os.PathLike[str], group: str, entries: list[dict[str, Any]]) -> Path:
    """Write the receipt of `group` with these entries (atomically: DVC never sees half of one)."""
    record = {"receipt": RECEIPT_VERSION, "group": check_group(group), "sources": entries}
    return atomic_write(path, json.dumps(record, indent=2) + "\n")


def read_receipt(path: str | os.PathLike[str] | None, group: str) -> dict[str, dict[str, Any]]:
    """{catalog path: entry} from the receipt at `path`; {} when there is none (a stage run by hand outside
    DVC: then only the catalog's own pins are known). A receipt of another group is refused."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        record = json.loads(Path(path).read_text())
        entries = {entry["where"]: entry for entry in record["sources"]}
        recorded = record["group"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StageError(
            "RECEIPT_INVALID",
            f"{path} is not a fetch receipt ({exc}); delete it and run `dvc repro` to fetch again",
        ) from None
    if recorded != group:
        raise StageError(
            "RECEIPT_INVALID",
            f"{path} is the receipt of {recorded!r}, not {group!r}; check the stage's --receipt in dvc.yaml",
        )
    return entries
