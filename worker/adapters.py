"""LoRA files as diffusers adapters on a loaded pipeline: checked before loading (never a pickle, the sha256
promised), named as PEFT needs, and loaded with an error naming the file. Shared by the runtime-LoRA
fallback (a template's own LoRAs, worker/fallback.py) and per-job add-ons (worker/addons.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fuseline.core.files import sha256_file
from fuseline.core.safetensors_io import sniff_format
from worker.device import unrecoverable_device_error
from worker.errors import ModelInvalid


def peft_name(text: str) -> str:
    """`text` with every character outside [0-9A-Za-z_] as '_': PEFT joins adapter names into module
    paths, where a '.' or ':' breaks the lookup."""
    return re.sub(r"[^0-9A-Za-z_]", "_", text)


def check_lora_file(path: Path, source: str, sha256: str, fix: str, what: str = "LoRA") -> None:
    """Refuse a pickle, and a file whose content is not `sha256` (a wrong or damaged `what`: a LoRA, an
    embedding); `fix` ends the hash mismatch's message."""
    try:
        if sniff_format(path) in ("pickle", "torch-zip"):
            raise ModelInvalid(
                f"{path} ({what} {source!r}) is a pickle (torch.save) file, which can run code when "
                f"loaded; put the .safetensors release of this {what} there"
            )
        actual = sha256_file(path)
    except OSError as exc:
        raise ModelInvalid(f"{path} ({what} {source!r}): unreadable ({exc})") from None
    if actual != sha256:
        raise ModelInvalid(f"{path} ({what} {source!r}) has sha256 {actual}, not the {sha256} {fix}")


def load_adapter(pipe: Any, path: Path, name: str, source: str, onto: str) -> None:
    """`pipe.load_lora_weights(path, adapter_name=name)`; a file diffusers cannot apply is ModelInvalid
    naming it and `onto` (what it was applied to). Out-of-memory and CUDA errors pass through."""
    import torch

    try:
        pipe.load_lora_weights(str(path), adapter_name=name, local_files_only=True)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        if unrecoverable_device_error(exc) is not None:
            raise
        raise ModelInvalid(
            f"{path} (LoRA {source!r}): diffusers could not apply it to {onto}: {type(exc).__name__}: {exc}"
        ) from None
