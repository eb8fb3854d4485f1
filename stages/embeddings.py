"""Read and check one SDXL textual-inversion embedding file against the base's text encoders.

An SDXL embedding is a safetensors file with two tensors: `clip_l` (vectors x CLIP-L width) for text
encoder 1 and `clip_g` (vectors x OpenCLIP bigG width) for text encoder 2, the same number of vectors in
both (A1111, ComfyUI and diffusers all read this layout). The merge copies the file into the model folder
unchanged and the worker loads it with diffusers' `load_textual_inversion`; what is checked here is what
that load needs, so that a wrong file fails the build naming itself instead of the worker's first job.
Header reads only: no tensor is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fuseline.core.files import sha256_file
from fuseline.core.safetensors_io import SafetensorsError, read_header, sniff_format
from stages.errors import StageError

# Tensor name in the file -> the base component whose token embedding it extends.
SDXL_KEYS: dict[str, str] = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
# Where the token embedding matrix lies in a CLIP text encoder's weights (transformers 5 saves
# CLIPTextModel without the `text_model.` prefix CLIPTextModelWithProjection keeps).
TOKEN_EMBEDDING = ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")
# Keys of the SD 1.x/2.x layouts (A1111's `emb_params`, the original `string_to_param` dict): one encoder.
SD1_KEYS = ("emb_params", "string_to_param", "string_to_token")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class EmbeddingInput:
    """An embedding of a template: the file, its token, the name errors use (the catalog source), and the
    catalog's sha256 pin (checked against the file) when there is one."""

    path: Path
    token: str
    name: str
    sha256: str | None = None


@dataclass(frozen=True)
class LoadedEmbedding:
    token: str
    name: str
    path: Path
    sha256: str
    vectors: int


def _fail(code: str, embedding: EmbeddingInput, message: str) -> StageError:
    return StageError(code, f"embedding {embedding.token} ({embedding.name}): {message}")


def text_encoder_widths(base_shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> dict[str, int]:
    """Token embedding width of each text encoder of the base (component -> width)."""
    widths = {}
    for component in SDXL_KEYS.values():
        shapes = base_shapes.get(component, {})
        shape = next((shapes[name] for name in TOKEN_EMBEDDING if name in shapes), None)
        if shape is None or len(shape) != 2:
            raise StageError(
                "BASE_INVALID",
                f"the base {component} has no token embedding matrix; re-run the convert stage",
            )
        widths[component] = int(shape[1])
    return widths


def read_embedding(embedding: EmbeddingInput, widths: Mapping[str, int]) -> LoadedEmbedding:
    """Check the file is an SDXL embedding whose vectors fit text encoders of `widths`
    (text_encoder_widths)."""
    path = Path(embedding.path)
    if not path.is_file():
        raise _fail("EMBEDDING_MISSING", embedding, f"{path} does not exist; run the fetch stage first")
    try:
        if sniff_format(path) in ("pickle", "torch-zip"):
            raise _fail(
                "EMBEDDING_PICKLE",
                embedding,
                f"{path} is a pickle (torch.save) file, which can run code when loaded; use the .safetensors "
                "release of this embedding",
            )
        header = read_header(path)
    except SafetensorsError as exc:
        code = "EMBEDDING_TRUNCATED" if exc.truncated else "EMBEDDING_INVALID"
        raise _fail(code, embedding, f"{exc.message}; download it again") from None
    except OSError as exc:
        raise _fail("EMBEDDING_UNREADABLE", embedding, f"cannot read {path}: {exc}") from exc
    keys = set(header.tensors)
    if keys & set(SD1_KEYS) or (keys and not keys & set(SDXL_KEYS)):
        raise _fail(
            "EMBEDDING_NOT_SDXL",
            embedding,
            f"{path} holds {', '.join(sorted(keys)) or 'no tensors'}, not the clip_l and clip_g tensors of "
            "an SDXL embedding (an SD 1.x/2.x embedding has one encoder's vectors); use its SDXL release",
        )
    if keys != set(SDXL_KEYS):
        missing = sorted(set(SDXL_KEYS) - keys)
        extra = sorted(keys - set(SDXL_KEYS))
        found = f"lacks {', '.join(missing)}" if missing else f"has extra tensors {', '.join(extra)}"
        raise _fail(
            "EMBEDDING_INVALID",
            embedding,
            f"{path} {found}; an SDXL embedding holds exactly clip_l and clip_g (one per text encoder)",
        )
    vectors = set()
    for key, component in SDXL_KEYS.items():
        info = header.tensors[key]
        width = widths[component]
        if (
            len(info.shape) != 2
            or info.shape[1] != width
            or info.shape[0] < 1
            or info.dtype not in FLOAT_DTYPES
        ):
            raise _fail(
                "EMBEDDING_SHAPE",
                embedding,
                f"{path}: {key} is {info.dtype} {list(info.shape)}, the base {component} takes float vectors "
                f"of width {width} ([vectors, {width}]): an embedding for another model family?",
            )
        vectors.add(info.shape[0])
    if len(vectors) != 1:
        raise _fail(
            "EMBEDDING_SHAPE",
            embedding,
            f"{path}: clip_l has {header.tensors['clip_l'].shape[0]} vectors and clip_g "
            f"{header.tensors['clip_g'].shape[0]}; both encoders need the same number",
        )
    sha256 = sha256_file(path)
    if embedding.sha256 is not None and sha256 != embedding.sha256.lower():
        raise _fail(
            "EMBEDDING_SHA256_MISMATCH",
            embedding,
            f"{path} has sha256 {sha256}, the catalog pins {embedding.sha256}; download again",
        )
    return LoadedEmbedding(embedding.token, embedding.name, path, sha256, vectors.pop())


def check_tokens_free(base_dir: Path, embeddings: list[LoadedEmbedding]) -> None:
    """Refuse a token (or one of its `<token>_<i>` vector names) that the base's tokenizers already know:
    diffusers' `load_textual_inversion` would refuse it in the worker, failing every job of the template."""
    if not embeddings:
        return
    from transformers import CLIPTokenizer

    for folder in ("tokenizer", "tokenizer_2"):
        vocab = CLIPTokenizer.from_pretrained(Path(base_dir) / folder, local_files_only=True).get_vocab()
        for embedding in embeddings:
            names = [embedding.token] + [f"{embedding.token}_{i}" for i in range(1, embedding.vectors)]
            taken = [name for name in names if name in vocab]
            if taken:
                raise StageError(
                    "EMBEDDING_TOKEN_TAKEN",
                    f"embedding {embedding.token} ({embedding.name}): {', '.join(taken)} is already a token "
                    f"of the checkpoint's {folder}, so prompts could not tell the embedding from it; choose "
                    f"another token in templates.json (e.g. with a prefix: emb_{embedding.token})",
                )
