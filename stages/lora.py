"""Read one LoRA file (kohya/A1111, LoCon, PEFT/diffusers, DoRA, LyCORIS) into per-base-tensor factors.

Key names are not mapped by hand: diffusers' `StableDiffusionXLPipeline.lora_state_dict` (defined on
`StableDiffusionXLLoraLoaderMixin`) turns kohya names (original SGM layout or diffusers-style) into diffusers
module names, and diffusers' own state-dict converters turn those into PEFT module names, exactly as
`load_lora_weights` does. What is left to us is small and lives in the tables below: which component a key
belongs to, which role a key suffix plays, and the `text_model.` prefix that transformers 5 dropped from
CLIPTextModel.

LyCORIS modules in kohya naming (LoHa `hada_*`, LoKr `lokr_*`, LoCon with a Tucker core `lora_mid`, and
kohya-format DoRA `dora_scale`), which diffusers cannot load, are taken out of the file before diffusers
sees it and replaced by empty stand-in `lora_down`/`lora_up` keys under the same module name, so that
diffusers still names their modules; their own tensors become stages/lycoris.py factors.

Placement is strict: every key of the file must land on a base tensor of the right shape, or the whole
LoRA is refused with the offending keys listed. A silently skipped key is a wrong model.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fuseline.core.files import sha256_file
from fuseline.core.safetensors_io import SafetensorsError, SafetensorsHeader, read_header, sniff_format
from stages.errors import StageError
from stages.fuse import LoraFactors, factor_shape_problem, magnitude_problem
from stages.lycoris import LohaFactors, LokrFactors, LycorisFactors, TuckerLoconFactors, alpha_scale

log = logging.getLogger("fuseline.stages.lora")

# ---------------------------------------------------------------------------------------------------------
# Tables: what maps to what (kept apart from the code that moves tensors).

# LoRA key prefix (diffusers naming) -> component folder of the base.
COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS: tuple[str, ...] = ("text_encoder", "text_encoder_2")

# Key suffix (after diffusers' conversion to PEFT naming) -> role of the tensor in the module's update.
ROLE_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".lora_B.bias", "up_bias"),
)

# Module-name spellings of the same CLIP tensor: transformers 5 saves CLIPTextModel without the
# `text_model.` prefix that CLIPTextModelWithProjection (and older checkpoints and LoRAs) keep.
TEXT_MODEL_PREFIX = "text_model."

# Formats recognised by their keys and refused by name (no SDXL loader to prove a merge of them against).
REFUSED_FORMATS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.(oft_blocks|oft_diag|oft_r)"), "LyCORIS/PEFT OFT or BOFT"),
    (re.compile(r"\.(on_input|weight_ia3)$"), "IA3"),
    (re.compile(r"\.(diff|diff_b)$"), "LyCORIS full weight difference (diff)"),
    (re.compile(r"\.(w_norm|b_norm)$"), "LyCORIS norm layers"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "LyCORIS GLoRA (a1/a2/b1/b2)"),
)
REFUSED_FIX = (
    "use a LoRA, LoCon, LoHa, LoKr or DoRA release of it, or extract a LoRA from a checkpoint it was merged "
    "into (kohya sd-scripts networks/extract_lora_from_models.py)"
)

SUPPORTED_FORMATS = (
    "kohya/A1111 LoRA and LoCon (lora_down/lora_up/alpha, original or diffusers-style names), "
    "PEFT/diffusers LoRA and DoRA (lora_A/lora_B/lora_magnitude_vector, alpha from the adapter metadata), "
    "LyCORIS in kohya naming: LoHa (hada_*), LoKr (lokr_*), LoCon with a Tucker core (lora_mid), "
    "kohya-format DoRA (dora_scale)"
)

# LyCORIS in kohya naming: `<module>.<suffix>` -> the tensor's role in stages/lycoris.py (or LoraFactors).
# A module is read here (not by diffusers) when one of its keys has a suffix starting with a marker.
LYCORIS_ROLES: dict[str, str] = {
    "hada_w1_a": "w1_a", "hada_w1_b": "w1_b", "hada_w2_a": "w2_a", "hada_w2_b": "w2_b",
    "hada_t1": "t1", "hada_t2": "t2",
    "lokr_w1": "w1", "lokr_w1_a": "w1_a", "lokr_w1_b": "w1_b",
    "lokr_w2": "w2", "lokr_w2_a": "w2_a", "lokr_w2_b": "w2_b", "lokr_t2": "t2",
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "dora_scale": "magnitude", "alpha": "alpha",
}  # fmt: skip
LYCORIS_MARKERS: dict[str, str] = {
    "hada_": "LoHa", "lokr_": "LoKr", "lora_mid.": "LoCon", "dora_scale": "LoCon"
}  # fmt: skip
# The roles each kind may have (required, optional), besides alpha and a DoRA magnitude.
LYCORIS_KINDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "LoHa": (frozenset({"w1_a", "w1_b", "w2_a", "w2_b"}), frozenset({"t1", "t2"})),
    "LoKr": (frozenset(), frozenset({"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"})),
    "LoCon": (frozenset({"down", "up"}), frozenset({"mid"})),
}
KOHYA_PREFIXES: tuple[str, ...] = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
SHOW_KEYS = 10


# ---------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class LoraInput:
    """A LoRA of a template: the file, its strength, and the name errors and the manifest use (the catalog
    source). A given sha256 is checked against the file. `block_weights`: 12 or 20 per-block strengths
    (fuseline/block_weights.py), or None for the same strength everywhere."""

    path: Path
    scale: float
    name: str
    sha256: str | None = None
    block_weights: tuple[float, ...] | None = None


@dataclass
class LoadedLora:
    name: str
    path: Path
    sha256: str
    # (component, base tensor name) -> factors
    factors: dict[tuple[str, str], LoraFactors | LycorisFactors]
    # component -> keys of the file placed on it (their sum is every key of the file)
    placed_keys: dict[str, int]
    file_keys: int = 0


@dataclass
class _Module:
    """The tensors of one adapted module, with the keys they came from (for error messages)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


