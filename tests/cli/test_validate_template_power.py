"""`fuseline validate` and the JSON Schema on the catalog fields of issue #18 items 4 and 6: `addons`,
template `embeddings` and `defaults.clip_skip`; none of them changes an existing template's spec hash."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from fuseline.core.catalog.loading import parse_catalog
from fuseline.core.catalog.model import catalog_json_schema
from tests.cli.test_validate import assert_no_pydantic_leak, example, validate, write

SHA = "cd" * 32


def with_power() -> dict:
    data = example()
    data["addons"] = {
        "detail": {"source": "civitai:1234", "sha256": SHA, "default_scale": 0.6, "max_scale": 1.2},
        "slider": {"source": "file:slider.safetensors", "min_scale": -2, "max_scale": 2, "default_scale": 0},
        "only-here": {"source": "file:x.safetensors", "templates": ["cinematic"]},
    }
    template = data["templates"]["cinematic"]
    template["embeddings"] = [{"source": "civitai:5678", "sha256": SHA, "token": "negativeXL_D"}]
    template["defaults"]["clip_skip"] = 2
    return data


def test_a_catalog_with_addons_embeddings_and_clip_skip_is_valid(tmp_path: Path) -> None:
    code, output = validate(write(tmp_path, with_power()))
    assert code == 0, output
    catalog = parse_catalog(json.dumps(with_power()))
    assert catalog.addon_templates("detail") == ["cinematic"]
    assert [where for where, _ in catalog.iter_sources()][-4:] == [
        "templates.cinematic.embeddings[0]",
        "addons.detail",
        "addons.slider",
        "addons.only-here",
    ]
    jsonschema.Draft202012Validator(catalog_json_schema()).validate(with_power())


def test_existing_spec_hashes_stay_and_only_what_defines_the_build_moves_them() -> None:
    plain = parse_catalog(json.dumps(example()))
    with_addons = example() | {"addons": with_power()["addons"]}
    # Add-ons are not fused: no template's spec (nor its merged model) depends on them.
    assert parse_catalog(json.dumps(with_addons)).spec_hash("cinematic") == plain.spec_hash("cinematic")
    assert "embeddings" not in plain.template_spec("cinematic")["template"]
    assert "clip_skip" not in plain.template_spec("cinematic")["template"]["defaults"]
    assert "addons" not in plain.model_dump()
    # Embeddings and clip skip change what the template produces: its spec hash moves.
    powered = parse_catalog(json.dumps(with_power()))
    assert powered.spec_hash("cinematic") != plain.spec_hash("cinematic")


def edit(change) -> dict:
    data = with_power()
    change(data)
    return data


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        (
            lambda d: d["addons"]["detail"].update(templates=["cinematc"]),
            "addons.detail.templates[0]",
            "add-on 'detail' names template 'cinematc', which is not in templates "
            "(fix: did you mean 'cinematic'?",
        ),
        (
            lambda d: d["addons"]["detail"].update(default_scale=1.5),
            "addons.detail.default_scale",
            "min_scale 0 <= default_scale 1.5 <= max_scale 1.2 does not hold",
        ),
        (
            lambda d: d["addons"]["detail"].update(max_scale=5),
            "addons.detail.max_scale",
            "max_scale must be a finite number from -4 to 4, got 5",
        ),
        (
            lambda d: d["addons"]["detail"].update(templates=[]),
            "addons.detail.templates",
            "templates must be a list of template ids, got []",
        ),
        (
            lambda d: d["addons"]["detail"].update(source="file:x.ckpt", allow_pickle=True),
            "addons.detail.source",
            "an add-on is loaded by the worker, which never loads pickle files",
        ),
        (
            lambda d: d["addons"]["detail"].update(scale=1),
            "addons.detail.scale",
            "unknown key 'scale' (fix: did you mean 'min_scale'? valid keys here: source, sha256, "
            "allow_pickle, default_scale, min_scale, max_scale, templates)",
        ),
        (
            lambda d: d["addons"].update({"Detail": {"source": "file:x.safetensors"}}),
            "addons.Detail",
            "id 'Detail' is not allowed: it has uppercase letters",
        ),
        (
            lambda d: d["templates"]["cinematic"]["embeddings"][0].update(token="bad word"),
            "templates.cinematic.embeddings[0].token",
            "embedding token 'bad word' cannot be written in a prompt as one word",
        ),
        (
            lambda d: d["templates"]["cinematic"]["embeddings"][0].update(token="neg_2"),
            "templates.cinematic.embeddings[0].token",
            "a _<digits> ending",
        ),
        (
            lambda d: d["templates"]["cinematic"]["embeddings"].append(
                {"source": "file:e.safetensors", "token": "NEGATIVEXL_D"}
            ),
            "templates.cinematic.embeddings[1].token",
            "token 'NEGATIVEXL_D' names two embeddings of this template (tokens are matched ignoring case)",
        ),
        (
            lambda d: d["templates"]["cinematic"]["embeddings"][0].pop("token"),
            "templates.cinematic.embeddings[0].token",
            "required key 'token' is missing",
        ),
        (
            lambda d: d["templates"]["cinematic"]["defaults"].update(clip_skip=0),
            "templates.cinematic.defaults.clip_skip",
            "clip_skip must be a whole number from 1 to 12, got 0",
        ),
    ],
)
def test_bad_values_name_their_path_and_the_fix(tmp_path: Path, change, path, words) -> None:
    code, output = validate(write(tmp_path, edit(change)))
    assert code == 1, output
    line = next((line for line in output.splitlines() if f": {path}: " in line), None)
    assert line is not None, output
    assert words in " ".join(output.split()), output
    assert_no_pydantic_leak(output)


def test_the_schema_refuses_what_validate_refuses_where_a_schema_can() -> None:
    validator = jsonschema.Draft202012Validator(catalog_json_schema())
    for change in (
        lambda d: d["addons"]["detail"].update(max_scale=5),
        lambda d: d["templates"]["cinematic"]["embeddings"][0].update(token="bad word"),
        lambda d: d["templates"]["cinematic"]["defaults"].update(clip_skip=13),
        lambda d: d["addons"].update({"Bad.Name": {"source": "file:x.safetensors"}}),
    ):
        data = copy.deepcopy(edit(change))
        assert list(validator.iter_errors(data)), change
