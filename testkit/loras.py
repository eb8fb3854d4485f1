"""LoRA files for the tiny SDXL kit, one per format fuseline must handle, random from fixed seeds.

Each LoRA is described as data (`LoraSpec`: which modules, which key format, rank, alpha, dtype) and
written by a small function per format. Targets are read off the tiny pipeline's own modules, so the
files always match the kit's shapes. Every file except "sd15" loads into the tiny SDXL with diffusers'
`load_lora_weights` with no key left over: diffusers is the oracle for fuseline's own merge.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

LORA_NAMES = ("kohya_sgm", "kohya_diffusers", "kohya_te", "locon", "peft", "dora", "sd15")

# Linear layers of the UNet's transformer blocks (attention, feed-forward): what kohya's SDXL scripts train.
UNET_ATTENTION = re.compile(
    r"^(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\."
    r"(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2)))$"
)
# ResNet convolutions (3x3 and the 1x1 shortcut) and time projections, what LoCon adds.
UNET_RESNET = re.compile(
    r"^(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)$"
)
UNET_SAMPLER = re.compile(r"^(?:down_blocks\.\d+\.downsamplers|up_blocks\.\d+\.upsamplers)\.0\.conv$")
LOCON_TARGETS = re.compile(f"{UNET_RESNET.pattern}|{UNET_SAMPLER.pattern}|{UNET_ATTENTION.pattern}")
TEXT_ENCODER_LAYER = re.compile(
    r"^(?:text_model\.)?encoder\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc1|mlp\.fc2)$"
)

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


@dataclass(frozen=True)
class LoraSpec:
    """What one kit LoRA file holds."""

    name: str
    seed: int
    rank: int
    # Not equal to the rank, so a loader that ignores alpha is caught. One alpha per file: diffusers 0.42
    # mis-scales attention and text-encoder self_attn modules whose alpha differs from the file's most
    # common one (its alpha_pattern keys do not match), and diffusers is the oracle these files serve.
    alpha: float
    dtype: torch.dtype
    # component -> pattern over that component's module names
    targets: Mapping[str, re.Pattern]
    # keep every n-th matching UNet module (1 = all), to keep files small where coverage does not need all;
    # text encoders always get every match, so each layer has attention and MLP modules
    every: int = 1


SPECS: dict[str, LoraSpec] = {
    spec.name: spec
    for spec in (
        LoraSpec("kohya_sgm", seed=101, rank=4, alpha=2.0, dtype=torch.float16,
                 targets={"unet": UNET_ATTENTION}),
        LoraSpec("kohya_diffusers", seed=102, rank=4, alpha=8.0, dtype=torch.float32,
                 targets={"unet": UNET_ATTENTION}, every=2),
        LoraSpec("kohya_te", seed=103, rank=4, alpha=2.0, dtype=torch.float16,
                 targets={"unet": UNET_ATTENTION, "text_encoder": TEXT_ENCODER_LAYER,
                          "text_encoder_2": TEXT_ENCODER_LAYER}, every=3),
        LoraSpec("locon", seed=104, rank=4, alpha=1.0, dtype=torch.float16,
                 targets={"unet": LOCON_TARGETS},
                 every=2),
        LoraSpec("peft", seed=105, rank=4, alpha=8.0, dtype=torch.float32,
                 targets={"unet": UNET_ATTENTION}, every=2),
        LoraSpec("dora", seed=106, rank=4, alpha=2.0, dtype=torch.float32,
                 targets={"unet": UNET_ATTENTION}, every=3),
    )
}  # fmt: skip

# SD 1.5 shapes (320/640/1280 channels, 768-wide CLIP) under SD 1.5 block names: nothing here fits the tiny
# SDXL (down_blocks.0 has no attentions, to_k takes 96 features, te1 has 3 layers not 12).
SD15_MODULES: dict[str, tuple[int, int]] = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (640, 768),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v": (640, 768),
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": (320, 1280),
    "lora_te_text_model_encoder_layers_11_self_attn_q_proj": (768, 768),
}
SD15_SEED = 107


@dataclass(frozen=True)
class LoraTarget:
    component: str  # "unet", "text_encoder" or "text_encoder_2"
    module: str  # diffusers module name inside that component
    weight_shape: tuple[int, ...]


def select_targets(pipe, spec: LoraSpec) -> list[LoraTarget]:
    targets = []
    for component, pattern in spec.targets.items():
        model = getattr(pipe, component)
        matches = [
            (name, tuple(module.weight.shape))
            for name, module in model.named_modules()
            if pattern.match(name) and isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
        ]
        step = spec.every if component == "unet" else 1
        targets += [LoraTarget(component, name, shape) for name, shape in matches[::step]]
    return targets


def random_pair(
    generator: torch.Generator, weight_shape: tuple[int, ...], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of a LoRA for a weight of `weight_shape`; conv LoRAs use kohya's LoCon shapes
    (down: rank x in x kh x kw, up: out x rank x 1 x 1). Sized so up @ down is comparable to the weight."""
    out_features, in_features, *kernel = weight_shape
    fan_in = in_features * (kernel[0] * kernel[1] if kernel else 1)
    down = torch.randn((rank, in_features, *kernel), generator=generator) / fan_in**0.5
    up = torch.randn((out_features, rank, *([1, 1] if kernel else [])), generator=generator) * (
        0.5 / rank**0.5
    )
    return down, up


