"""hf:<org>/<repo>[/<path>]@<revision> sources through huggingface_hub (no hand-written hub client).

huggingface_hub downloads into its own cache layout under `<cache>/hf` (blobs + snapshots; xet storage
when the repo uses it, through hf_xet), reads HF_TOKEN and honours HF_HUB_OFFLINE; we add the sha256 pin
check and the pickle refusal. A repository without a path is a folder (snapshot_download).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fuseline.core.catalog.sources import ParsedSource
from fuseline.core.files import sha256_file
from stages.sources.errors import SourceError
from stages.sources.safety import check_pickle_policy

TOKEN_HINT = "set HF_TOKEN to a Hugging Face access token that can read it (and accept the repo's terms)"
# What a diffusers config folder needs: configs and tokenizers, never the weights.
CONFIG_FOLDER_PATTERNS = ("*.json", "*.txt", "tokenizer*/*", "*/tokenizer*", "*.model")
# Never fetched in a folder snapshot: pickles (unless allow_pickle) and other frameworks' weights, which
# diffusers repos often carry beside the safetensors (a VAE repo: .bin, .msgpack, .h5, .onnx copies).
PICKLE_PATTERNS = ("*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl")
FOREIGN_WEIGHT_PATTERNS = ("*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.ot", "*.tflite", "*.mlmodel*")


def hf_download_kwargs(
    parsed: ParsedSource,
    cache_dir: Path,
    *,
    allow_patterns: tuple[str, ...] | None = None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Arguments for hf_hub_download (a file) or snapshot_download (a folder)."""
    if parsed.scheme != "hf" or not parsed.repo or not parsed.revision:
        raise ValueError(f"{parsed.raw!r} is not a pinned hf: source")
    kwargs: dict[str, Any] = {
        "repo_id": parsed.repo,
        "revision": parsed.revision,
        "cache_dir": str(Path(cache_dir) / "hf"),
    }
    if os.environ.get("HF_TOKEN"):
        kwargs["token"] = os.environ["HF_TOKEN"]
    if os.environ.get("HF_ENDPOINT"):
        kwargs["endpoint"] = os.environ["HF_ENDPOINT"]
    if parsed.path:
        kwargs["filename"] = parsed.path
    else:
        if allow_patterns:
            kwargs["allow_patterns"] = list(allow_patterns)
        kwargs["ignore_patterns"] = [*FOREIGN_WEIGHT_PATTERNS, *(() if allow_pickle else PICKLE_PATTERNS)]
    return kwargs


def fetch_hf(
    parsed: ParsedSource,
    *,
    cache_dir: Path,
    sha256: str | None = None,
    allow_pickle: bool = False,
    allow_patterns: tuple[str, ...] | None = None,
) -> Path:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download, snapshot_download

    kwargs = hf_download_kwargs(parsed, cache_dir, allow_patterns=allow_patterns, allow_pickle=allow_pickle)
    source = parsed.raw
    try:
        path = Path(hf_hub_download(**kwargs)) if parsed.path else Path(snapshot_download(**kwargs))
    except hf_errors.GatedRepoError:
        raise SourceError("AUTH_REQUIRED", f"{source}: the repository is gated; {TOKEN_HINT}") from None
    except hf_errors.RepositoryNotFoundError:
        raise SourceError(
            "NOT_FOUND", f"{source}: repository {parsed.repo} not found (or private: {TOKEN_HINT})"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise SourceError(
            "NOT_FOUND", f"{source}: revision {parsed.revision} not found in {parsed.repo}"
        ) from None
    except hf_errors.LocalEntryNotFoundError as exc:
        raise SourceError(
            "NOT_CACHED",
            f"{source}: not in the local Hugging Face cache ({kwargs['cache_dir']}) and the hub cannot be "
            f"reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}): {exc}",
        ) from None
    except hf_errors.EntryNotFoundError:
        raise SourceError(
            "NOT_FOUND", f"{source}: no file {parsed.path} in {parsed.repo}@{parsed.revision}"
        ) from None
    except hf_errors.HfHubHTTPError as exc:
        raise SourceError("HF_ERROR", f"{source}: {exc}") from None
    if parsed.path:
        if sha256:
            actual = sha256_file(path)
            if actual != sha256.lower():
                raise SourceError(
                    "SHA256_MISMATCH",
                    f"{source}: {path} has sha256 {actual}, but templates.json pins {sha256.lower()}; "
                    "fix the pin (fuseline lock reads it from the hub) or the revision",
                )
        check_pickle_policy(path, allow_pickle=allow_pickle, source=source)
    return path


def hf_file_sha256(parsed: ParsedSource, *, api: Any = None) -> str | None:
    """The file's sha256 from hub metadata (LFS files carry it); None for a small non-LFS file, whose
    only hash on the hub is a git blob id."""
    from huggingface_hub import HfApi

    if not parsed.path:
        return None
    api = api or HfApi(
        endpoint=os.environ.get("HF_ENDPOINT") or None, token=os.environ.get("HF_TOKEN") or None
    )
    infos = api.get_paths_info(parsed.repo, [parsed.path], revision=parsed.revision)
    for info in infos:
        lfs = getattr(info, "lfs", None)
        if getattr(info, "path", None) == parsed.path and lfs is not None:
            sha = lfs["sha256"] if isinstance(lfs, dict) else lfs.sha256
            return str(sha).lower()
    return None
