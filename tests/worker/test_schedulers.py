"""Every scheduler name builds from a model folder's scheduler config and takes a denoising step; the
serving table's option classes are what diffusers' classes take; few-step schedulers generate."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from fuseline.core.serving import (
    DEFAULT_SCHEDULER,
    OPTION_CLASSES,
    SCHEDULER_ALIASES,
    SCHEDULER_NAMES,
    SCHEDULER_OPTIONS,
    SCHEDULERS,
    canonical_scheduler,
)
from worker.schedulers import build_scheduler


@pytest.fixture(scope="module")
def base_config(kit) -> dict:
    return json.loads((kit.diffusers_dir / "scheduler" / "scheduler_config.json").read_text())


def _step(scheduler) -> torch.Tensor:
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    timestep = scheduler.timesteps[0]
    model_input = scheduler.scale_model_input(sample, timestep)
    # As the pipeline does: only stochastic schedulers take a generator.
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    return scheduler.step(torch.randn_like(model_input), timestep, sample, **extra).prev_sample


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_scheduler_builds_and_steps(base_config: dict, name: str) -> None:
    scheduler = build_scheduler(name, base_config)
    expected_class = base_config["_class_name"] if name == DEFAULT_SCHEDULER else SCHEDULERS[name][0]
    assert type(scheduler).__name__ == expected_class
    for key, value in ({} if name == DEFAULT_SCHEDULER else SCHEDULERS[name][1]).items():
        assert scheduler.config[key] == value
    # The folder's training settings carry over (a v-prediction export stays v-prediction).
    assert scheduler.config.prediction_type == base_config["prediction_type"]
    out = _step(scheduler)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_v_prediction_carries_over(base_config: dict) -> None:
    config = {**base_config, "prediction_type": "v_prediction"}
    assert build_scheduler("dpmpp_2m_karras", config).config.prediction_type == "v_prediction"


@pytest.mark.parametrize("option", SCHEDULER_OPTIONS)
def test_option_classes_are_the_classes_whose_timesteps_follow_the_option(option: str) -> None:
    """Taking the config key is not enough (LCM and TCD take timestep_spacing and never read it): a class
    is listed when its set_timesteps reads the option."""
    import diffusers

    key = SCHEDULER_OPTIONS[option]
    classes = {class_name for class_name, _ in SCHEDULERS.values()}
    reading = {
        c for c in classes if f"config.{key}" in inspect.getsource(getattr(diffusers, c).set_timesteps)
    }
    assert OPTION_CLASSES[option] == reading


def test_options_apply_where_the_class_takes_them(base_config: dict) -> None:
    options = {"timestep_spacing": "trailing", "karras_sigmas": True}
    euler = build_scheduler("euler", base_config, options)
    assert euler.config.timestep_spacing == "trailing" and euler.config.use_karras_sigmas is True
    # DDIM follows timestep spacing but has no Karras sigmas: the one applies, the other is not passed (the
    # config keeps the folder's unused `false`).
    ddim = build_scheduler("ddim", base_config, options)
    assert ddim.config.timestep_spacing == "trailing" and ddim.config.get("use_karras_sigmas") is not True
    # LCM reads neither: its config keeps the folder's values.
    lcm = build_scheduler("lcm", base_config, options)
    assert lcm.config.timestep_spacing == base_config["timestep_spacing"]
    # The folder's own scheduler (EulerDiscrete in the kit) takes both.
    own = build_scheduler(DEFAULT_SCHEDULER, base_config, options)
    assert own.config.timestep_spacing == "trailing" and own.config.use_karras_sigmas is True
    # Unset options leave the folder's config alone.
    assert (
        build_scheduler("euler", base_config, {"timestep_spacing": None}).config.timestep_spacing
        == (base_config["timestep_spacing"])
    )


def test_trailing_spacing_changes_the_timesteps(base_config: dict) -> None:
    leading = build_scheduler("euler", base_config)
    trailing = build_scheduler("euler", base_config, {"timestep_spacing": "trailing"})
    leading.set_timesteps(4)
    trailing.set_timesteps(4)
    # SDXL Lightning's setting: the first of 4 steps starts at the last training timestep.
    assert trailing.timesteps[0] == 999 and leading.timesteps[0] < 999


@pytest.mark.parametrize("alias", SCHEDULER_ALIASES)
def test_civitai_names_stand_for_table_names(alias: str) -> None:
    assert canonical_scheduler(alias) in SCHEDULERS
    assert canonical_scheduler(alias.upper()) == canonical_scheduler(alias)


def test_unknown_names_stay_unknown() -> None:
    assert canonical_scheduler("k_lms") == "k_lms"
    assert canonical_scheduler("DPM++ 2M SDE Exponential") == "DPM++ 2M SDE Exponential"


# ----------------------------------------------------------------------------------------- through jobs

FEW_STEP = ("lcm", "tcd", "dpmpp_2m_sde_karras", "dpmpp_3m_sde", "euler_a")


@pytest.fixture(scope="module")
def fast_worker(volume, tmp_path_factory: pytest.TempPathFactory):
    """A worker serving a copy of the tiny model whose manifest carries an SDXL Lightning LoRA's settings
    (Euler, trailing spacing, 4 steps at guidance 1), as a template's defaults would."""
    from tests.worker.conftest import TEMPLATE, TEST_ENV, copy_template, make_manifest, write_manifest
    from worker.serving import Worker
    from worker.settings import load_settings

    root = tmp_path_factory.mktemp("fast-volume")
    (root / "models").mkdir()
    for name, defaults in (
        ("fast", {"scheduler": "euler", "timestep_spacing": "trailing", "steps": 4, "guidance_scale": 1.0}),
        ("plain", {"scheduler": "euler", "steps": 4, "guidance_scale": 1.0}),
    ):
        folder = copy_template(volume, TEMPLATE, root, name)
        (folder / "fuseline.json").unlink()
        write_manifest(folder, make_manifest(name), defaults=defaults)
    return Worker(load_settings({**TEST_ENV, "FUSELINE_VOLUME": str(root), "FUSELINE_MAX_PIPELINES": "2"}))


