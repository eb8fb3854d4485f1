"""SDXL LoRA block weights in the convention of A1111's "LoRA Block Weight" extension: the block layouts, the
named presets, and which diffusers module each block covers.

The extension (hako-mikan/sd-webui-lora-block-weight, `scripts/lora_block_weight.py`: BLOCKID12, BLOCKID20,
`to26`, `ratiodealer`) takes, for SDXL, either 12 values ("12(XL)": BASE, IN04, IN05, IN07, IN08, MID,
OUT00-OUT05, the blocks that hold attention) or 20 ("20(XL full)", for LyCORIS/LoCon: BASE, IN00-IN08, MID,
OUT00-OUT08). It spreads them over its 26-block table and fills the blocks a list leaves out with 0, so a
12-value list switches off a LoCon's updates in IN00-IN03, IN06 and OUT06-OUT08. BASE scales both text
encoders; INnn, MID and OUTnn are the original (SGM) UNet's `input_blocks.nn`, `middle_block` and
`output_blocks.nn`. A layer in none of these (the time and label embeddings, conv_out) keeps weight 1, as
the extension leaves a layer it cannot place. A module's weight multiplies the LoRA's scale for that module
(the extension multiplies the module's up factor by it).

The extension ships no SDXL presets (its built-in ones are the 17-value SD 1.x lists); the presets here are
the SDXL ones of ComfyUI Inspire Pack's `lbw-preset.txt` (`SDXL-*`), which use the same 12-value layout.

Only the standard library here: the catalog imports this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

BASE = "BASE"
MID = "MID"
BLOCKS_12: tuple[str, ...] = (BASE, "IN04", "IN05", "IN07", "IN08", MID, *(f"OUT{i:02d}" for i in range(6)))
BLOCKS_20: tuple[str, ...] = (
    BASE,
    *(f"IN{i:02d}" for i in range(9)),
    MID,
    *(f"OUT{i:02d}" for i in range(9)),
)
LAYOUTS: dict[int, tuple[str, ...]] = {12: BLOCKS_12, 20: BLOCKS_20}
LAYOUT_TEXT: dict[int, str] = {
    12: "BASE, IN04, IN05, IN07, IN08, MID, OUT00-OUT05",
    20: "BASE, IN00-IN08, MID, OUT00-OUT08",
}
# What the extension's 17- and 26-value lists are: SD 1.x block layouts, which do not describe an SDXL UNet.
SD1_COUNTS = (17, 26)

PRESETS: dict[str, tuple[float, ...]] = {
    "SDXL-NONE": (0,) * 12,
    "SDXL-ALL": (1,) * 12,
    "SDXL-INALL": (1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0),
    "SDXL-MIDALL": (1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0),
    "SDXL-OUTALL": (1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1),
}

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

_DOWN = re.compile(r"^down_blocks\.(\d+)\.(?:(resnets|attentions)\.(\d+)|downsamplers\.0)\.")
_UP = re.compile(r"^up_blocks\.(\d+)\.(?:(resnets|attentions)\.(\d+)|upsamplers\.0)\.")


def resolve(value: Sequence[float] | str) -> tuple[float, ...]:
    """The values of a catalog `block_weights` entry (a list as given, or a preset's). Raises KeyError for
    an unknown preset and ValueError for a count other than 12 or 20 (the catalog checks both first)."""
    values = PRESETS[value] if isinstance(value, str) else tuple(float(v) for v in value)
    if len(values) not in LAYOUTS:
        raise ValueError(
            f"{len(values)} block weights; the SDXL layouts take {' or '.join(map(str, LAYOUTS))}"
        )
    return values


def weights_by_block(values: Sequence[float]) -> dict[str, float]:
    """Block id -> weight for a 12- or 20-value list; blocks the list leaves out are absent (weight 0)."""
    return dict(zip(LAYOUTS[len(values)], (float(v) for v in values), strict=True))


def unet_block(module: str, layers_per_block: int) -> str | None:
    """The block (IN00-IN08, MID, OUT00-OUT08 for SDXL) of a diffusers UNet module or tensor name, or None
    for a layer outside the input, middle and output blocks.

    diffusers has no public map from its UNet names to the original blocks (its single-file converter
    maps the other way), hence this one, from the SGM layout: input_blocks.0 is conv_in; each down block
    holds `layers_per_block` ResNet (+ attention) layers, then its downsampler; each up block one layer
    more, its upsampler in its last layer; the middle block is one block.
    """
    if module.startswith("conv_in."):
        return "IN00"
    if module.startswith("mid_block."):
        return MID
    per_down, per_up = layers_per_block + 1, layers_per_block + 1
    if match := _DOWN.match(module):
        level = int(match.group(1))
        if match.group(2) is None:  # downsampler: the level's last input block
            return f"IN{(level + 1) * per_down:02d}"
        return f"IN{1 + level * per_down + int(match.group(3)):02d}"
    if match := _UP.match(module):
        level = int(match.group(1))
        layer = layers_per_block if match.group(2) is None else int(match.group(3))
        return f"OUT{level * per_up + layer:02d}"
    return None


def module_weight(weights: Mapping[str, float], component: str, tensor: str, layers_per_block: int) -> float:
    """The block weight of one base tensor: BASE for the text encoders, the UNet block's weight (0 for a
    block the list leaves out), 1 for a UNet layer in no block."""
    if component in TEXT_ENCODERS:
        return weights[BASE]
    block = unet_block(tensor, layers_per_block)
    return 1.0 if block is None else weights.get(block, 0.0)
