"""Tests of fuseline.catalog: source parsing, the model, spec hashing, error reporting and the JSON Schema."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from fuseline.core.catalog.loading import load_catalog, parse_catalog
from fuseline.core.catalog.model import ID_PATTERN, Catalog, catalog_json_schema
from fuseline.core.catalog.problems import CatalogError, Problem, format_path
from fuseline.core.catalog.sources import SOURCE_PATTERN, ParsedSource, parse_source
from fuseline.core.catalog.sources import SourceStringError as SourceError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "templates.json"
SCHEMA_FILE = REPO / "fuseline" / "schema" / "templates.schema.json"
DOCS = REPO / "docs" / "templates.md"
REV = "0123456789abcdef0123456789abcdef01234567"
SHA = "ab" * 32


def example() -> dict:
    return json.loads(EXAMPLE.read_text())


def dumps(data: dict, **kwargs) -> str:
    return json.dumps(data, **kwargs)


# ---------------------------------------------------------------------------------------------- sources

GOOD_SOURCES = {
    "civitai:135867": ParsedSource("civitai", "civitai:135867", version_id="135867"),
    f"hf:org/repo@{REV}": ParsedSource("hf", f"hf:org/repo@{REV}", repo="org/repo", revision=REV),
    f"hf:stabilityai/stable-diffusion-xl-base-1.0/unet/x.safetensors@{REV}": ParsedSource(
        "hf",
        f"hf:stabilityai/stable-diffusion-xl-base-1.0/unet/x.safetensors@{REV}",
        repo="stabilityai/stable-diffusion-xl-base-1.0",
        path="unet/x.safetensors",
        revision=REV,
    ),
    "https://example.com/a/b.safetensors?x=1": ParsedSource(
        "https", "https://example.com/a/b.safetensors?x=1", url="https://example.com/a/b.safetensors?x=1"
    ),
    "s3://my-bucket/loras/style.safetensors": ParsedSource(
        "s3", "s3://my-bucket/loras/style.safetensors", bucket="my-bucket", key="loras/style.safetensors"
    ),
    "file:models/x.safetensors": ParsedSource(
        "file", "file:models/x.safetensors", path="models/x.safetensors"
    ),
    "file:/abs/folder": ParsedSource("file", "file:/abs/folder", path="/abs/folder"),
    "file:my models/x y.safetensors": ParsedSource(
        "file", "file:my models/x y.safetensors", path="my models/x y.safetensors"
    ),
    f"hf:o/r/.hidden/x..y@{REV}": ParsedSource(
        "hf", f"hf:o/r/.hidden/x..y@{REV}", repo="o/r", path=".hidden/x..y", revision=REV
    ),
    # "@" after the host, and parameters that only look like secret ones, are fine.
    "https://example.com/models/v@2/x.safetensors?tokens=1&keyword=a": ParsedSource(
        "https",
        "https://example.com/models/v@2/x.safetensors?tokens=1&keyword=a",
        url="https://example.com/models/v@2/x.safetensors?tokens=1&keyword=a",
    ),
}

BAD_SOURCES = {
    "": "empty",
    " civitai:1": "whitespace",
    "civitai:": "numeric model version id",
    "civitai:abc": "numeric model version id",
    "hf:org/repo": "not pinned to a revision",
    "hf:org/repo@main": "not a 40-hex commit sha",
    f"hf:org/repo@{REV.upper()}": "not a 40-hex commit sha",
    f"hf:repo-only@{REV}": "does not name a repository",
    f"hf:org/repo/../x@{REV}": "'..'",
    f"hf:org/repo//x@{REV}": "empty",
    "https://": "not a valid URL",
    "https:///path": "not a valid URL",
    "http://example.com/x.safetensors": "plain http",
    "s3://ab/key": "bucket",
    "s3://bucket": "bucket",
    "s3://Bucket/key": "bucket",
    "file:": "names no path",
    "file: x": "whitespace",
    "file:a\nb": "control characters",
    f"hf:org/repo/a b@{REV}": "unusual",
    f"hf:org/repo/./x@{REV}": "'.'",
    f"hf:org/repo/x@y@{REV}": "unusual",
    "file:///abs/x": "file:// URL",
    "ftp://example.com/x": "unknown source scheme 'ftp'",
    "models/x.safetensors": "no source scheme",
    "https://user:pw@example.com/x.safetensors": "user:password@ part",
    "https://user@example.com/x.safetensors": "user:password@ part",
    "https://example.com/x.safetensors?token=abc123": "query parameter 'token'",
    "https://example.com/x?download=1&API_KEY=abc123": "query parameter 'API_KEY'",
    "https://s3.example.com/b/x?X-Amz-Credential=a&X-Amz-Signature=b": "query parameter 'X-Amz-Credential'",
    # Issue 16: s3 sources with credentials were accepted, or refused repeating the password.
    "s3://AKIAEXAMPLE:pw-value@bucket/x.safetensors": "user:password@ part",
    "s3://akiaexample:pw-value@bucket/x.safetensors": "user:password@ part",
    "s3://bucket/x.safetensors?X-Amz-Signature=abc123": "query parameter 'X-Amz-Signature'",
    "s3://bucket/dir/x.safetensors?versionId=1&token=abc123": "query parameter 'token'",
    "ftp://user:pw-value@example.com/x": "unknown source scheme 'ftp'",
    "http://user:pw-value@example.com/x": "plain http",
}


@pytest.mark.parametrize("text", GOOD_SOURCES)
def test_parse_source_fields(text):
    assert parse_source(text) == GOOD_SOURCES[text]


@pytest.mark.parametrize("text", BAD_SOURCES)
def test_parse_source_rejects_with_reason_and_fix(text):
    with pytest.raises(ValueError, match=re.escape(BAD_SOURCES[text])) as info:
        parse_source(text)
    assert isinstance(info.value, SourceError)
    assert info.value.hint  # every rejection says how to write it
    assert "pw" not in str(info.value) and "abc123" not in str(info.value)  # nor repeats a credential


@pytest.mark.parametrize("text", [*GOOD_SOURCES, *BAD_SOURCES])
def test_schema_source_pattern_agrees_with_parse_source(text):
    # Editors see the schema's regex, `fuseline validate` uses parse_source: they must not disagree.
    try:
        parse_source(text)
        accepted = True
    except SourceError:
        accepted = False
    assert bool(re.match(SOURCE_PATTERN, text)) == accepted


@pytest.mark.parametrize(
    ("text", "pickle", "filename"),
    [
        ("https://x.org/model.ckpt", True, "model.ckpt"),
        ("https://x.org/model.CKPT?download=1", True, "model.CKPT"),
        (f"hf:o/r/pytorch_lora_weights.bin@{REV}", True, "pytorch_lora_weights.bin"),
        ("s3://bucket/x/lora.pt", True, "lora.pt"),
        ("file:weights.pth", True, "weights.pth"),
        ("file:folder/", False, "folder"),
        (f"hf:o/r@{REV}", False, None),
        ("civitai:1", False, None),
        ("https://x.org/model.safetensors", False, "model.safetensors"),
    ],
)
def test_parsed_source_pickle_detection(text, pickle, filename):
    parsed = parse_source(text)
    assert parsed.is_pickle is pickle
    assert parsed.filename == filename


# ---------------------------------------------------------------------------------------------- the model


def test_example_catalog_loads_with_defaults_filled():
    catalog = load_catalog(EXAMPLE)
    assert catalog.path == EXAMPLE
    assert catalog.warnings == []
    template = catalog.templates["cinematic"]
    assert template.checkpoint == "sdxl-base"
    assert catalog.checkpoints["sdxl-base"].prediction == "epsilon"
    assert catalog.vae is not None and catalog.vae.parsed.repo == "madebyollin/sdxl-vae-fp16-fix"
    assert template.loras[0].scale == 0.8
    assert template.defaults.scheduler is None
    # Private state is not part of the data.
    assert set(catalog.model_dump()) == {"version", "vae", "checkpoints", "templates"}


def test_minimal_catalog_gets_documented_defaults():
    catalog = parse_catalog(
        dumps(
            {
                "version": 1,
                "vae": {"source": "file:vae"},
                "checkpoints": {"b": {"source": "file:b"}},
                "templates": {"t": {"checkpoint": "b"}},
            }
        )
    )
    assert catalog.vae.source == "file:vae" and catalog.path is None
    template = catalog.templates["t"]
    assert template.loras == []
    assert template.defaults.model_dump() == {
        "steps": 24,
        "guidance_scale": 4.5,
        "width": 1024,
        "height": 1024,
        "negative_prompt": "",
        "scheduler": None,
    }
    assert catalog.checkpoints["b"].allow_pickle is False
    assert catalog.checkpoints["b"].prediction == "epsilon"


def test_sha256_is_normalised_to_lowercase():
    data = example()
    data["templates"]["cinematic"]["loras"][0]["sha256"] = SHA.upper()
    catalog = parse_catalog(dumps(data))
    assert catalog.templates["cinematic"].loras[0].sha256 == SHA


def test_id_pattern_matches_the_rules():
    assert re.match(ID_PATTERN, "a")
    assert re.match(ID_PATTERN, "sdxl-base-1")
    assert re.match(ID_PATTERN, "a" * 64)
    for bad in ["", "a" * 65, "A", "a.b", "a/b", "-a", "a-", "a_b", "a b"]:
        assert not re.match(ID_PATTERN, bad), bad


def test_model_validate_checks_references_too():
    # A catalog built in code (not through parse_catalog) gets the cross-field checks as well.
    with pytest.raises(Exception, match="names checkpoint 'missing'"):
        Catalog.model_validate(
            {
                "version": 1,
                "vae": {"source": "file:vae"},
                "checkpoints": {"b": {"source": "file:b"}},
                "templates": {"t": {"checkpoint": "missing"}},
            }
        )


def test_catalog_module_imports_no_heavy_packages():
    code = (
        "import sys, fuseline.core.catalog.loading\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'dvc', 'typer', 'rich', 'numpy') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------------------------------- spec hash


def test_template_spec_shape():
    catalog = load_catalog(EXAMPLE)
    spec = catalog.template_spec("cinematic")
    assert set(spec) == {"id", "template", "checkpoint", "vae"}
    assert spec["id"] == "cinematic"
    assert spec["checkpoint"]["id"] == "sdxl-base"
    assert spec["checkpoint"]["source"] == example()["checkpoints"]["sdxl-base"]["source"]
    assert spec["template"]["loras"][0]["scale"] == 0.8
    assert spec["vae"]["source"].startswith("hf:madebyollin/sdxl-vae-fp16-fix@")
    json.dumps(spec, allow_nan=False)  # plain JSON all the way down
    with pytest.raises(KeyError, match="cinematic"):
        catalog.template_spec("nope")


def test_a_catalog_without_vae_is_refused_with_the_fix():
    # The pipeline converts the catalog's VAE once and every merge uses it: there is no build without one.
    data = example()
    del data["vae"]
    with pytest.raises(CatalogError) as exc:
        parse_catalog(dumps(data))
    assert "vae: required key 'vae' is missing" in str(exc.value)
    assert "sdxl-vae-fp16-fix" in str(exc.value)


def test_spec_hash_is_stable_under_reformatting_and_key_order():
    data = example()
    reference = parse_catalog(dumps(data)).spec_hash("cinematic")
    assert re.fullmatch(r"[0-9a-f]{64}", reference)

    def reverse_keys(node):
        if isinstance(node, dict):
            return {k: reverse_keys(node[k]) for k in reversed(list(node))}
        if isinstance(node, list):
            return [reverse_keys(v) for v in node]
        return node

    assert parse_catalog(dumps(reverse_keys(data), indent=7)).spec_hash("cinematic") == reference
    assert parse_catalog(dumps(data, separators=(",", ":"))).spec_hash("cinematic") == reference
    assert load_catalog(EXAMPLE).spec_hash("cinematic") == reference


def test_spec_hash_same_for_explicit_and_implicit_defaults():
    data = example()
    implicit = copy.deepcopy(data)
    del implicit["templates"]["cinematic"]["defaults"]["steps"]
    implicit["templates"]["cinematic"]["defaults"]["guidance_scale"] = 4.5
    explicit = copy.deepcopy(data)
    explicit["templates"]["cinematic"]["loras"][0]["allow_pickle"] = False
    explicit["templates"]["cinematic"]["defaults"]["scheduler"] = None
    base = parse_catalog(dumps(data)).spec_hash("cinematic")
    assert parse_catalog(dumps(implicit)).spec_hash("cinematic") == base
    assert parse_catalog(dumps(explicit)).spec_hash("cinematic") == base


def test_spec_hash_int_and_float_spellings_agree():
    data = example()
    data["templates"]["cinematic"]["loras"][0]["scale"] = 1
    as_int = parse_catalog(dumps(data)).spec_hash("cinematic")
    data["templates"]["cinematic"]["loras"][0]["scale"] = 1.0
    assert parse_catalog(dumps(data)).spec_hash("cinematic") == as_int


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["templates"]["cinematic"]["loras"][0].__setitem__("scale", 0.81),
        lambda d: d["templates"]["cinematic"]["loras"][0].__setitem__("sha256", SHA),
        lambda d: d["templates"]["cinematic"]["defaults"].__setitem__("steps", 30),
        lambda d: d["checkpoints"]["sdxl-base"].__setitem__("prediction", "v_prediction"),
        lambda d: d["vae"].__setitem__("source", f"hf:madebyollin/sdxl-vae-fp16-fix@{REV}"),
        lambda d: d["templates"]["cinematic"]["loras"].append({"source": "file:extra.safetensors"}),
        lambda d: d["templates"]["cinematic"]["loras"][0].__setitem__("block_weights", "SDXL-ALL"),
        lambda d: d["templates"]["cinematic"]["loras"][0].__setitem__("block_weights", [1] * 20),
    ],
)
def test_spec_hash_changes_when_the_build_changes(edit):
    data = example()
    before = parse_catalog(dumps(data)).spec_hash("cinematic")
    edit(data)
    assert parse_catalog(dumps(data)).spec_hash("cinematic") != before


def test_a_lora_without_block_weights_keeps_its_spec_hash():
    """The field is left out of the spec when absent (or null), so templates built before it existed keep
    their spec hash, and their exports stay byte-identical (the hash is in fuseline.json)."""
    data = example()
    spec = parse_catalog(dumps(data)).template_spec("cinematic")
    assert "block_weights" not in spec["template"]["loras"][0]
    before = parse_catalog(dumps(data)).spec_hash("cinematic")
    data["templates"]["cinematic"]["loras"][0]["block_weights"] = None
    assert parse_catalog(dumps(data)).spec_hash("cinematic") == before


@pytest.mark.parametrize(
    ("value", "stored", "resolved"),
    [
        ([1, 0, 0, 0, 0, 0.5, 1, 1, 1, 1, 1, 1], [1.0, 0, 0, 0, 0, 0.5, 1, 1, 1, 1, 1, 1], None),
        ([0.5] * 20, [0.5] * 20, None),
        ("SDXL-MIDALL", "SDXL-MIDALL", (1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0)),
    ],
)
def test_block_weights_take_twelve_or_twenty_numbers_or_a_preset(value, stored, resolved):
    data = example()
    data["templates"]["cinematic"]["loras"][0]["block_weights"] = value
    lora = parse_catalog(dumps(data)).templates["cinematic"].loras[0]
    assert lora.block_weights == stored
    assert lora.resolved_block_weights == (resolved or tuple(float(v) for v in stored))
    jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text())).validate(data)


def test_spec_hash_ignores_other_templates():
    data = example()
    data["templates"]["other"] = {"checkpoint": "sdxl-base", "loras": [{"source": "file:a", "scale": 0.5}]}
    before = parse_catalog(dumps(data))
    data["templates"]["other"]["loras"][0]["scale"] = 0.6
    after = parse_catalog(dumps(data))
    assert after.spec_hash("cinematic") == before.spec_hash("cinematic")
    assert after.spec_hash("other") != before.spec_hash("other")


# ---------------------------------------------------------------------------------------------- files


def test_resolve_file_is_relative_to_the_catalog_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "lora.safetensors").write_bytes(b"x")
    data = example()
    data["templates"]["cinematic"]["loras"][0] = {"source": "file:models/lora.safetensors"}
    (folder / "templates.json").write_text(dumps(data))
    monkeypatch.chdir(tmp_path)  # somewhere else: resolution must not depend on the working directory
    catalog = load_catalog("project/templates.json")
    assert catalog.path == folder / "templates.json"
    assert catalog.resolve_file("file:models/lora.safetensors") == folder / "models" / "lora.safetensors"
    assert catalog.resolve_file(parse_source("file:/etc/hosts")) == Path("/etc/hosts").resolve()
    assert catalog.warnings == []
    with pytest.raises(ValueError, match="not a file: source"):
        catalog.resolve_file("civitai:1")


def test_missing_file_source_is_a_warning(tmp_path):
    data = example()
    data["templates"]["cinematic"]["loras"][0] = {"source": "file:missing.safetensors"}
    (tmp_path / "templates.json").write_text(dumps(data))
    catalog = load_catalog(tmp_path / "templates.json")
    assert [(w.path, w.severity) for w in catalog.warnings] == [
        ("templates.cinematic.loras[0].source", "warning")
    ]


def test_iter_sources_lists_every_source_with_its_path():
    catalog = load_catalog(EXAMPLE)
    assert [path for path, _ in catalog.iter_sources()] == [
        "vae",
        "checkpoints.sdxl-base",
        "templates.cinematic.loras[0]",
    ]


# ---------------------------------------------------------------------------------------------- problems


def test_format_path():
    assert (
        format_path(("templates", "cinematic", "loras", 1, "scale")) == "templates.cinematic.loras[1].scale"
    )
    assert format_path(("templates", "cine.matic")) == 'templates["cine.matic"]'
    assert format_path(("templates", "")) == 'templates[""]'
    assert format_path(()) == ""


@pytest.mark.parametrize(
    "text", ["[" * 5000, '{"templates": ' * 3000, '{"a": ' + "[" * 900 + "]" * 900 + "}"]
)
def test_json_nested_past_any_catalog_is_a_catalog_error(text):
    # Found by the fuzz tests: json.loads (and the walks over the document) raised RecursionError.
    with pytest.raises(CatalogError) as exc:
        parse_catalog(text)
    assert exc.value.problems[0].code in ("INVALID_JSON", "NESTED_TOO_DEEP")


def test_catalog_error_lists_every_problem_one_per_line():
    data = example()
    data["templates"]["cinematic"]["loras"][0]["scale"] = 9
    data["templates"]["cinematic"]["defaults"]["width"] = 1001
    with pytest.raises(CatalogError) as info:
        parse_catalog(dumps(data), file="cat.json")
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.problems) == 2
    assert lines[0].startswith("cat.json: templates.cinematic.loras[0].scale: scale must be ")
    assert re.fullmatch(r"cat\.json: [^:]+: .+ \(fix: .+\)", lines[1])
    assert all(isinstance(p, Problem) and p.severity == "error" for p in info.value.problems)


def test_warnings_do_not_raise():
    data = example()
    data["checkpoints"]["spare"] = {"source": "civitai:42"}
    catalog = parse_catalog(dumps(data))
    assert {(w.path, w.code) for w in catalog.warnings} == {
        ("checkpoints.spare", "CHECKPOINT_UNUSED"),
        ("checkpoints.spare.sha256", "SHA256_MISSING"),
    }
    assert all(w.severity == "warning" for w in catalog.warnings)


def test_invalid_catalog_reports_its_errors_without_model_warnings():
    data = example()
    data["checkpoints"]["spare"] = {"source": "file:x"}
    data["templates"]["cinematic"]["defaults"]["steps"] = 0
    # The model is invalid, so no warnings are computed from it; only the error is reported.
    with pytest.raises(CatalogError) as info:
        parse_catalog(dumps(data))
    assert [p.path for p in info.value.errors] == ["templates.cinematic.defaults.steps"]


# ---------------------------------------------------------------------------------------------- schema & docs


def test_committed_schema_matches_the_model():
    committed = json.loads(SCHEMA_FILE.read_text())
    assert committed == catalog_json_schema(), (
        "fuseline/schema/templates.schema.json is stale; regenerate it with "
        "`fuseline schema > fuseline/schema/templates.schema.json`"
    )


def test_schema_is_valid_and_accepts_the_example():
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(example())


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["templates"].__setitem__("Bad.Id", d["templates"].pop("cinematic")),
        lambda d: d["checkpoints"].__setitem__("a" * 65, {"source": "file:x"}),
        lambda d: d["templates"]["cinematic"]["defaults"].__setitem__("width", 1001),
        lambda d: d["templates"]["cinematic"]["defaults"].__setitem__("steps", 151),
        lambda d: d["templates"]["cinematic"]["loras"][0].__setitem__("scale", 4.5),
        lambda d: d["templates"]["cinematic"]["loras"][0].__setitem__("scale", True),
        lambda d: d["templates"]["cinematic"]["loras"][0].__setitem__("sha256", "abc"),
        lambda d: d["templates"]["cinematic"].__setitem__("lora", []),
        lambda d: d["templates"]["cinematic"]["loras"][0].__setitem__("block_weights", [1] * 13),
        lambda d: d["templates"]["cinematic"]["loras"][0].__setitem__("block_weights", [1] * 11 + [5]),
        lambda d: d["templates"]["cinematic"]["loras"][0].__setitem__("block_weights", "SDXL-all"),
        lambda d: d["vae"].__setitem__("source", "hf:madebyollin/sdxl-vae-fp16-fix@main"),
        lambda d: d.__setitem__("version", 2),
        lambda d: d.__setitem__("templates", {}),
        lambda d: d.pop("checkpoints"),
        lambda d: d["checkpoints"].__setitem__("mix", {"recipe": {**RECIPE["recipe"], "method": "slerp"}}),
        lambda d: d["checkpoints"].__setitem__("mix", {"recipe": RECIPE["recipe"], "source": "file:x"}),
        lambda d: d["templates"]["cinematic"]["defaults"].__setitem__("timestep_spacing", "even"),
        lambda d: d["templates"]["cinematic"]["defaults"].__setitem__("refiner", {"switch_at": 0}),
    ],
)
def test_schema_and_validator_both_reject(edit):
    data = example()
    edit(data)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text())).validate(data)
    with pytest.raises(CatalogError):
        parse_catalog(dumps(data))


def test_docs_mention_every_schema_property():
    docs = DOCS.read_text()
    names: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            names.update(node.get("properties", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(catalog_json_schema())
    assert len(names) >= 19
    missing = sorted(name for name in names if f"`{name}`" not in docs)
    assert not missing, f"docs/templates.md does not document: {missing}"


# --------------------------------------------------------------- recipes, refiners, scheduler options

RECIPE = {
    "recipe": {
        "method": "add_difference",
        "a": {"source": "file:a.safetensors"},
        "b": {"source": f"hf:org/b/b.safetensors@{REV}"},
        "c": {"source": "civitai:42", "sha256": SHA},
        "alpha": 0.5,
    }
}


def with_refiner() -> dict:
    data = example()
    data["checkpoints"]["refiner"] = {"source": "file:refiner.safetensors"}
    data["templates"]["cinematic"]["refiner"] = "refiner"
    data["templates"]["cinematic"]["defaults"]["refiner"] = {"switch_at": 0.75}
    return data


def problems_of(data: dict) -> list[tuple[str, str]]:
    with pytest.raises(CatalogError) as caught:
        parse_catalog(dumps(data))
    return [(p.path, p.code) for p in caught.value.problems if p.severity == "error"]


def test_new_fields_absent_keep_every_spec_hash():
    """Templates written before recipes, refiners and scheduler options keep their hash (and manifests
    their bytes): the fields are left out of the spec when absent."""
    before = parse_catalog(dumps(example()))
    spec = before.template_spec("cinematic")
    assert "refiner" not in spec["template"] and "refiner" not in spec["template"]["defaults"]
    assert not {"timestep_spacing", "karras_sigmas"} & set(spec["template"]["defaults"])
    data = example()
    data["templates"]["cinematic"]["defaults"].update(timestep_spacing=None, karras_sigmas=None, refiner=None)
    data["templates"]["cinematic"]["refiner"] = None
    assert parse_catalog(dumps(data)).spec_hash("cinematic") == before.spec_hash("cinematic")


def test_recipe_checkpoint_loads_and_is_in_the_spec():
    data = example()
    data["checkpoints"]["mix"] = RECIPE
    data["templates"]["mixed"] = {"checkpoint": "mix"}
    catalog = parse_catalog(dumps(data))
    recipe = catalog.checkpoints["mix"].recipe
    assert recipe.method == "add_difference" and set(recipe.inputs()) == {"a", "b", "c"}
    assert recipe.identity.startswith("recipe:") and len(recipe.identity) == len("recipe:") + 64
    assert catalog.template_spec("mixed")["checkpoint"]["recipe"]["alpha"] == 0.5
    paths = [path for path, _ in catalog.iter_sources()]
    assert [p for p in paths if p.startswith("checkpoints.mix")] == [
        "checkpoints.mix.recipe.a",
        "checkpoints.mix.recipe.b",
        "checkpoints.mix.recipe.c",
    ]
    edited = copy.deepcopy(data)
    edited["checkpoints"]["mix"]["recipe"]["alpha"] = 0.6
    assert parse_catalog(dumps(edited)).spec_hash("mixed") != catalog.spec_hash("mixed")


@pytest.mark.parametrize(
    ("edit", "path", "code"),
    [
        (lambda r: r.pop("c"), "checkpoints.mix.recipe.c", "RECIPE_INPUT_MISSING"),
        (lambda r: r.update(method="weighted_sum"), "checkpoints.mix.recipe.c", "RECIPE_INPUT_UNUSED"),
        (
            lambda r: (r.pop("c"), r.update(method="weighted_sum", alpha=1.5)),
            "checkpoints.mix.recipe.alpha",
            "RECIPE_ALPHA_RANGE",
        ),
        (lambda r: r.update(alpha=5), "checkpoints.mix.recipe.alpha", "RECIPE_ALPHA_RANGE"),
        (lambda r: r.update(method="slerp"), "checkpoints.mix.recipe.method", "LITERAL_ERROR"),
        (lambda r: r.update(alpah=1), "checkpoints.mix.recipe.alpah", "UNKNOWN_KEY"),
        (
            lambda r: r["a"].update(source="file:a.ckpt"),
            "checkpoints.mix.recipe.a.source",
            "PICKLE_NOT_ALLOWED",
        ),
    ],
)
def test_recipe_problems_are_located(edit, path, code):
    data = example()
    data["checkpoints"]["mix"] = copy.deepcopy(RECIPE)
    data["templates"]["mixed"] = {"checkpoint": "mix"}
    edit(data["checkpoints"]["mix"]["recipe"])
    assert (path, code) in problems_of(data)


def test_a_recipe_entry_lists_the_recipe_keys_for_a_typo():
    data = example()
    data["checkpoints"]["mix"] = {**copy.deepcopy(RECIPE), "predicton": "epsilon"}
    with pytest.raises(CatalogError) as caught:
        parse_catalog(dumps(data))
    (problem,) = [p for p in caught.value.problems if p.code == "UNKNOWN_KEY"]
    assert problem.path == "checkpoints.mix.predicton" and "'prediction'" in problem.hint
    assert "recipe" in problem.hint and "sha256" not in problem.hint


def test_refiner_template_loads():
    catalog = parse_catalog(dumps(with_refiner()))
    assert catalog.templates["cinematic"].refiner == "refiner"
    assert catalog.templates["cinematic"].defaults.refiner.switch_at == 0.75
    assert catalog.refiners() == {"refiner": ["cinematic"]}
    assert len(catalog.checkpoint_spec_hash("refiner")) == 64
    assert not [w for w in catalog.warnings if w.code == "CHECKPOINT_UNUSED"]


@pytest.mark.parametrize(
    ("edit", "path", "code"),
    [
        (
            lambda d: d["templates"]["cinematic"].pop("refiner"),
            "templates.cinematic.defaults.refiner",
            "REFINER_MISSING",
        ),
        (
            lambda d: d["templates"]["cinematic"].update(refiner="refinr"),
            "templates.cinematic.refiner",
            "REFINER_UNKNOWN",
        ),
        (
            lambda d: d["templates"]["cinematic"].update(refiner="sdxl-base"),
            "templates.cinematic.refiner",
            "REFINER_INVALID",
        ),
        (
            lambda d: (
                d["checkpoints"].update(mix=RECIPE),
                d["templates"]["cinematic"].update(refiner="mix"),
            ),
            "templates.cinematic.refiner",
            "REFINER_INVALID",
        ),
        (
            lambda d: d["templates"]["cinematic"]["defaults"]["refiner"].update(switch_at=0),
            "templates.cinematic.defaults.refiner.switch_at",
            "GREATER_THAN",
        ),
        (
            lambda d: d["templates"]["cinematic"]["defaults"]["refiner"].update(switch_at=1.2),
            "templates.cinematic.defaults.refiner.switch_at",
            "LESS_THAN_EQUAL",
        ),
    ],
)
def test_refiner_problems_are_located(edit, path, code):
    data = with_refiner()
    edit(data)
    assert (path, code) in problems_of(data)


@pytest.mark.parametrize(
    ("written", "stored"),
    [("DPM++ 2M SDE Karras", "dpmpp_2m_sde_karras"), ("euler a", "euler_a"), ("lcm", "lcm"), ("TCD", "tcd")],
)
def test_civitai_sampler_names_are_stored_as_scheduler_names(written, stored):
    data = example()
    data["templates"]["cinematic"]["defaults"]["scheduler"] = written
    assert parse_catalog(dumps(data)).templates["cinematic"].defaults.scheduler == stored


@pytest.mark.parametrize(
    ("defaults", "path", "code"),
    [
        ({"scheduler": "lcm", "karras_sigmas": True}, "karras_sigmas", "SCHEDULER_OPTION_UNSUPPORTED"),
        (
            {"scheduler": "tcd", "timestep_spacing": "trailing"},
            "timestep_spacing",
            "SCHEDULER_OPTION_UNSUPPORTED",
        ),
        (
            {"scheduler": "dpmpp_2m_karras", "karras_sigmas": False},
            "karras_sigmas",
            "SCHEDULER_OPTION_UNSUPPORTED",
        ),
        ({"timestep_spacing": "trailng"}, "timestep_spacing", "LITERAL_ERROR"),
        ({"scheduler": "DPM++ 2M SDE Exponential"}, "scheduler", "SCHEDULER_UNKNOWN"),
    ],
)
def test_scheduler_option_problems_are_located(defaults, path, code):
    data = example()
    data["templates"]["cinematic"]["defaults"].update(defaults)
    assert (f"templates.cinematic.defaults.{path}", code) in problems_of(data)


def test_scheduler_options_that_fit_load():
    data = example()
    data["templates"]["cinematic"]["defaults"].update(
        scheduler="Euler", timestep_spacing="trailing", karras_sigmas=True, steps=4
    )
    defaults = parse_catalog(dumps(data)).templates["cinematic"].defaults
    assert (defaults.scheduler, defaults.timestep_spacing, defaults.karras_sigmas) == (
        "euler",
        "trailing",
        True,
    )
    # The model folder's own scheduler is not known to the catalog: its options are the worker's business.
    data["templates"]["cinematic"]["defaults"].update(scheduler=None, karras_sigmas=True)
    assert parse_catalog(dumps(data)).templates["cinematic"].defaults.karras_sigmas is True