def kohya_name(target: LoraTarget, pipe, sgm_layout: bool) -> str:
    """kohya's module name: prefix + dotted path with underscores; SDXL UNet names in SGM layout or not."""
    module = target.module
    if target.component == "unet" and sgm_layout:
        from testkit.sgm import UNET_PREFIX, unet_block_names, unet_key_to_sgm

        blocks = unet_block_names(pipe.unet.config)
        module = unet_key_to_sgm(f"{module}.weight", blocks).removeprefix(UNET_PREFIX).removesuffix(".weight")
    elif target.component != "unet" and not module.startswith("text_model."):
        # kohya names text encoder modules from CLIPTextModel's `text_model.` level, which
        # transformers >= 5.6 no longer has on CLIPTextModel.
        module = f"text_model.{module}"
    return KOHYA_PREFIX[target.component] + module.replace(".", "_")


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA as the file holds it (already cast to the file's dtype)."""

    target: LoraTarget
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    rank: int
    magnitude: torch.Tensor | None = None  # DoRA only: the per-output-row magnitude vector

    def delta(self) -> torch.Tensor:
        """alpha / rank * up @ down in fp32, shaped like the target weight (plain LoRA, scale 1)."""
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)
        return (self.alpha / self.rank) * product.reshape(self.target.weight_shape)


def lora_factors(pipe, spec: LoraSpec, dora: bool = False) -> list[LoraFactors]:
    """Every module's factors of kit LoRA `spec`, drawn from its seed in a fixed order."""
    generator = torch.Generator().manual_seed(spec.seed)
    factors = []
    for target in select_targets(pipe, spec):
        down, up = random_pair(generator, target.weight_shape, spec.rank)
        magnitude = None
        if dora:
            # DoRA's magnitude: the base weight's row norms, perturbed so it is not a no-op.
            weight = getattr(pipe, target.component).get_submodule(target.module).weight.detach()
            noise = 1.0 + 0.2 * torch.randn(weight.shape[0], generator=generator)
            magnitude = (weight.flatten(1).norm(dim=1) * noise).to(spec.dtype)
        factors.append(
            LoraFactors(target, down.to(spec.dtype), up.to(spec.dtype), spec.alpha, spec.rank, magnitude)
        )
    return factors


def kohya_state_dict(pipe, spec: LoraSpec, sgm_layout: bool) -> dict[str, torch.Tensor]:
    state = {}
    for f in lora_factors(pipe, spec):
        name = kohya_name(f.target, pipe, sgm_layout)
        state[f"{name}.lora_down.weight"] = f.down
        state[f"{name}.lora_up.weight"] = f.up
        state[f"{name}.alpha"] = torch.tensor(f.alpha, dtype=spec.dtype)
    return state


