"""Checkpoint recipes (stages/checkpoint_recipe.py, the convert stage's recipe path) against sd-mecha.

The oracle is sd-mecha 1.1.8 (PyPI `sd-mecha`, installed beside torch 2.13 without conflict): it merges the
single files in their SGM layout, and fuseline's convert stage converts that merged file; fuseline merges
after converting each input. The two must agree tensor for tensor: conversion only renames, slices and
reshapes. Inputs: the kit's fp32 checkpoint and two fp16 variants of it (as most Civitai checkpoints are).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fuseline.core.catalog.model import Recipe, RecipeCheckpoint
from fuseline.core.safetensors_io import read_header
from stages.checkpoint_recipe import WEIGHT_COMPONENTS
from stages.convert import convert_checkpoint, convert_recipe
from stages.errors import StageError

MECHA_CONFIG = "sdxltiny-sgm"


@pytest.fixture(scope="module")
def inputs(kit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """a: the kit checkpoint (fp32); b, c: the same with seeded noise, stored fp16."""
    root = tmp_path_factory.mktemp("recipe-inputs")
    state = load_file(kit.single_file)
    paths = {"a": kit.single_file}
    for role, seed in (("b", 1), ("c", 2)):
        generator = torch.Generator().manual_seed(seed)
        noisy = {k: (v + 0.05 * torch.randn(v.shape, generator=generator)).half() for k, v in state.items()}
        paths[role] = root / f"{role}.safetensors"
        save_file(noisy, paths[role], metadata={"format": "pt"})
    return paths


def mecha_config(single_file: Path):
    """sd-mecha's model config for the kit's SGM layout (its built-in sdxl-sgm config is full-size SDXL)."""
    from sd_mecha.extensions import model_configs

    keys = {
        k: {"shape": list(e.shape), "dtype": "float32"} for k, e in read_header(single_file).tensors.items()
    }
    with contextlib.suppress(ValueError):  # registered by an earlier test of this session
        model_configs.register(model_configs.ModelConfigImpl(MECHA_CONFIG, {"all": keys}))
    return MECHA_CONFIG


def _silent(iterable=None, *args, **kwargs):
    """A tqdm stand-in without output (sd-mecha's progress bar floods the test log)."""

    class Bar:
        def __init__(self) -> None:
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable or ())

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, *args, **kwargs) -> None:
            pass

        def set_postfix(self, *args, **kwargs) -> None:
            pass

        def close(self) -> None:
            pass

    return Bar()


def mecha_merge(recipe: Recipe, inputs: dict[str, Path], out: Path) -> Path:
    import sd_mecha

    config = mecha_config(inputs["a"])
    models = {role: sd_mecha.model(path, config=config) for role, path in inputs.items()}
    if recipe.method == "weighted_sum":
        node = sd_mecha.weighted_sum(models["a"], models["b"], alpha=recipe.alpha)
    else:
        node = sd_mecha.add_difference(models["a"], models["b"], models["c"], alpha=recipe.alpha)
    sd_mecha.merge(
        node, merge_dtype=torch.float32, output_dtype=torch.float32, output=out, threads=1, tqdm=_silent
    )
    return out


def recipe_of(method: str, alpha: float) -> Recipe:
    models = {"a": {"source": "file:a"}, "b": {"source": "file:b"}}
    if method == "add_difference":
        models["c"] = {"source": "file:c"}
    return Recipe.model_validate({"method": method, "alpha": alpha, **models})


def component_tensors(folder: Path, component: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted((folder / component).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize(
    ("method", "alpha"), [("weighted_sum", 0.3), ("weighted_sum", 0.5), ("add_difference", 0.7)]
)
def test_recipe_matches_sd_mecha(kit, inputs, tmp_path: Path, method: str, alpha: float) -> None:
    recipe = recipe_of(method, alpha)
    used = {role: inputs[role] for role in recipe.inputs()}
    ours = tmp_path / "ours"
    ours.mkdir()
    summary = convert_recipe(
        {role: (path, getattr(recipe, role)) for role, path in used.items()},
        RecipeCheckpoint(recipe=recipe),
        ours,
        where="checkpoints.mix",
        config_dir=kit.config_dir,
    )
    oracle = tmp_path / "oracle"
    convert_checkpoint(
        mecha_merge(recipe, used, tmp_path / "mecha.safetensors"), oracle, config_dir=kit.config_dir
    )

    changed = compared = 0
    worst = 0.0
    for component in WEIGHT_COMPONENTS:
        mine, theirs = component_tensors(ours, component), component_tensors(oracle, component)
        assert set(mine) == set(theirs), component
        for name, tensor in mine.items():
            assert tensor.dtype == theirs[name].dtype == torch.float32 or not tensor.is_floating_point()
            difference = (tensor.double() - theirs[name].double()).abs()
            worst = max(worst, float(difference.max()) if difference.numel() else 0.0)
            changed += int((difference > 0).sum())
            compared += tensor.numel()
    # Measured: identical, every value of every component (docs/architecture.md).
    assert (changed, worst) == (0, 0.0), f"{changed} of {compared} values differ, by up to {worst:g}"
    assert summary["merged_tensors"] > 1000 and compared > 300_000
    # The result is a base folder like any other: the kit's configs, merged weights in fp32.
    assert json.loads((ours / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def test_recipe_result_is_neither_input(kit, inputs, tmp_path: Path) -> None:
    """A weighted sum lies between its inputs: each merged value is on the segment from a to b."""
    recipe = recipe_of("weighted_sum", 0.25)
    out = tmp_path / "mix"
    out.mkdir()
    convert_recipe(
        {r: (inputs[r], getattr(recipe, r)) for r in ("a", "b")},
        RecipeCheckpoint(recipe=recipe),
        out,
        where="checkpoints.mix",
        config_dir=kit.config_dir,
    )
    a_folder, b_folder = tmp_path / "a", tmp_path / "b"
    convert_checkpoint(inputs["a"], a_folder, config_dir=kit.config_dir)
    convert_checkpoint(inputs["b"], b_folder, config_dir=kit.config_dir)
    mix, a, b = (component_tensors(f, "unet") for f in (out, a_folder, b_folder))
    name = "conv_in.weight"
    expected = a[name].float() + 0.25 * (b[name].float() - a[name].float())
    assert torch.allclose(mix[name], expected, atol=1e-6)
    assert not torch.equal(mix[name], a[name].float()) and not torch.equal(mix[name], b[name].float())


def test_a_refiner_is_refused_as_a_recipe_input(kit, inputs, tmp_path: Path) -> None:
    from testkit.refiner import build_refiner

    refiner = build_refiner(tmp_path / "refiner")
    recipe = recipe_of("weighted_sum", 0.5)
    out = tmp_path / "mix"
    out.mkdir()
    with pytest.raises(StageError) as caught:
        convert_recipe(
            {"a": (inputs["a"], recipe.a), "b": (refiner.single_file, recipe.b)},
            RecipeCheckpoint(recipe=recipe),
            out,
            where="checkpoints.mix",
            config_dir=kit.config_dir,
        )
    assert caught.value.code == "RECIPE_INPUT_INVALID"
    assert "checkpoints.mix.recipe.b" in str(caught.value) and "refiner" in str(caught.value)
    assert list(out.iterdir()) == []  # nothing half-written