def _pixels(result: dict):
    import base64
    import io

    import numpy
    from PIL import Image

    (image,) = result["images"]
    return numpy.asarray(Image.open(io.BytesIO(base64.b64decode(image["data"]))).convert("RGB"), dtype=float)


def test_template_scheduler_options_reach_the_job(fast_worker) -> None:
    job = {"prompt": "a lighthouse", "width": 64, "height": 64, "seed": 7}
    fast = fast_worker.run({**job, "template": "fast"})
    plain = fast_worker.run({**job, "template": "plain"})
    assert fast["parameters"]["scheduler"] == "euler" and fast["parameters"]["timestep_spacing"] == "trailing"
    assert fast["parameters"]["steps"] == 4 and "timestep_spacing" not in plain["parameters"]
    # Same weights, seed and sampler: only the spacing differs, and it shows in the image.
    assert numpy_difference(_pixels(fast), _pixels(plain)) > 1.0


def numpy_difference(a, b) -> float:
    return float(abs(a - b).mean())


def test_civitai_sampler_names_and_few_step_schedulers_generate(fast_worker) -> None:
    job = {"prompt": "a lighthouse", "width": 64, "height": 64, "seed": 7, "template": "fast"}
    images = {}
    for name in FEW_STEP:
        result = fast_worker.run({**job, "scheduler": name})
        assert result["parameters"]["scheduler"] == name and result["warnings"] == []
        images[name] = _pixels(result)
    # A name copied from a Civitai page is the scheduler it stands for: the same image.
    copied = fast_worker.run({**job, "scheduler": "DPM++ 2M SDE Karras"})
    assert copied["parameters"]["scheduler"] == "dpmpp_2m_sde_karras"
    assert numpy_difference(_pixels(copied), images["dpmpp_2m_sde_karras"]) == 0
    # Each sampler gives its own image (a name mapped to the wrong class would repeat another's).
    for i, first in enumerate(FEW_STEP):
        for second in FEW_STEP[i + 1 :]:
            assert numpy_difference(images[first], images[second]) > 0.5, (first, second)
