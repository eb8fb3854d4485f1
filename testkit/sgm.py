"""Write a diffusers SDXL pipeline as one safetensors file in the original SGM/LDM key layout.

diffusers ships only the other direction (`diffusers.loaders.single_file_utils`); this is its reverse,
used to make single-file checkpoints like the ones Civitai serves. The tables say what maps to what; the
functions below them only apply the tables. The test oracle is diffusers' own forward conversion
(`from_single_file` must give back every tensor bit for bit).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."
# An SDXL refiner has only the OpenCLIP encoder, as its embedder 0.
REFINER_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.model."

# ---- tables: diffusers name -> SGM name ------------------------------------------------------------

UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Inside a UNet ResBlock (the transformer blocks keep their names in both layouts).
UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
VAE_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# SGM's VAE attention uses 1x1 convolutions where diffusers uses linear layers.
VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_ATTENTION_CONV = {"to_q", "to_k", "to_v", "to_out.0"}

# OpenCLIP (text encoder 2) names.
OPEN_CLIP_TOP_LEVEL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
# OpenCLIP keeps q, k, v as one fused in_proj, in this order.
OPEN_CLIP_QKV = ("q_proj", "k_proj", "v_proj")

_LEAF = r"(?P<leaf>weight|bias)"


class UnmappedKeyError(KeyError):
    """A diffusers tensor this writer has no SGM name for."""


def _unmapped(component: str, key: str) -> UnmappedKeyError:
    return UnmappedKeyError(
        f"{component}: no SGM name for diffusers key {key!r}; add it to the tables in testkit/sgm.py"
    )


def _rename_part(part: str, table: Mapping[str, str], component: str, key: str) -> str:
    """`part` is '<module>.<leaf>'; rename the module through `table`."""
    module, _, leaf = part.rpartition(".")
    if module not in table:
        raise _unmapped(component, key)
    return f"{table[module]}.{leaf}"


# ---- UNet ---------------------------------------------------------------------------------------------


def unet_block_names(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers block prefix -> SGM block prefix, for a UNet config of SDXL's shape."""
    per_level = config["layers_per_block"] + 1  # + the down/upsampler slot
    levels = len(config["block_out_channels"])
    names: dict[str, str] = {}
    for b, block_type in enumerate(config["down_block_types"]):
        for layer in range(config["layers_per_block"]):
            index = 1 + b * per_level + layer
            names[f"down_blocks.{b}.resnets.{layer}"] = f"input_blocks.{index}.0"
            if block_type.startswith("CrossAttn"):
                names[f"down_blocks.{b}.attentions.{layer}"] = f"input_blocks.{index}.1"
        if b < levels - 1:
            names[f"down_blocks.{b}.downsamplers.0.conv"] = (
                f"input_blocks.{1 + b * per_level + per_level - 1}.0.op"
            )
    names["mid_block.resnets.0"] = "middle_block.0"
    names["mid_block.attentions.0"] = "middle_block.1"
    names["mid_block.resnets.1"] = "middle_block.2"
    for b, block_type in enumerate(config["up_block_types"]):
        has_attention = block_type.startswith("CrossAttn")
        for layer in range(per_level):
            index = b * per_level + layer
            names[f"up_blocks.{b}.resnets.{layer}"] = f"output_blocks.{index}.0"
            if has_attention:
                names[f"up_blocks.{b}.attentions.{layer}"] = f"output_blocks.{index}.1"
        if b < levels - 1:
            slot = 2 if has_attention else 1
            names[f"up_blocks.{b}.upsamplers.0.conv"] = (
                f"output_blocks.{b * per_level + per_level - 1}.{slot}.conv"
            )
    return names


_UNET_BLOCK = re.compile(
    r"^(?P<block>(?:down_blocks|up_blocks)\.\d+\.(?:resnets|attentions)\.\d+|mid_block\.(?:resnets|attentions)\.\d+"
    r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv)\.(?P<rest>.+)$"
)