@dataclass
class _LycorisModule:
    """A LyCORIS module of the file: its kind, its tensors by role, and its keys."""

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# The file


def _fail(code: str, lora: str, message: str) -> StageError:
    return StageError(code, f"LoRA {lora}: {message}")


def read_lora_header(path: Path, lora: str) -> SafetensorsHeader:
    """The safetensors header of a LoRA file, checked against the file size so that a truncated or foreign
    file fails here with its name, not deep inside a loader. A pickle is refused by its bytes (whatever
    its name), a safetensors file by its layout first: its header length may start with 0x80 too."""
    try:
        fmt = sniff_format(path)
        if fmt in ("pickle", "torch-zip"):
            raise _fail(
                "LORA_PICKLE",
                lora,
                f"{path} is a pickle (torch.save) file, which can run code when loaded; "
                "use the .safetensors release of this LoRA",
            )
        header = read_header(path)
    except SafetensorsError as exc:
        code = "LORA_TRUNCATED" if exc.truncated else "LORA_INVALID"
        raise _fail(code, lora, f"{exc.message}; download it again") from None
    except OSError as exc:
        raise _fail("LORA_UNREADABLE", lora, f"cannot read {path}: {exc}") from exc
    if not header.tensors:
        raise _fail("LORA_EMPTY", lora, f"{path} holds no tensors")
    return header


def refused_format(keys: list[str]) -> tuple[str, str] | None:
    """(format name, example key) when the keys belong to a format this merge refuses."""
    for key in keys:
        for pattern, name in REFUSED_FORMATS:
            if pattern.search(key):
                return name, key
    return None


# ---------------------------------------------------------------------------------------------------------
# LyCORIS modules (kohya naming)


def _lycoris_kind(suffix: str) -> str | None:
    return next((kind for marker, kind in LYCORIS_MARKERS.items() if suffix.startswith(marker)), None)


