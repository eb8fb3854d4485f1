"""Checkpoint recipes: a checkpoint computed from others, tensor by tensor in fp32, from converted folders.

The convert stage converts each input of a recipe (stages/convert.py) and hands the converted diffusers
folders here. Each weight component (unet, text encoders, vae) is merged streaming, one tensor of each
input at a time, and written as one fp32 safetensors file per component; everything else (configs,
tokenizers, the scheduler) is taken from input `a`. The result is a base folder like any the convert stage
writes, fp32 so that the template's merge casts to fp16 once (a weighted sum of fp16 values is not an fp16
value).

    weighted_sum     torch.lerp(a, b, alpha)             = (1 - alpha) * a + alpha * b
    add_difference   a.addcmul(b - c, alpha)             = a + alpha * (b - c)

Each is one torch op in fp32, the op sd-mecha uses for the same merge; merging after conversion gives the
same tensors as merging the single files (SGM layout) and converting the result, because conversion only
renames, slices (OpenCLIP's fused qkv) and transposes or reshapes (projections, VAE attention):
tests/stages/test_checkpoint_recipe.py holds the result to sd-mecha's.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fuseline.core.catalog.model import Recipe
from stages.errors import StageError
from stages.shards import safetensors_layout
from stages.tensor_files import TensorFile, TensorSpec, WeightFiles, find_weight_files, tensor_specs

log = logging.getLogger("fuseline.stages.recipe")

# The components holding weights in a converted SDXL folder; everything else is copied from input a.
WEIGHT_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
MERGE_DTYPE = torch.float32


@dataclass(frozen=True)
class RecipeResult:
    merged_tensors: int
    copied_tensors: int
    bytes: int


def merge_tensors(recipe: Recipe, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The recipe applied to one tensor of each input (by role), in fp32."""
    a = tensors["a"].to(MERGE_DTYPE)
    b = tensors["b"].to(MERGE_DTYPE)
    if recipe.method == "weighted_sum":
        return torch.lerp(a, b, recipe.alpha)
    c = tensors["c"].to(MERGE_DTYPE)
    return a.addcmul(b - c, torch.tensor(recipe.alpha, dtype=MERGE_DTYPE))


def _check_same_layout(
    component: str, specs: dict[str, dict[str, TensorSpec]], where: dict[str, str]
) -> None:
    """Every input must hold the same tensors with the same shapes (SDXL checkpoints converted with one
    config do); anything else is not a merge of like models."""
    first = specs["a"]
    for role, other in specs.items():
        missing = sorted(set(first) ^ set(other))
        if missing:
            raise StageError(
                "RECIPE_MISMATCH",
                f"{where[role]}: {component} has other tensors than {where['a']} ({missing[:3]} ...); a "
                "recipe merges checkpoints of one architecture (SDXL base)",
            )
        for name, spec in first.items():
            if other[name].shape != spec.shape:
                raise StageError(
                    "RECIPE_MISMATCH",
                    f"{where[role]}: {component} tensor {name} has shape {list(other[name].shape)}, "
                    f"{where['a']} has {list(spec.shape)}; a recipe merges checkpoints of one architecture",
                )


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def merge_component(
    recipe: Recipe, folders: dict[str, Path], target: Path, component: str, where: dict[str, str]
) -> RecipeResult:
    """Merge one component folder of every input into `target/<component>/<stem>.safetensors` (fp32 for
    floating tensors, the others copied from `a`), streaming: one tensor of each input in memory at a time."""
    weights: dict[str, WeightFiles] = {
        role: find_weight_files(folder / component) for role, folder in folders.items()
    }
    specs = {role: tensor_specs(files) for role, files in weights.items()}
    _check_same_layout(component, specs, where)
    out_specs = {
        name: TensorSpec(spec.shape, MERGE_DTYPE if spec.dtype.is_floating_point else spec.dtype)
        for name, spec in specs["a"].items()
    }
    layout = safetensors_layout(out_specs)
    out_dir = target / component
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted((folders["a"] / component).rglob("*")):
        if path.is_file() and not path.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copyfile(path, out_dir / path.relative_to(folders["a"] / component))
    handles: dict[Path, TensorFile] = {}
    merged = copied = 0
    fd = os.open(out_dir / f"{weights['a'].stem}.safetensors", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, memoryview(layout.header))
        for name in layout.names:
            tensors = {}
            for role, files in weights.items():
                path = files.tensor_files[name]
                if path not in handles:
                    handles[path] = TensorFile(path)
                handle = handles[path]
                tensors[role] = handle.read_into(
                    name, torch.empty(handle.spec(name).nbytes, dtype=torch.uint8)
                )
                if not tensors["a"].is_floating_point():
                    break  # position ids and other integer buffers: a's, unmerged
            if tensors["a"].is_floating_point():
                result = merge_tensors(recipe, tensors)
                if not torch.isfinite(result).all():
                    raise StageError(
                        "RECIPE_NOT_FINITE",
                        f"{component} tensor {name}: the {recipe.method} gives non-finite values; check the "
                        "inputs (a broken checkpoint) and alpha",
                    )
                merged += 1
            else:
                result = tensors["a"]
                copied += 1
            _write_all(fd, memoryview(result.contiguous().view(torch.uint8).reshape(-1).numpy()))
        os.fsync(fd)
    finally:
        os.close(fd)
        for handle in handles.values():
            handle.close()
    return RecipeResult(merged, copied, layout.size)


def merge_converted(
    recipe: Recipe, folders: dict[str, Path], target: Path, where: dict[str, str]
) -> RecipeResult:
    """Write the recipe's result into `target` from the converted folders of its inputs (by role: a, b,
    c). `where` names each input for errors (its catalog path)."""
    for role, folder in folders.items():
        present = [c for c in WEIGHT_COMPONENTS if (folder / c).is_dir()]
        if present != list(WEIGHT_COMPONENTS):
            raise StageError(
                "RECIPE_MISMATCH",
                f"{where[role]}: converted without {sorted(set(WEIGHT_COMPONENTS) - set(present))}; a recipe "
                "merges full SDXL checkpoints (UNet, both text encoders, VAE)",
            )
    target.mkdir(parents=True, exist_ok=True)
    total = RecipeResult(0, 0, 0)
    for component in WEIGHT_COMPONENTS:
        result = merge_component(recipe, folders, target, component, where)
        total = RecipeResult(
            total.merged_tensors + result.merged_tensors,
            total.copied_tensors + result.copied_tensors,
            total.bytes + result.bytes,
        )
        log.info(
            "%s: %d tensors merged, %d copied from a", component, result.merged_tensors, result.copied_tensors
        )
    for entry in sorted(folders["a"].iterdir()):
        if entry.name in WEIGHT_COMPONENTS or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name)
        else:
            shutil.copyfile(entry, target / entry.name)
    return total
