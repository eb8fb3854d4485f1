"""`fuseline validate` end to end: every rejected case exits 1 and names the JSON path; warnings exit 0."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fuseline.cli import app

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "templates.json"
REV = "0123456789abcdef0123456789abcdef01234567"
SHA = "cd" * 32

runner = CliRunner()


def example() -> dict:
    return json.loads(EXAMPLE.read_text())


def validate(path: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "templates.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


def assert_no_pydantic_leak(output: str) -> None:
    # Users see our messages, not pydantic's ("Input should be ...", links to errors.pydantic.dev).
    assert "pydantic" not in output
    assert "Input should be" not in output
    assert "Field required" not in output
    assert "Extra inputs" not in output


def lora(d: dict) -> dict:
    return d["templates"]["cinematic"]["loras"][0]


def defaults(d: dict) -> dict:
    return d["templates"]["cinematic"]["defaults"]


def ckpt(d: dict) -> dict:
    return d["checkpoints"]["sdxl-base"]


def rename_template(new_id: str) -> Callable[[dict], None]:
    return lambda d: d.__setitem__("templates", {new_id: d["templates"]["cinematic"]})


def rename_checkpoint(new_id: str) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        d["checkpoints"] = {new_id: ckpt(d)}
        d["templates"]["cinematic"]["checkpoint"] = new_id

    return edit


# (case id, edit of the example catalog, JSON path that must be named, text the message must contain)
REJECTED: list[tuple[str, Callable[[dict], None], str, str]] = [
    # version
    ("version-missing", lambda d: d.pop("version"), "version", "required key 'version' is missing"),
    ("version-2", lambda d: d.__setitem__("version", 2), "version", "unsupported catalog version 2"),
    ("version-string", lambda d: d.__setitem__("version", "1"), "version", 'unsupported catalog version "1"'),
    ("version-bool", lambda d: d.__setitem__("version", True), "version", "got true"),
    # unknown keys at every level, with the closest valid name
    ("unknown-top", lambda d: d.__setitem__("template", {}), "template", "did you mean 'templates'?"),
    ("unknown-vae", lambda d: d["vae"].__setitem__("sha", SHA), "vae.sha", "did you mean 'sha256'?"),
    (
        "unknown-checkpoint",
        lambda d: ckpt(d).__setitem__("predicton", "epsilon"),
        "checkpoints.sdxl-base.predicton",
        "did you mean 'prediction'?",
    ),
    (
        "unknown-template",
        lambda d: d["templates"]["cinematic"].__setitem__("lora", []),
        "templates.cinematic.lora",
        "did you mean 'loras'?",
    ),
    (
        "unknown-lora",
        lambda d: lora(d).__setitem__("weight", 0.5),
        "templates.cinematic.loras[0].weight",
        "unknown key 'weight'",
    ),
    (
        "unknown-defaults",
        lambda d: defaults(d).__setitem__("negativ_prompt", ""),
        "templates.cinematic.defaults.negativ_prompt",
        "did you mean 'negative_prompt'?",
    ),
    # ids
    ("id-empty", rename_template(""), 'templates[""]', "it is empty"),
    ("id-too-long", rename_template("a" * 65), "templates." + "a" * 65, "65 characters long"),
    ("id-dot", rename_template("cine.matic"), 'templates["cine.matic"]', "dots break DVC params paths"),
    ("id-slash", rename_template("cine/matic"), 'templates["cine/matic"]', "slashes"),
    ("id-upper", rename_template("Cinematic"), "templates.Cinematic", "uppercase"),
    ("id-underscore", rename_template("cine_matic"), "templates.cine_matic", "e.g. 'cine-matic'"),
    ("id-hyphen-edge", rename_template("-cinematic"), 'templates["-cinematic"]', "hyphen"),
    ("checkpoint-id-dot", rename_checkpoint("sdxl.base"), 'checkpoints["sdxl.base"]', "dots break"),
    # references
    (
        "checkpoint-unknown",
        lambda d: d["templates"]["cinematic"].__setitem__("checkpoint", "sdxl-bas"),
        "templates.cinematic.checkpoint",
        "did you mean 'sdxl-base'? use one of: sdxl-base",
    ),
    # LoRA scale
    ("scale-nan", lambda d: lora(d).__setitem__("scale", float("nan")), "loras[0].scale", "got NaN"),
    ("scale-inf", lambda d: lora(d).__setitem__("scale", float("inf")), "loras[0].scale", "got Infinity"),
    ("scale-neg-inf", lambda d: lora(d).__setitem__("scale", float("-inf")), "loras[0].scale", "-Infinity"),
    ("scale-bool", lambda d: lora(d).__setitem__("scale", True), "loras[0].scale", "got true"),
    ("scale-string", lambda d: lora(d).__setitem__("scale", "0.8"), "loras[0].scale", 'got "0.8"'),
    ("scale-high", lambda d: lora(d).__setitem__("scale", 4.01), "loras[0].scale", "from -4 to 4, got 4.01"),
    ("scale-low", lambda d: lora(d).__setitem__("scale", -5), "loras[0].scale", "from -4 to 4, got -5"),
    # LoRA block weights
    (
        "block-weights-count",
        lambda d: lora(d).__setitem__("block_weights", [1] * 13),
        "templates.cinematic.loras[0].block_weights",
        "block_weights has 13 values; SDXL takes 12 or 20",
    ),
    (
        "block-weights-sd1",
        lambda d: lora(d).__setitem__("block_weights", [1] * 17),
        "loras[0].block_weights",
        "the extension's SD 1.x layout",
    ),
    (
        "block-weights-preset",
        lambda d: lora(d).__setitem__("block_weights", "SDXL-OUTAL"),
        "templates.cinematic.loras[0].block_weights",
        "unknown block weight preset 'SDXL-OUTAL'",
    ),
    (
        "block-weights-value",
        lambda d: lora(d).__setitem__("block_weights", [1] * 5 + [float("nan")] + [1] * 6),
        "templates.cinematic.loras[0].block_weights[5]",
        "block weight 5 (MID) must be a finite number",
    ),
    (
        "block-weights-type",
        lambda d: lora(d).__setitem__("block_weights", {"IN04": 1}),
        "loras[0].block_weights",
        "a list of numbers or a preset name",
    ),
    # sha256
    ("sha-short", lambda d: lora(d).__setitem__("sha256", "abc123"), "loras[0].sha256", "64 hex digits"),
    ("sha-nonhex", lambda d: ckpt(d).__setitem__("sha256", "z" * 64), "sdxl-base.sha256", "64 hex digits"),
    ("sha-number", lambda d: ckpt(d).__setitem__("sha256", 12), "sdxl-base.sha256", "64 hex digits"),
    # sources
    ("scheme-ftp", lambda d: lora(d).__setitem__("source", "ftp://x/y"), "loras[0].source", "scheme 'ftp'"),
    ("scheme-http", lambda d: lora(d).__setitem__("source", "http://x/y"), "loras[0].source", "plain http"),
    ("scheme-none", lambda d: lora(d).__setitem__("source", "x.safetensors"), "loras[0].source", "no source"),
    (
        "civitai-name",
        lambda d: lora(d).__setitem__("source", "civitai:add-detail"),
        "loras[0].source",
        "numeric",
    ),
    (
        "hf-unpinned",
        lambda d: d["vae"].__setitem__("source", "hf:madebyollin/sdxl-vae-fp16-fix"),
        "vae.source",
        "not pinned to a revision",
    ),
    (
        "hf-branch",
        lambda d: d["vae"].__setitem__("source", "hf:madebyollin/sdxl-vae-fp16-fix@main"),
        "vae.source",
        "not a 40-hex commit sha",
    ),
    (
        "config-civitai",
        lambda d: ckpt(d).__setitem__("config", "civitai:1"),
        "checkpoints.sdxl-base.config",
        "must name a folder",
    ),
    (
        "config-unpinned",
        lambda d: ckpt(d).__setitem__("config", "hf:stabilityai/stable-diffusion-xl-base-1.0"),
        "checkpoints.sdxl-base.config",
        "not pinned",
    ),
    (
        "prediction",
        lambda d: ckpt(d).__setitem__("prediction", "v"),
        "sdxl-base.prediction",
        '"v_prediction"',
    ),
    # pickles
    (
        "pickle-ckpt",
        lambda d: ckpt(d).update(source="https://example.com/model.ckpt"),
        "checkpoints.sdxl-base.source",
        "pickle-based",
    ),
    (
        "pickle-bin",
        lambda d: lora(d).__setitem__("source", f"hf:o/r/pytorch_lora_weights.bin@{REV}"),
        "templates.cinematic.loras[0].source",
        '"allow_pickle": true',
    ),
    (
        "pickle-pt-false",
        lambda d: lora(d).update(source="s3://bucket/x.pt", allow_pickle=False),
        "templates.cinematic.loras[0].source",
        "pickle-based",
    ),
    (
        "allow-pickle-string",
        lambda d: lora(d).update(source="s3://bucket/x.pth", allow_pickle="true"),
        "templates.cinematic.loras[0].allow_pickle",
        "true or false",
    ),
    # defaults
    ("width-not-8", lambda d: defaults(d).__setitem__("width", 1001), "defaults.width", "multiple of 8"),
    ("width-small", lambda d: defaults(d).__setitem__("width", 248), "defaults.width", "got 248"),
    ("height-big", lambda d: defaults(d).__setitem__("height", 2056), "defaults.height", "got 2056"),
    ("steps-zero", lambda d: defaults(d).__setitem__("steps", 0), "defaults.steps", "from 1 to 150, got 0"),
    ("steps-big", lambda d: defaults(d).__setitem__("steps", 151), "defaults.steps", "got 151"),
    ("steps-float", lambda d: defaults(d).__setitem__("steps", 24.5), "defaults.steps", "integer"),
    ("cfg-negative", lambda d: defaults(d).__setitem__("guidance_scale", -0.5), "guidance_scale", "0 to 30"),
    ("cfg-big", lambda d: defaults(d).__setitem__("guidance_scale", 30.5), "guidance_scale", "got 30.5"),
    ("cfg-nan", lambda d: defaults(d).__setitem__("guidance_scale", float("nan")), "guidance_scale", "NaN"),
    # structure
    ("templates-empty", lambda d: d.__setitem__("templates", {}), "templates", "templates is empty"),
    ("templates-missing", lambda d: d.pop("templates"), "templates", "required key 'templates'"),
    ("checkpoints-list", lambda d: d.__setitem__("checkpoints", []), "checkpoints", "must be an object"),
    ("template-not-object", lambda d: d["templates"].__setitem__("x", 3), "templates.x", "JSON object"),
    (
        "loras-not-list",
        lambda d: d["templates"]["cinematic"].__setitem__("loras", {}),
        "cinematic.loras",
        "list",
    ),
    ("source-missing", lambda d: lora(d).pop("source"), "loras[0].source", "required key 'source'"),
    (
        "source-userinfo",
        lambda d: lora(d).__setitem__("source", "https://me:s3cr3t-pw@example.com/x.safetensors"),
        "loras[0].source",
        "user:password@ part",
    ),
    (
        "source-token",
        lambda d: lora(d).__setitem__("source", "https://example.com/x.safetensors?token=s3cr3t-tok"),
        "loras[0].source",
        "secret-looking query parameter 'token'",
    ),
]


@pytest.mark.parametrize(
    ("edit", "path", "text"), [case[1:] for case in REJECTED], ids=[c[0] for c in REJECTED]
)
def test_rejected_case_exits_1_naming_the_path(tmp_path, edit, path, text):
    data = example()
    edit(data)
    file = write(tmp_path, data)
    code, output = validate(file)
    assert code == 1, output
    # The problem line names the file, the JSON path (ending with the expected one) and what is wrong.
    lines = [line for line in output.splitlines() if line.startswith(f"{file}: ") and text in line]
    assert lines, output
    assert any(
        re.match(rf"{re.escape(str(file))}: (\S*[.\]])?{re.escape(path)}: ", line) for line in lines
    ), output
    assert all("(fix: " in line for line in lines), output
    assert re.search(r"invalid: \d+ errors?", output)
    assert_no_pydantic_leak(output)
    assert "s3cr3t" not in output  # a rejected credential is not printed back


@pytest.mark.parametrize(
    "source",
    [
        "s3://AKIAFUSELINE:pw-0123456789@bucket/x.safetensors",
        "s3://bucket/x.safetensors?X-Amz-Credential=pw-0123456789&X-Amz-Signature=pw-0123456789",
        "s3://bucket/x.safetensors?token=pw-0123456789",
        "ftp://user:pw-0123456789@example.com/x.safetensors",
    ],
)
def test_a_source_with_credentials_is_refused_without_printing_them(tmp_path, source):
    # Issue 16: validate printed the password of an s3://KEY:SECRET@bucket source verbatim, and accepted
    # s3 sources carrying a signature or a token.
    data = example()
    ckpt(data)["source"] = source
    code, out = validate(write(tmp_path, data))
    assert code == 1 and "checkpoints.sdxl-base.source" in out, out
    assert "pw-0123456789" not in out


def test_invalid_json_names_line_and_column(tmp_path):
    file = write(tmp_path, '{\n  "version": 1,\n  "checkpoints": {}\n  "templates": {}\n}\n')
    code, output = validate(file)
    assert code == 1
    assert "invalid JSON at line 4, column 3" in output


def test_duplicate_key_is_reported(tmp_path):
    text = EXAMPLE.read_text().replace(
        '"templates": {', '"templates": {\n    "cinematic": {"checkpoint": "x"},', 1
    )
    code, output = validate(write(tmp_path, text))
    assert code == 1
    assert "templates.cinematic: key 'cinematic' appears more than once" in output


def test_duplicate_key_deep_inside(tmp_path):
    text = EXAMPLE.read_text().replace('"scale": 0.8', '"scale": 0.8, "scale": 0.9', 1)
    code, output = validate(write(tmp_path, text))
    assert code == 1
    assert "templates.cinematic.loras[0].scale: key 'scale' appears more than once" in output


def test_nan_literal_in_json_text_is_rejected(tmp_path):
    # Python's json accepts the non-standard NaN literal; the catalog must not.
    text = EXAMPLE.read_text().replace('"scale": 0.8', '"scale": NaN', 1)
    code, output = validate(write(tmp_path, text))
    assert code == 1
    assert "templates.cinematic.loras[0].scale: scale must be a finite number from -4 to 4, got NaN" in output


def test_all_problems_are_reported_at_once(tmp_path):
    data = example()
    data["version"] = 3
    data["vae"]["source"] = "hf:madebyollin/sdxl-vae-fp16-fix@main"
    data["checkpoints"]["Other.Base"] = {"source": "https://example.com/model.ckpt", "prediction": "x"}
    template = data["templates"]["cinematic"]
    template["checkpoint"] = "nope"
    template["loras"][0]["scale"] = float("nan")
    template["loras"].append({"source": "ftp://x", "sha256": "123", "scale": True})
    template["defaults"].update(width=1001, height=4096, steps=0, guidance_scale=31, negativ_prompt="")
    code, output = validate(write(tmp_path, data))
    assert code == 1
    # Every problem, in the order the places appear in the file.
    expected = [
        "version",
        "vae.source",
        'checkpoints["Other.Base"]',
        'checkpoints["Other.Base"].source',
        'checkpoints["Other.Base"].prediction',
        "templates.cinematic.checkpoint",
        "templates.cinematic.loras[0].scale",
        "templates.cinematic.loras[1].source",
        "templates.cinematic.loras[1].sha256",
        "templates.cinematic.loras[1].scale",
        "templates.cinematic.defaults.steps",
        "templates.cinematic.defaults.guidance_scale",
        "templates.cinematic.defaults.width",
        "templates.cinematic.defaults.height",
        "templates.cinematic.defaults.negativ_prompt",
    ]
    reported = [line.split(": ")[1] for line in output.splitlines() if line.startswith(str(tmp_path))]
    assert reported[:-1] == expected, output  # the last line is the summary
    assert f"invalid: {len(expected)} errors" in output
    assert_no_pydantic_leak(output)


def test_defaults_the_worker_would_refuse_are_refused_with_their_paths(tmp_path):
    # Issue 15: width 1000 (a multiple of 8, not of 64) and a scheduler the worker does not know passed
    # validation; the template built, verified and published, then failed every job using its defaults.
    data = example()
    defaults(data).update(width=1000, scheduler="k_lms")
    data["templates"]["tall"] = {"checkpoint": "sdxl-base", "defaults": {"height": 328}}
    code, out = validate(write(tmp_path, data))
    assert code == 1, out
    assert "templates.cinematic.defaults.width: width 1000 is not a size the worker serves" in out
    assert "a multiple of 64 between 256 and 2048" in out and "use 1024 or another multiple of 64" in out
    assert "templates.tall.defaults.height: height 328 is not a size the worker serves" in out
    assert "templates.cinematic.defaults.scheduler: scheduler 'k_lms' is not one the worker knows" in out
    assert "euler_a" in out  # the names it does know
    assert_no_pydantic_leak(out)


def test_default_size_over_the_workers_pixel_budget_warns(tmp_path):
    data = example()
    defaults(data).update(width=2048, height=2048)
    code, out = validate(write(tmp_path, data))
    assert code == 0, out
    assert "templates.cinematic.defaults: warning: 2048x2048 = 4194304 pixels exceeds" in out
    assert "FUSELINE_MAX_PIXELS" in out


def test_unused_checkpoint_warns_and_exits_0(tmp_path):
    data = example()
    data["checkpoints"]["spare"] = {"source": "file:spare.safetensors"}
    (tmp_path / "spare.safetensors").write_bytes(b"")
    code, output = validate(write(tmp_path, data))
    assert code == 0, output
    assert "checkpoints.spare: warning: checkpoint 'spare' is not used by any template" in output
    assert "valid (2 checkpoints, 1 template, 1 warning)" in output


def test_missing_sha256_warns_and_exits_0(tmp_path):
    data = example()
    del data["templates"]["cinematic"]["loras"][0]["sha256"]
    code, output = validate(write(tmp_path, data))
    assert code == 0, output
    assert "templates.cinematic.loras[0].sha256: warning: civitai source" in output


def test_allow_pickle_true_accepts_a_pickle(tmp_path):
    data = example()
    data["checkpoints"]["sdxl-base"].update(source="https://example.com/model.ckpt", allow_pickle=True)
    code, output = validate(write(tmp_path, data))
    assert code == 0, output


def test_example_catalog_is_valid():
    code, output = validate(EXAMPLE)
    assert code == 0, output
    assert output.strip().endswith("valid (1 checkpoint, 1 template)")


def test_missing_file(tmp_path):
    code, output = validate(tmp_path / "nope.json")
    assert code == 1
    assert "nope.json: file not found" in output


def test_default_path_and_console_entry_point():
    # `python -m fuseline.cli validate` with no argument reads ./templates.json (here, the repo's example).
    result = subprocess.run(
        [sys.executable, "-m", "fuseline.cli", "validate"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("templates.json: valid")


def test_schema_command_prints_the_committed_schema():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    committed = (REPO / "fuseline" / "schema" / "templates.schema.json").read_text()
    assert json.loads(result.output) == json.loads(committed)


def test_no_command_shows_help():
    result = runner.invoke(app, [])
    assert "validate" in result.output and "schema" in result.output


def test_terminal_output_uses_rich_and_keeps_the_text(monkeypatch, capsys):
    from fuseline import cli
    from fuseline.core.catalog.problems import Problem

    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    cli._print_problems(
        [Problem("t.json", "templates.a.loras[0].scale", "scale [bad]", "use 1.0", "warning")]
    )
    out = capsys.readouterr().out
    assert "warning" in out and "t.json: templates.a.loras[0].scale: " in out
    assert "scale [bad]" in out  # user text is escaped, not taken for rich markup
    assert "(fix: use 1.0)" in out


def test_recipe_refiner_and_scheduler_option_problems_all_reported_with_paths(tmp_path: Path) -> None:
    data = example()
    data["checkpoints"]["mix"] = {
        "recipe": {
            "method": "add_difference",
            "a": {"source": "file:a.safetensors"},
            "b": {"source": "file:b.safetensors"},
            "alpha": 0.5,
        }
    }
    data["checkpoints"]["ref"] = {"source": "file:ref.safetensors"}
    data["templates"]["cinematic"]["refiner"] = "reff"
    data["templates"]["cinematic"]["defaults"].update(scheduler="TCD", karras_sigmas=True)
    data["templates"]["other"] = {"checkpoint": "mix", "defaults": {"refiner": {"switch_at": 0.7}}}
    code, output = validate(write(tmp_path, data))
    assert code == 1
    assert_no_pydantic_leak(output)
    for path in (
        "checkpoints.mix.recipe.c:",
        "templates.cinematic.refiner:",
        "templates.cinematic.defaults.karras_sigmas:",
        "templates.other.defaults.refiner:",
    ):
        assert path in output, output


def test_a_catalog_with_a_recipe_and_a_refiner_validates(tmp_path: Path) -> None:
    data = example()
    data["checkpoints"]["mix"] = {
        "recipe": {
            "method": "weighted_sum",
            "a": {"source": "file:a.safetensors"},
            "b": {"source": "file:b.safetensors"},
            "alpha": 0.25,
        }
    }
    data["checkpoints"]["ref"] = {"source": "file:ref.safetensors"}
    data["templates"]["mixed"] = {
        "checkpoint": "mix",
        "refiner": "ref",
        "defaults": {"refiner": {"switch_at": 0.8}, "scheduler": "Euler a", "timestep_spacing": "trailing"},
    }
    code, output = validate(write(tmp_path, data))
    assert code == 0, output
    assert "3 checkpoints, 2 templates" in output
