"""Say what a weights file is (SDXL, SDXL inpainting, SD 1.5, Flux, a LoRA, ...) from its tensor names and
shapes, before converting.

A safetensors header (fuseline.core.safetensors_io) names every tensor with its dtype and shape, so the kind
of model is known without reading a single weight. The signatures below are data: the first one whose
patterns all match names the file. An SDXL file is then told apart by its UNet's input channels (the shape
of its first convolution): 4 for an ordinary checkpoint, 9 for an inpainting one. Only `sdxl`,
`sdxl-inpaint` and `sdxl-refiner` convert.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fuseline.core.safetensors_io import FLOAT_DTYPES, TensorEntry, read_header
from fuseline.core.serving import INPAINT_UNET_IN_CHANNELS, UNET_IN_CHANNELS


@dataclass(frozen=True)
class Signature:
    """A kind of weights file, recognised when every `all_of` pattern and at least one `any_of` pattern match
    some tensor name and no `none_of` pattern does."""

    kind: str
    name: str
    advice: str
    all_of: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()
    none_of: tuple[str, ...] = ()
    _compiled: tuple[tuple[re.Pattern[str], ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = tuple(
            tuple(re.compile(p) for p in group) for group in (self.all_of, self.any_of, self.none_of)
        )
        object.__setattr__(self, "_compiled", compiled)

    def matches(self, keys: list[str]) -> bool:
        all_of, any_of, none_of = self._compiled

        def hit(pattern: re.Pattern[str]) -> bool:
            return any(pattern.search(k) for k in keys)

        return (
            all(hit(p) for p in all_of)
            and (not any_of or any(hit(p) for p in any_of))
            and not any(hit(p) for p in none_of)
        )


_UNET = r"^model\.diffusion_model\."
# The UNet's first convolution in the SGM layout: its weight's second dimension is the input channel count.
UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_NOT_SDXL = (
    "fuseline builds SDXL templates only; use an SDXL base-architecture checkpoint (e.g. Pony, Illustrious)"
)

# Most specific first: a LoRA can carry SDXL-looking names, a refiner shares SDXL's UNet prefix.
SIGNATURES: tuple[Signature, ...] = (
    Signature(
        kind="lora",
        name="a LoRA (or LyCORIS/DoRA adapter), not a checkpoint",
        advice="list it under a template's `loras` instead of under `checkpoints`",
        any_of=(
            r"^lora_(unet|te\d?)_",
            r"\.(lora_down|lora_up|lora_A|lora_B|lora_mid)\.",
            r"\.(hada_w[12]_[ab]|lokr_w[12](_[ab])?|dora_scale)$",
            r"\.lora\.(up|down)\.weight$",
        ),
    ),
    Signature(
        kind="flux",
        name="a Flux model",
        advice=_NOT_SDXL,
        all_of=(
            r"^(model\.diffusion_model\.)?double_blocks\.\d+\.",
            r"^(model\.diffusion_model\.)?single_blocks\.\d+\.",
        ),
    ),
    Signature(
        kind="sd3",
        name="a Stable Diffusion 3 model",
        advice=_NOT_SDXL,
        any_of=(r"^(model\.diffusion_model\.)?joint_blocks\.\d+\.",),
    ),
    Signature(
        kind="sdxl-refiner",
        name="an SDXL refiner (only the OpenCLIP bigG text encoder)",
        advice="a refiner is named by a template's `refiner`, not as its `checkpoint`",
        all_of=(_UNET, r"^conditioner\.embedders\.0\.model\.transformer\."),
    ),
    Signature(
        kind="sdxl",
        name="an SDXL checkpoint",
        advice="",
        # diffusers' own SDXL test is embedders.1's resblock 9; any resblock proves encoder 2 is OpenCLIP.
        all_of=(_UNET, r"^conditioner\.embedders\.1\.model\.transformer\.resblocks\.\d+\."),
    ),
    Signature(
        kind="sd2",
        name="a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H text encoder)",
        advice=_NOT_SDXL,
        all_of=(_UNET, r"^cond_stage_model\.model\."),
    ),
    Signature(
        kind="sd15",
        name="a Stable Diffusion 1.x checkpoint (one CLIP ViT-L text encoder)",
        advice=_NOT_SDXL,
        all_of=(_UNET, r"^cond_stage_model\.transformer\."),
    ),
    Signature(
        kind="unet-only",
        name="a UNet without text encoders or VAE",
        advice="use the full single-file checkpoint (with conditioner.* and first_stage_model.* tensors)",
        all_of=(_UNET,),
    ),
    Signature(
        kind="diffusers-component",
        name="one component of a diffusers folder (e.g. unet/diffusion_pytorch_model.safetensors)",
        advice="point `source` at the whole diffusers folder (the one holding model_index.json)",
        any_of=(
            r"^down_blocks\.\d+\.",
            r"^encoder\.down_blocks\.\d+\.",
            r"^text_model\.encoder\.layers\.\d+\.",
        ),
    ),
    Signature(
        kind="vae",
        name="a VAE, not a checkpoint",
        advice="put it under the catalog's `vae` entry",
        any_of=(r"^(first_stage_model\.)?encoder\.down\.\d+\.", r"^(first_stage_model\.)?decoder\.up\.\d+\."),
    ),
)


@dataclass(frozen=True)
class CheckpointKind:
    kind: str
    name: str
    advice: str

    @property
    def is_sdxl(self) -> bool:
        """An SDXL checkpoint fuseline converts: an ordinary one or an inpainting one."""
        return self.kind in ("sdxl", "sdxl-inpaint")

    @property
    def manifest_kind(self) -> str | None:
        """What fuseline.json records as `checkpoint.kind` (None: an ordinary checkpoint)."""
        return "inpaint" if self.kind == "sdxl-inpaint" else None


UNKNOWN = CheckpointKind("unknown", "not a model fuseline recognises", "use an SDXL single-file checkpoint")
SDXL_INPAINT = CheckpointKind(
    "sdxl-inpaint",
    f"an SDXL inpainting checkpoint ({INPAINT_UNET_IN_CHANNELS}-channel UNet)",
    "",
)


def classify_keys(keys: list[str] | Mapping[str, object]) -> CheckpointKind:
    """The first signature that matches these tensor names."""
    names = list(keys)
    for sig in SIGNATURES:
        if sig.matches(names):
            return CheckpointKind(sig.kind, sig.name, sig.advice)
    return UNKNOWN


def unet_in_channels(tensors: Mapping[str, TensorEntry]) -> int | None:
    """The input channels of an SGM-layout UNet (None: no UNet, or an unexpected first layer)."""
    entry = tensors.get(UNET_CONV_IN)
    return entry.shape[1] if entry is not None and len(entry.shape) == 4 else None


def classify_tensors(tensors: Mapping[str, TensorEntry]) -> CheckpointKind:
    """classify_keys, then for an SDXL file its UNet's input channels: 4 an ordinary checkpoint, 9 an
    inpainting one; any other count (InstructPix2Pix's 8, ...) is a kind fuseline does not serve."""
    kind = classify_keys(list(tensors))
    if kind.kind != "sdxl":
        return kind
    channels = unet_in_channels(tensors)
    if channels is None or channels == UNET_IN_CHANNELS:
        return kind
    if channels == INPAINT_UNET_IN_CHANNELS:
        return SDXL_INPAINT
    return CheckpointKind(
        "sdxl-other-unet",
        f"an SDXL model whose UNet takes {channels} input channels (InstructPix2Pix-style models take 8)",
        f"fuseline serves SDXL checkpoints with a {UNET_IN_CHANNELS}-channel (text-to-image) or "
        f"{INPAINT_UNET_IN_CHANNELS}-channel (inpainting) UNet",
    )


def classify_file(path: str | Path) -> CheckpointKind:
    """The kind of a safetensors file, from its header only (SafetensorsError for a file that is not one)."""
    return classify_tensors(read_header(path).tensors)


def dominant_dtype(tensors: Mapping[str, TensorEntry]) -> str | None:
    """The floating dtype holding most of the values ("F16", "BF16", "F32"): the file's working precision;
    None when the file has no floating-point tensors."""
    weight: Counter[str] = Counter()
    for info in tensors.values():
        if info.dtype in FLOAT_DTYPES:
            weight[info.dtype] += info.numel
    return weight.most_common(1)[0][0] if weight else None


def declares_v_prediction(tensors: Mapping[str, object]) -> bool:
    """NoobAI-style v-prediction checkpoints carry an empty `v_pred` marker tensor (ComfyUI reads it)."""
    return "v_pred" in tensors