def unet_key_to_sgm(key: str, blocks: Mapping[str, str]) -> str:
    module, _, leaf = key.rpartition(".")
    if module in UNET_TOP_LEVEL:
        return f"{UNET_PREFIX}{UNET_TOP_LEVEL[module]}.{leaf}"
    match = _UNET_BLOCK.match(key)
    if not match or match["block"] not in blocks:
        raise _unmapped("unet", key)
    rest = match["rest"]
    if ".resnets." in match["block"]:
        rest = _rename_part(rest, UNET_RESNET_PARTS, "unet", key)
    return f"{UNET_PREFIX}{blocks[match['block']]}.{rest}"


def unet_to_sgm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    blocks = unet_block_names(config)
    return {unet_key_to_sgm(key, blocks): tensor for key, tensor in state_dict.items()}


# ---- VAE ----------------------------------------------------------------------------------------------

_VAE_RESNET = re.compile(
    r"^(?P<side>encoder|decoder)\.(?P<kind>down|up)_blocks\.(?P<b>\d+)\.resnets\.(?P<j>\d+)\.(?P<rest>.+)$"
)
_VAE_SAMPLER = re.compile(
    r"^(?P<side>encoder|decoder)\.(?P<kind>down|up)_blocks\.(?P<b>\d+)\.(?:downsamplers|upsamplers)\.0\.conv\."
    + _LEAF
    + "$"
)
_VAE_MID_RESNET = re.compile(r"^(?P<side>encoder|decoder)\.mid_block\.resnets\.(?P<j>\d+)\.(?P<rest>.+)$")
_VAE_MID_ATTENTION = re.compile(r"^(?P<side>encoder|decoder)\.mid_block\.attentions\.0\.(?P<rest>.+)$")


def vae_key_to_sgm(key: str, levels: int) -> tuple[str, bool]:
    """(SGM name, whether the tensor is a linear weight SGM stores as a 1x1 conv)."""
    module, _, leaf = key.rpartition(".")
    if module in VAE_TOP_LEVEL:
        return f"{VAE_PREFIX}{VAE_TOP_LEVEL[module]}.{leaf}", False
    if m := _VAE_RESNET.match(key):
        # SGM numbers decoder levels from the bottom (up.0 is the last to run).
        b = int(m["b"]) if m["kind"] == "down" else levels - 1 - int(m["b"])
        part = _rename_part(m["rest"], VAE_RESNET_PARTS, "vae", key)
        return f"{VAE_PREFIX}{m['side']}.{m['kind']}.{b}.block.{m['j']}.{part}", False
    if m := _VAE_SAMPLER.match(key):
        b = int(m["b"]) if m["kind"] == "down" else levels - 1 - int(m["b"])
        sampler = "downsample" if m["kind"] == "down" else "upsample"
        return f"{VAE_PREFIX}{m['side']}.{m['kind']}.{b}.{sampler}.conv.{m['leaf']}", False
    if m := _VAE_MID_RESNET.match(key):
        part = _rename_part(m["rest"], VAE_RESNET_PARTS, "vae", key)
        return f"{VAE_PREFIX}{m['side']}.mid.block_{int(m['j']) + 1}.{part}", False
    if m := _VAE_MID_ATTENTION.match(key):
        module, _, leaf = m["rest"].rpartition(".")
        if module not in VAE_ATTENTION_PARTS:
            raise _unmapped("vae", key)
        as_conv = module in VAE_ATTENTION_CONV and leaf == "weight"
        return f"{VAE_PREFIX}{m['side']}.mid.attn_1.{VAE_ATTENTION_PARTS[module]}.{leaf}", as_conv
    raise _unmapped("vae", key)


def vae_to_sgm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    levels = len(config["block_out_channels"])
    out = {}
    for key, tensor in state_dict.items():
        name, as_conv = vae_key_to_sgm(key, levels)
        out[name] = tensor[:, :, None, None] if as_conv else tensor
    return out


# ---- text encoders ------------------------------------------------------------------------------------