def _save(state: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: state[k].contiguous() for k in sorted(state)}, str(path), metadata=metadata)


def write_kohya(pipe, spec: LoraSpec, path: Path, sgm_layout: bool) -> None:
    module = "lycoris.kohya" if spec.name == "locon" else "networks.lora"
    # One metadata key: safetensors writes several in no fixed order.
    _save(kohya_state_dict(pipe, spec, sgm_layout), path, {"ss_network_module": module})


def peft_state_dict(pipe, spec: LoraSpec, dora: bool) -> dict[str, torch.Tensor]:
    """UNet LoRA in PEFT naming (no `unet.` prefix: diffusers' writer adds it)."""
    state = {}
    for f in lora_factors(pipe, spec, dora):
        state[f"{f.target.module}.lora_A.weight"] = f.down
        state[f"{f.target.module}.lora_B.weight"] = f.up
        if f.magnitude is not None:
            state[f"{f.target.module}.lora_magnitude_vector"] = f.magnitude
    return state


def peft_metadata(pipe, spec: LoraSpec, dora: bool) -> dict:
    """The LoraConfig diffusers stores under `lora_adapter_metadata`: without it, alpha reads as rank."""
    from peft import LoraConfig

    modules = sorted({t.module for t in select_targets(pipe, spec)})
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=modules, use_dora=dora).to_dict()
    config["target_modules"] = modules  # a sorted list, so the JSON is the same every build
    config["peft_type"] = str(config["peft_type"].value)
    return config


def write_peft(pipe, spec: LoraSpec, path: Path, dora: bool) -> None:
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.save_lora_weights(
        save_directory=path.parent,
        unet_lora_layers=peft_state_dict(pipe, spec, dora),
        unet_lora_adapter_metadata=peft_metadata(pipe, spec, dora),
        weight_name=path.name,
    )


def write_sd15(path: Path) -> None:
    generator = torch.Generator().manual_seed(SD15_SEED)
    state = {}
    for name, shape in SD15_MODULES.items():
        down, up = random_pair(generator, shape, 4)
        state[f"{name}.lora_down.weight"] = down.half()
        state[f"{name}.lora_up.weight"] = up.half()
        state[f"{name}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    _save(state, path, {"ss_network_module": "networks.lora"})


WRITERS: dict[str, Callable[[object, Path], None]] = {
    "kohya_sgm": lambda pipe, path: write_kohya(pipe, SPECS["kohya_sgm"], path, sgm_layout=True),
    "kohya_diffusers": lambda pipe, path: write_kohya(pipe, SPECS["kohya_diffusers"], path, sgm_layout=False),
    "kohya_te": lambda pipe, path: write_kohya(pipe, SPECS["kohya_te"], path, sgm_layout=True),
    "locon": lambda pipe, path: write_kohya(pipe, SPECS["locon"], path, sgm_layout=True),
    "peft": lambda pipe, path: write_peft(pipe, SPECS["peft"], path, dora=False),
    "dora": lambda pipe, path: write_peft(pipe, SPECS["dora"], path, dora=True),
    "sd15": lambda pipe, path: write_sd15(path),
}


def write_loras(pipe, paths: Mapping[str, Path]) -> None:
    for name, path in paths.items():
        WRITERS[name](pipe, path)


def lora_targets(pipe, name: str) -> list[LoraTarget]:
    """The modules the kit LoRA `name` changes (empty for "sd15", which fits nothing)."""
    return select_targets(pipe, SPECS[name]) if name in SPECS else []


def kit_lora_factors(pipe, name: str) -> list[LoraFactors]:
    """The factors written to kit LoRA `name`, regenerated from its seed: an oracle independent of any
    file reader (`pipe` must be the kit's base pipeline, which DoRA magnitudes are drawn from)."""
    return lora_factors(pipe, SPECS[name], dora=name == "dora")


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def adapter_metadata(path: Path) -> dict:
    """The PEFT LoraConfig stored in a diffusers-written LoRA file ({} when absent)."""
    raw = read_metadata(path).get("lora_adapter_metadata")
    return json.loads(raw) if raw else {}