def split_lycoris(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[int, _LycorisModule], list[str]]:
    """Take the LyCORIS modules out of a kohya-named state dict.

    Returns the state dict for diffusers (LyCORIS keys replaced by an empty `lora_down`/`lora_up` pair per
    module, so that diffusers names the module), the modules by the id() of their stand-in down tensor (it
    comes out of the conversion under the module's PEFT name), and the keys that cannot be read.
    """
    kinds: dict[str, set[str]] = {}
    for key in state_dict:
        name, _, suffix = key.partition(".")
        if (kind := _lycoris_kind(suffix)) is not None:
            kinds.setdefault(name, set()).add(kind)
    if not kinds:
        return state_dict, {}, []
    remaining: dict[str, torch.Tensor] = {}
    grouped: dict[str, dict[str, torch.Tensor]] = {name: {} for name in kinds}
    for key, tensor in state_dict.items():
        name = key.partition(".")[0]
        grouped.get(name, remaining)[key] = tensor
    modules: dict[int, _LycorisModule] = {}
    problems: list[str] = []
    for name, tensors in sorted(grouped.items()):
        # A LoCon marker (lora_mid, dora_scale) alongside hada_/lokr_ keys is a DoHa/DoKr magnitude.
        found = sorted(kinds[name] - {"LoCon"}) or ["LoCon"]
        first = min(tensors)
        if len(found) > 1:
            problems.append(f"{first}: mixes LyCORIS kinds ({' and '.join(found)}) in one module")
            continue
        if not name.startswith(KOHYA_PREFIXES):
            problems.append(
                f"{first}: a LyCORIS module outside kohya naming ({', '.join(KOHYA_PREFIXES)}), which is "
                "the naming fuseline reads LyCORIS files in"
            )
            continue
        module = _LycorisModule(kind=found[0])
        for key, tensor in sorted(tensors.items()):
            role = LYCORIS_ROLES.get(key.partition(".")[2])
            if role is None:
                problems.append(f"{key}: not a {module.kind} tensor this merge knows")
                continue
            module.tensors[role] = tensor
            module.keys.append(key)
        down, up = torch.empty(0), torch.empty(0)
        remaining[f"{name}.lora_down.weight"], remaining[f"{name}.lora_up.weight"] = down, up
        modules[id(down)] = module
    return remaining, modules, problems


def _magnitude_per_input(magnitude: torch.Tensor, weight_shape: tuple[int, ...]) -> bool:
    """A (1, in, 1, ...) `dora_scale` (LyCORIS's wd_on_out=False) rather than (out, 1, ...)."""
    shape = magnitude.shape
    return magnitude.ndim >= 2 and shape[0] != weight_shape[0] and shape[1] == weight_shape[1]


def lycoris_factors(
    module: _LycorisModule, weight_shape: tuple[int, ...]
) -> tuple[LoraFactors | LycorisFactors | None, str | None]:
    """(factors, None) for a LyCORIS module that fits a base weight of `weight_shape`, else (None, why)."""
    tensors = dict(module.tensors)
    alpha_tensor, magnitude = tensors.pop("alpha", None), tensors.pop("magnitude", None)
    required, optional = LYCORIS_KINDS[module.kind]
    if missing := sorted(required - set(tensors)):
        return None, f"{module.kind} module without its {', '.join(missing)} tensor(s)"
    if stray := sorted(set(tensors) - required - optional):
        return None, f"{module.kind} module with tensors of another kind ({', '.join(stray)})"
    if alpha_tensor is not None and alpha_tensor.numel() != 1:
        return None, f"alpha has {alpha_tensor.numel()} values, expected one"
    alpha = None if alpha_tensor is None else float(alpha_tensor.item())
    dora = {"magnitude": magnitude, "magnitude_per_input": False}
    if magnitude is not None:
        dora["magnitude_per_input"] = _magnitude_per_input(magnitude, weight_shape)
    factors: LoraFactors | LycorisFactors
    if module.kind == "LoHa":
        factors = LohaFactors(alpha=alpha, **tensors, **dora)
    elif module.kind == "LoKr":
        factors = LokrFactors(alpha=alpha, **tensors, **dora)
    elif "mid" in tensors:
        factors = TuckerLoconFactors(alpha=alpha, **tensors, **dora)
    else:
        # kohya-format DoRA on a LoRA/LoCon module: alpha read as LyCORIS reads it (missing or 0: rank).
        rank = int(tensors["down"].shape[0])
        factors = LoraFactors(alpha=alpha_scale(alpha, rank) * rank, **tensors, **dora)
    if isinstance(factors, LoraFactors):
        problem = factor_shape_problem(factors, weight_shape)
    else:
        problem = factors.shape_problem(weight_shape) or magnitude_problem(factors, weight_shape)
    return (None, problem) if problem else (factors, None)


