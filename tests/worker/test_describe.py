"""The describe action (worker/describe.py): what the worker serves, from files, with nothing loaded."""

from __future__ import annotations

import pytest

from tests.worker.conftest import TEMPLATE
from worker.errors import InvalidInput
from worker.inputs import MAX_JOB_LORAS, MAX_NUM_IMAGES
from worker.serving import Worker


@pytest.fixture
def fresh_worker(settings) -> Worker:
    """A worker that has loaded nothing (no start-up, empty cache)."""
    return Worker(settings)


def test_describe_lists_templates_defaults_and_limits_without_loading_anything(
    fresh_worker, settings
) -> None:
    answer = fresh_worker.run({"action": "describe"})
    assert fresh_worker.cache.loaded() == []  # no pipeline loaded, nothing generated

    templates = answer["templates"]
    assert {"tiny", "tiny-defaults", "hot-vae", "black-vae"} <= set(templates)
    tiny = templates["tiny"]
    assert tiny["available"] and not tiny["degraded"] and not tiny["loaded"]
    assert tiny["defaults"] == {
        "steps": 24,
        "guidance_scale": 4.5,
        "width": 1024,
        "height": 1024,
        "negative_prompt": "",
        "scheduler": "default",
        "clip_skip": 2,
        "timestep_spacing": None,
        "karras_sigmas": None,
        "refiner": None,
    }
    assert tiny["refiner"] is None
    assert tiny["loras"] == [{"source": "file:loras/kohya_sgm.safetensors", "scale": 0.8}]
    assert tiny["addons"] == [] and tiny["embeddings"] == []
    # The template's own defaults, where its fuseline.json has them.
    defaults = templates["tiny-defaults"]["defaults"]
    assert (defaults["steps"], defaults["scheduler"], defaults["negative_prompt"]) == (2, "euler_a", "blurry")
    # A folder the worker refuses is listed with the reason, not hidden.
    assert templates["wrong-name"]["available"] is False
    assert templates["wrong-name"]["error"].startswith("[MODEL_INVALID] ")

    limits = answer["limits"]
    assert limits["width"] == {"min": settings.min_size, "max": 2048, "multiple_of": 64}
    assert limits["max_pixels"] == settings.max_pixels
    assert limits["steps"] == {"min": 1, "max": 150}
    assert limits["num_images"] == {"min": 1, "max": MAX_NUM_IMAGES}
    assert limits["clip_skip"] == {"min": 1, "max": 12}
    assert limits["loras"] == {"max_items": MAX_JOB_LORAS}
    assert limits["output"]["return"] == ["base64"] and "webp" in limits["output"]["format"]
    assert answer["schedulers"][0] == "default" and "dpmpp_2m_karras" in answer["schedulers"]
    assert answer["addons"] == {} and answer["default_template"] is None
    schema = answer["input_schema"]
    assert {"prompt", "loras", "clip_skip", "template"} <= set(schema["properties"])


def test_describe_marks_loaded_templates(tiny_worker) -> None:
    tiny_worker.cache.get(TEMPLATE)
    assert tiny_worker.run({"action": "describe"})["templates"][TEMPLATE]["loaded"] is True


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"action": "list"}, "action: unknown action 'list'; valid: describe"),
        ({"action": "describe", "prompt": "a"}, "action 'describe' takes no other fields; remove prompt"),
    ],
)
def test_a_bad_action_is_invalid_input(fresh_worker, job, message) -> None:
    with pytest.raises(InvalidInput, match=message):
        fresh_worker.run(job)


def test_describe_through_the_handler(served) -> None:
    from worker.handler import handler

    result = handler({"id": "d1", "input": {"action": "describe"}})
    assert "error" not in result, result
    assert result["default_template"] == TEMPLATE and TEMPLATE in result["templates"]
    failed = handler({"id": "d2", "input": {"action": "nope"}})
    assert failed["error"].startswith("[INVALID_INPUT] 1 problem(s): action: unknown action 'nope'")
