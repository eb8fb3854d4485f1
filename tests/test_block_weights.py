"""SDXL block weights (A1111 LoRA Block Weight convention): the layouts, the presets, and which block each
diffusers UNet module belongs to, checked by hand for SDXL's names and against the kit's own SGM key map."""

from __future__ import annotations

import re

import pytest

from fuseline.core import block_weights
from testkit.models import UNET_CONFIG

# SDXL (layers_per_block 2) names and the block the extension puts each in, written out by hand from the
# SGM UNet: input_blocks.0 = conv_in, 1-2 level 0, 3 its downsampler, 4-5 level 1, 6 its downsampler,
# 7-8 level 2; output_blocks 0-2 level 0 (upsampler in 2), 3-5 level 1 (upsampler in 5), 6-8 level 2.
SDXL_BLOCKS = {
    "conv_in.weight": "IN00",
    "down_blocks.0.resnets.0.conv1.weight": "IN01",
    "down_blocks.0.resnets.1.time_emb_proj.weight": "IN02",
    "down_blocks.0.downsamplers.0.conv.weight": "IN03",
    "down_blocks.1.attentions.0.proj_in.weight": "IN04",
    "down_blocks.1.resnets.0.conv_shortcut.weight": "IN04",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight": "IN05",
    "down_blocks.1.downsamplers.0.conv.weight": "IN06",
    "down_blocks.2.attentions.0.transformer_blocks.9.ff.net.2.weight": "IN07",
    "down_blocks.2.resnets.1.conv2.weight": "IN08",
    "mid_block.resnets.0.conv1.weight": "MID",
    "mid_block.attentions.0.transformer_blocks.3.attn1.to_out.0.weight": "MID",
    "up_blocks.0.resnets.0.conv_shortcut.weight": "OUT00",
    "up_blocks.0.attentions.1.proj_out.weight": "OUT01",
    "up_blocks.0.attentions.2.proj_in.weight": "OUT02",
    "up_blocks.0.upsamplers.0.conv.weight": "OUT02",
    "up_blocks.1.resnets.0.conv1.weight": "OUT03",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q.weight": "OUT05",
    "up_blocks.1.upsamplers.0.conv.weight": "OUT05",
    "up_blocks.2.resnets.0.conv2.weight": "OUT06",
    "up_blocks.2.resnets.2.conv1.weight": "OUT08",
    "time_embedding.linear_1.weight": None,
    "add_embedding.linear_2.weight": None,
    "conv_out.weight": None,
}


@pytest.mark.parametrize(("name", "block"), list(SDXL_BLOCKS.items()))
def test_sdxl_module_blocks(name, block):
    assert block_weights.unet_block(name, layers_per_block=2) == block


def test_every_kit_unet_tensor_gets_the_block_of_its_sgm_name(kit_pipeline):
    """Independent check: the kit's diffusers -> SGM key map (testkit.sgm, which writes the kit's
    single-file checkpoint) names the input/middle/output block of every UNet tensor."""
    from testkit.sgm import UNET_PREFIX, unet_block_names, unet_key_to_sgm

    names = unet_block_names(kit_pipeline.unet.config)
    sgm_block = re.compile(r"^(input_blocks|middle_block|output_blocks)\.?(\d+)?\.")
    seen = set()
    for key in kit_pipeline.unet.state_dict():
        match = sgm_block.match(unet_key_to_sgm(key, names).removeprefix(UNET_PREFIX))
        expected = None
        if match:
            kind, index = match.groups()
            expected = (
                "MID"
                if kind == "middle_block"
                else f"{'IN' if kind == 'input_blocks' else 'OUT'}{int(index):02d}"
            )
        assert block_weights.unet_block(key, UNET_CONFIG["layers_per_block"]) == expected, key
        seen.add(expected)
    assert seen == {*block_weights.BLOCKS_20[1:], None}  # the kit has every SDXL block


def test_layouts_are_the_extensions_sdxl_lists():
    assert block_weights.LAYOUTS[12] == (
        "BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"
    )  # fmt: skip
    assert block_weights.LAYOUTS[20] == (
        "BASE",
        *(f"IN{i:02d}" for i in range(9)),
        "MID",
        *(f"OUT{i:02d}" for i in range(9)),
    )


def test_twelve_values_leave_the_other_blocks_at_zero_and_unplaced_layers_at_one():
    weights = block_weights.weights_by_block([0.5, *range(1, 12)])
    assert (
        block_weights.module_weight(weights, "text_encoder", "text_model.encoder.layers.0.mlp.fc1.weight", 2)
        == 0.5
    )
    assert (
        block_weights.module_weight(
            weights, "text_encoder_2", "text_model.encoder.layers.9.mlp.fc2.weight", 2
        )
        == 0.5
    )
    assert block_weights.module_weight(weights, "unet", "down_blocks.1.attentions.0.proj_in.weight", 2) == 1.0
    assert block_weights.module_weight(weights, "unet", "mid_block.resnets.1.conv2.weight", 2) == 5.0
    assert block_weights.module_weight(weights, "unet", "up_blocks.1.upsamplers.0.conv.weight", 2) == 11.0
    zeros = (
        "conv_in.weight",
        "down_blocks.0.resnets.0.conv1.weight",
        "down_blocks.1.downsamplers.0.conv.weight",
        "up_blocks.2.resnets.1.conv1.weight",
    )
    for zero in zeros:
        assert block_weights.module_weight(weights, "unet", zero, 2) == 0.0, zero
    assert block_weights.module_weight(weights, "unet", "time_embedding.linear_1.weight", 2) == 1.0


def test_presets_resolve_to_twelve_values_and_lists_pass_through():
    assert set(block_weights.PRESETS) == {"SDXL-NONE", "SDXL-ALL", "SDXL-INALL", "SDXL-MIDALL", "SDXL-OUTALL"}
    assert block_weights.resolve("SDXL-OUTALL") == (1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1)
    assert block_weights.resolve([1] * 20) == (1.0,) * 20
    with pytest.raises(KeyError):
        block_weights.resolve("ALL")
    with pytest.raises(ValueError, match="17 block weights"):
        block_weights.resolve([1] * 17)