# ---------------------------------------------------------------------------------------------------------
# Key conversion (diffusers does the naming)


def _to_diffusers_names(
    state_dict: dict[str, torch.Tensor], unet_config: Any, lora: str
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """diffusers module naming for every key, and kohya's alphas keyed as diffusers keys them."""
    # The loader mixin that gives StableDiffusionXLPipeline this classmethod: the same code without
    # importing the pipeline module and its model classes (about 0.5-1 s of CPU per merge).
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    try:
        converted, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
            dict(state_dict), unet_config=unet_config
        )
    except (ValueError, KeyError, IndexError) as exc:
        raise _fail(
            "LORA_UNSUPPORTED",
            lora,
            f"diffusers cannot read its keys ({exc}); supported: {SUPPORTED_FORMATS}",
        ) from exc
    return converted, dict(alphas or {})


def _to_peft_names(component: str, names: dict[str, str]) -> dict[str, str]:
    """PEFT key -> diffusers key, for one component's keys (prefix removed), using diffusers' own renaming
    tables, as `load_lora_into_unet` / `load_lora_into_text_encoder` do."""
    from diffusers.utils.state_dict_utils import (
        DIFFUSERS_OLD_TO_DIFFUSERS,
        DIFFUSERS_TO_PEFT,
        convert_state_dict,
        convert_unet_state_dict_to_peft,
    )

    # The converters only rename keys; carrying the original key as the value tracks each rename.
    if component == "unet":
        return convert_unet_state_dict_to_peft(names)
    # diffusers guesses the text encoder naming style once per file, and cannot guess it for a file whose
    # only attention LoRAs are q/k/v ("Could not automatically infer state dict type"). The renames are
    # per key, so apply both steps (old diffusers -> diffusers -> PEFT) key by key; PEFT keys pass unchanged.
    renamed: dict[str, str] = {}
    for key, source in names.items():
        step = convert_state_dict({key: source}, DIFFUSERS_OLD_TO_DIFFUSERS)
        renamed.update(convert_state_dict(step, DIFFUSERS_TO_PEFT))
    return renamed