def clip_to_sgm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text encoder 1 (CLIP ViT-L layout, HF names under `transformer.`)."""
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); SGM files keep it.
    return {
        TEXT_ENCODER_PREFIX + (key if key.startswith("text_model.") else f"text_model.{key}"): tensor
        for key, tensor in state_dict.items()
    }


_OPEN_CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(?P<i>\d+)\.(?P<rest>.+)$")


def open_clip_to_sgm(
    state_dict: Mapping[str, torch.Tensor], prefix: str = TEXT_ENCODER_2_PREFIX
) -> dict[str, torch.Tensor]:
    """Text encoder 2 (CLIPTextModelWithProjection) -> OpenCLIP layout (under `prefix`:
    `conditioner.embedders.1.model.` in a base checkpoint, `...0.model.` in a refiner)."""
    TEXT_ENCODER_2_PREFIX = prefix
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key in OPEN_CLIP_TOP_LEVEL:
            out[TEXT_ENCODER_2_PREFIX + OPEN_CLIP_TOP_LEVEL[key]] = tensor
        elif key == "text_projection.weight":
            # OpenCLIP computes x @ text_projection; a linear layer computes x @ weight.T.
            out[TEXT_ENCODER_2_PREFIX + "text_projection"] = tensor.T.contiguous()
        elif m := _OPEN_CLIP_LAYER.match(key):
            prefix = f"{TEXT_ENCODER_2_PREFIX}transformer.resblocks.{m['i']}."
            module, _, leaf = m["rest"].rpartition(".")
            projection = module.removeprefix("self_attn.")
            if projection in OPEN_CLIP_QKV:
                fused.setdefault((prefix, leaf), {})[projection] = tensor
            else:
                out[prefix + _rename_part(m["rest"], OPEN_CLIP_LAYER_PARTS, "text_encoder_2", key)] = tensor
        else:
            raise _unmapped("text_encoder_2", key)
    for (prefix, leaf), parts in fused.items():
        if set(parts) != set(OPEN_CLIP_QKV):
            raise _unmapped(
                "text_encoder_2", f"{prefix}in_proj_{leaf} (missing {set(OPEN_CLIP_QKV) - set(parts)})"
            )
        out[f"{prefix}attn.in_proj_{leaf}"] = torch.cat([parts[p] for p in OPEN_CLIP_QKV], dim=0)
    return out


# ---- whole pipeline -----------------------------------------------------------------------------------


def pipeline_to_sgm(pipe) -> dict[str, torch.Tensor]:
    """Every weight of an SDXL pipeline under its SGM single-file name."""
    state: dict[str, torch.Tensor] = {}
    parts = (
        unet_to_sgm(pipe.unet.state_dict(), pipe.unet.config),
        vae_to_sgm(pipe.vae.state_dict(), pipe.vae.config),
        clip_to_sgm(pipe.text_encoder.state_dict()),
        open_clip_to_sgm(pipe.text_encoder_2.state_dict()),
    )
    for part in parts:
        clash = state.keys() & part.keys()
        if clash:
            raise ValueError(
                f"SGM names produced twice: {sorted(clash)[:5]}; fix the tables in testkit/sgm.py"
            )
        state.update(part)
    return state


def refiner_to_sgm(pipe) -> dict[str, torch.Tensor]:
    """Every weight of an SDXL refiner pipeline (no text_encoder) under its SGM single-file name."""
    state = unet_to_sgm(pipe.unet.state_dict(), pipe.unet.config)
    state.update(vae_to_sgm(pipe.vae.state_dict(), pipe.vae.config))
    state.update(open_clip_to_sgm(pipe.text_encoder_2.state_dict(), REFINER_TEXT_ENCODER_PREFIX))
    return state


def write_single_file(pipe, path: Path) -> None:
    """Write `pipe`'s weights as one SGM-layout safetensors file (dtype unchanged), in sorted key order."""
    from safetensors.torch import save_file

    state = refiner_to_sgm(pipe) if getattr(pipe, "text_encoder", None) is None else pipeline_to_sgm(pipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: state[k].detach().contiguous() for k in sorted(state)}, str(path), metadata={"format": "pt"}
    )
