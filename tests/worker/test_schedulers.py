"""Every scheduler name builds from a model folder's scheduler config and takes a denoising step."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from fuseline.core.serving import DEFAULT_SCHEDULER, SCHEDULER_NAMES, SCHEDULERS
from worker.schedulers import build_scheduler


@pytest.fixture(scope="module")
def base_config(kit) -> dict:
    return json.loads((kit.diffusers_dir / "scheduler" / "scheduler_config.json").read_text())


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_scheduler_builds_and_steps(base_config: dict, name: str) -> None:
    scheduler = build_scheduler(name, base_config)
    expected_class = base_config["_class_name"] if name == DEFAULT_SCHEDULER else SCHEDULERS[name][0]
    assert type(scheduler).__name__ == expected_class
    for key, value in ({} if name == DEFAULT_SCHEDULER else SCHEDULERS[name][1]).items():
        assert scheduler.config[key] == value
    # The folder's training settings carry over (a v-prediction export stays v-prediction).
    assert scheduler.config.prediction_type == base_config["prediction_type"]
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    timestep = scheduler.timesteps[0]
    model_input = scheduler.scale_model_input(sample, timestep)
    # As the pipeline does: only stochastic schedulers take a generator.
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    out = scheduler.step(torch.randn_like(model_input), timestep, sample, **extra).prev_sample
    assert out.shape == sample.shape and torch.isfinite(out).all()


def test_v_prediction_carries_over(base_config: dict) -> None:
    config = {**base_config, "prediction_type": "v_prediction"}
    assert build_scheduler("dpmpp_2m_karras", config).config.prediction_type == "v_prediction"