def _split_role(key: str) -> tuple[str, str] | None:
    for suffix, role in ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _base_tensor(component: str, module: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The base tensor a module's LoRA updates (`<module>.weight`), allowing for the `text_model.` prefix."""
    candidates = [f"{module}.weight"]
    if component in TEXT_ENCODERS:
        if module.startswith(TEXT_MODEL_PREFIX):
            candidates.append(f"{module.removeprefix(TEXT_MODEL_PREFIX)}.weight")
        else:
            candidates.append(f"{TEXT_MODEL_PREFIX}{module}.weight")
    return next((name for name in candidates if name in shapes), None)


@dataclass(frozen=True)
class _AlphaRule:
    """How alpha is found for a module: kohya per-module alphas, PEFT adapter metadata, or alpha = rank."""

    kohya: Mapping[str, float] | None = None
    peft: Mapping[str, Any] | None = None

    def alpha(self, module: str, down_key: str, rank: int) -> tuple[float, bool, str | None]:
        """(alpha, use_rslora, consumed kohya alpha key)."""
        if self.kohya is not None:
            # diffusers names a kohya alpha after its down key (lora_conversion_utils._get_alpha_name).
            alpha_key = down_key.split(".lora.")[0] + ".alpha"
            if alpha_key in self.kohya:
                return float(self.kohya[alpha_key]), False, alpha_key
            return float(rank), False, None
        if self.peft is not None:
            from peft.utils.other import get_pattern_key

            # PEFT's LoraConfig resolution: rank_pattern / alpha_pattern matched on the module path.
            alpha_pattern = self.peft.get("alpha_pattern") or {}
            key = get_pattern_key(alpha_pattern.keys(), module)
            alpha = alpha_pattern.get(key, self.peft.get("lora_alpha", rank))
            return float(alpha), bool(self.peft.get("use_rslora", False)), None
        # No alpha anywhere: the diffusers/PEFT convention is alpha = rank (scale 1).
        return float(rank), False, None


def _peft_metadata(metadata: Mapping[str, str], component: str, lora: str) -> dict[str, Any] | None:
    """diffusers' `lora_adapter_metadata` (a LoraConfig per component, keys prefixed `<component>.`)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise _fail("LORA_INVALID", lora, f"lora_adapter_metadata is not JSON ({exc})") from exc
    prefix = f"{component}."
    config = {k.removeprefix(prefix): v for k, v in data.items() if k.startswith(prefix)}
    return config or None


def _check_peft_rank(config: Mapping[str, Any] | None, module: str, rank: int) -> str | None:
    if not config:
        return None
    from peft.utils.other import get_pattern_key

    rank_pattern = config.get("rank_pattern") or {}
    expected = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", rank))
    if int(expected) != rank:
        return f"adapter metadata says rank {expected}, the factors have rank {rank}"
    return None


# ---------------------------------------------------------------------------------------------------------
# Reading and placing


def read_lora(
    lora: LoraInput,
    base_shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
    unet_config: Any,
) -> LoadedLora:
    """Read and place one LoRA on a base whose tensor shapes per component are `base_shapes`.

    `unet_config` is the base UNet's config as an object with attributes (diffusers needs
    `layers_per_block` to renumber original-layout kohya blocks).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path, name = Path(lora.path), lora.name
    if not path.is_file():
        raise _fail("LORA_MISSING", name, f"{path} does not exist; run the download stage first")
    header = read_lora_header(path, name)
    metadata = header.metadata
    refused = refused_format(sorted(header.tensors))
    if refused is not None:
        raise _fail(
            "LORA_FORMAT_UNSUPPORTED",
            name,
            f"{path} is {refused[0]} (key {refused[1]}), which fuseline does not merge; fix: {REFUSED_FIX}. "
            f"Supported: {SUPPORTED_FORMATS}",
        )
    sha256 = sha256_file(path)
    if lora.sha256 is not None and sha256 != lora.sha256.lower():
        raise _fail(
            "LORA_SHA256_MISMATCH",
            name,
            f"{path} has sha256 {sha256}, the catalog pins {lora.sha256}; download again",
        )
    try:
        state_dict = load_file(str(path))
    except SafetensorError as exc:
        raise _fail(
            "LORA_INVALID", name, f"{path} cannot be read as safetensors ({exc}); download it again"
        ) from exc
    file_keys = len(state_dict)

    state_dict, lycoris_modules, problems = split_lycoris(state_dict)
    converted, kohya_alphas = _to_diffusers_names(state_dict, unet_config, name)
    factors: dict[tuple[str, str], LoraFactors | LycorisFactors] = {}
    placed: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    consumed_alphas: set[str] = set()

    by_component: dict[str, dict[str, str]] = {c: {} for c in COMPONENTS}
    for key in converted:
        component = key.split(".", 1)[0]
        if component in by_component:
            by_component[component][key.removeprefix(f"{component}.")] = key
        else:
            problems.append(f"{key}: belongs to no SDXL component ({', '.join(COMPONENTS)})")

    for component in COMPONENTS:
        keys = by_component[component]
        if not keys:
            continue
        shapes = base_shapes.get(component, {})
        peft_names = _to_peft_names(component, keys)
        peft_config = _peft_metadata(metadata, component, name)
        rule = _AlphaRule(
            kohya=kohya_alphas if kohya_alphas else None, peft=None if kohya_alphas else peft_config
        )

        modules: dict[str, _Module] = {}
        for peft_key, source_key in peft_names.items():
            split = _split_role(peft_key)
            if split is None:
                problems.append(f"{source_key}: not a LoRA factor this merge knows")
                continue
            module, role = split
            entry = modules.setdefault(module, _Module())
            entry.tensors[role] = converted[source_key]
            entry.sources[role] = source_key

        for module, entry in sorted(modules.items()):
            lycoris = lycoris_modules.get(id(entry.tensors.get("down")))
            if lycoris is not None:
                target = _base_tensor(component, module, shapes)
                if target is None:
                    problems.append(f"{lycoris.keys[0]}: the base {component} has no tensor {module}.weight")
                    continue
                candidate, problem = lycoris_factors(lycoris, shapes[target])
                if problem is not None:
                    base = f"{component}/{target} {list(shapes[target])}"
                    problems.append(f"{lycoris.keys[0]}: {problem}; base {base}")
                elif (component, target) in factors:
                    problems.append(f"{lycoris.keys[0]}: a second update of {component}/{target}")
                else:
                    factors[(component, target)] = candidate
                    placed[component] += len(lycoris.keys)
                continue
            first_key = entry.sources.get("down") or next(iter(entry.sources.values()))
            if "up_bias" in entry.tensors:
                problems.append(f"{entry.sources['up_bias']}: LoRA biases (lora_bias) are not supported")
                continue
            if "down" not in entry.tensors or "up" not in entry.tensors:
                problems.append(
                    f"{first_key}: has no matching {'up' if 'down' in entry.tensors else 'down'} factor"
                )
                continue
            down, up = entry.tensors["down"], entry.tensors["up"]
            rank = int(down.shape[0])
            alpha, rslora, alpha_key = rule.alpha(module, entry.sources["down"], rank)
            if alpha_key is not None:
                # Counted now, so a module that fails below is reported once, not again for its alpha.
                consumed_alphas.add(alpha_key)
            target = _base_tensor(component, module, shapes)
            if target is None:
                problems.append(f"{first_key}: the base {component} has no tensor {module}.weight")
                continue
            candidate = LoraFactors(
                down=down, up=up, alpha=alpha, magnitude=entry.tensors.get("magnitude"), rslora=rslora
            )
            problem = factor_shape_problem(candidate, shapes[target]) or _check_peft_rank(
                rule.peft, module, rank
            )
            if problem is not None:
                problems.append(
                    f"{first_key}: {problem} (down {list(down.shape)}, up {list(up.shape)}; "
                    f"base {component}/{target} {list(shapes[target])})"
                )
                continue
            if (component, target) in factors:
                problems.append(f"{first_key}: a second update of {component}/{target}")
                continue
            factors[(component, target)] = candidate
            placed[component] += len(entry.tensors) + (alpha_key is not None)

    for alpha_key in sorted(set(kohya_alphas) - consumed_alphas):
        problems.append(f"{alpha_key}: an alpha without a LoRA that uses it")

    if problems:
        shown = "\n  ".join(problems[:SHOW_KEYS])
        more = f"\n  ... and {len(problems) - SHOW_KEYS} more" if len(problems) > SHOW_KEYS else ""
        raise _fail(
            "LORA_PLACEMENT",
            name,
            f"{path}: {len(problems)} keys cannot be placed on the base model (a LoRA for another model "
            f"family, e.g. SD 1.5, or another checkpoint's layout?):\n  {shown}{more}",
        )
    if sum(placed.values()) != file_keys:
        raise _fail(
            "LORA_UNACCOUNTED",
            name,
            f"{path}: {file_keys} keys in the file but {sum(placed.values())} were placed; diffusers dropped "
            f"some while converting (e.g. a file mixing original and diffusers-style names). Supported: "
            f"{SUPPORTED_FORMATS}",
        )
    log.info("LoRA %s: %s keys placed %s", name, file_keys, {k: v for k, v in placed.items() if v})
    return LoadedLora(
        name=name, path=path, sha256=sha256, factors=factors, placed_keys=placed, file_keys=file_keys
    )
