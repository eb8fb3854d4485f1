"""Clip skip (A1111 numbering, Forge's reading for SDXL) against diffusers' own `clip_skip` as the oracle:
fuseline's N is diffusers' N - 2 (diffusers counts the layers skipped beyond SDXL's penultimate one)."""

from __future__ import annotations

import pytest
import torch

from fuseline.core.serving import hidden_state_index
from worker.errors import InvalidInput
from worker.prompts import encode_prompts


def stock(pipe, prompt: str, negative: str, clip_skip: int | None):
    return pipe.encode_prompt(
        prompt,
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=negative,
        clip_skip=clip_skip,
    )


def test_the_number_names_a_hidden_state_from_the_end() -> None:
    # 1 and 2 (and none) are SDXL's own penultimate layer; 3 skips one more, ...
    assert [hidden_state_index(n) for n in (None, 1, 2, 3, 12)] == [-2, -2, -2, -3, -12]


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_one_and_two_are_sdxls_own_layer(kit_pipeline, clip_skip: int) -> None:
    default = encode_prompts(kit_pipeline, "a red fox in snow", "blurry")
    ours = encode_prompts(kit_pipeline, "a red fox in snow", "blurry", clip_skip=clip_skip)
    for name in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds"):
        torch.testing.assert_close(getattr(ours, name), getattr(default, name), rtol=0, atol=0)
    # diffusers without clip_skip: the same penultimate layer.
    prompt_embeds, *_ = stock(kit_pipeline, "a red fox in snow", "blurry", None)
    torch.testing.assert_close(ours.prompt_embeds, prompt_embeds, rtol=0, atol=0)


def test_three_is_diffusers_clip_skip_one_on_both_encoders(kit_pipeline) -> None:
    ours = encode_prompts(kit_pipeline, "a red fox in snow", "blurry", clip_skip=3)
    prompt_embeds, penultimate_negative, pooled, negative_pooled = stock(
        kit_pipeline, "a red fox in snow", "blurry", 1
    )
    torch.testing.assert_close(ours.prompt_embeds, prompt_embeds, rtol=0, atol=0)
    # The pooled embedding stays the final layer's, in diffusers as here.
    torch.testing.assert_close(ours.pooled_prompt_embeds, pooled, rtol=0, atol=0)
    torch.testing.assert_close(ours.negative_pooled_prompt_embeds, negative_pooled, rtol=0, atol=0)
    # diffusers 0.42 applies clip_skip to the prompt only; its negative prompt keeps the penultimate layer.
    # A1111, Forge and ComfyUI encode both with the same layer, and so does fuseline: the negative prompt
    # is what diffusers gives for that text as a prompt with the same clip_skip.
    negative_as_prompt, *_ = stock(kit_pipeline, "blurry", "", 1)
    torch.testing.assert_close(ours.negative_prompt_embeds, negative_as_prompt, rtol=0, atol=0)
    assert not torch.equal(ours.negative_prompt_embeds, penultimate_negative)
    assert not torch.equal(
        ours.prompt_embeds, encode_prompts(kit_pipeline, "a red fox in snow", "").prompt_embeds
    )


def test_deeper_than_the_text_encoder_is_invalid_input(kit_pipeline) -> None:
    # The kit's text encoder 1 has 3 layers: clip skip 4 would be its token embedding, no layer at all.
    layers = kit_pipeline.text_encoder.config.num_hidden_layers
    with pytest.raises(InvalidInput, match=rf"clip_skip: {layers + 1} is deeper than .* \({layers} layers\)"):
        encode_prompts(kit_pipeline, "a fox", "", clip_skip=layers + 1)


def test_a_clip_skip_template_default_and_a_request_override(tiny_worker, volume) -> None:
    """A template whose defaults say clip_skip 3 generates with it; a request's value wins."""
    import json
    import shutil

    from tests.worker.conftest import SMALL, link_folder

    target = volume / "models" / "tiny-skip"
    if not target.exists():
        link_folder(volume / "models" / "tiny", target)
        manifest = json.loads((volume / "models" / "tiny" / "fuseline.json").read_text())
        manifest.update(template="tiny-skip", spec_hash="3" * 64, defaults={"steps": 2, "clip_skip": 3})
        (target / "fuseline.json").write_text(json.dumps(manifest))
    try:
        job = {"template": "tiny-skip", "prompt": "a fox", "seed": 4, **SMALL}
        skipped = tiny_worker.run(job)
        assert skipped["parameters"]["clip_skip"] == 3 and skipped["parameters"]["steps"] == 3
        plain = tiny_worker.run({**job, "clip_skip": 2})
        assert plain["parameters"]["clip_skip"] == 2
        assert plain["images"][0]["data"] != skipped["images"][0]["data"]
        default = tiny_worker.run({**job, "template": "tiny"})
        assert default["parameters"]["clip_skip"] == 2
        assert default["images"][0]["data"] == plain["images"][0]["data"]
    finally:
        tiny_worker.cache.evict("tiny-skip")
        shutil.rmtree(target)
