"""`fuseline report`: the per-template table and JSON over artifacts/stats/, from metrics files as the stages
write them (stages.runtime.write_stage_metrics); a real build is reported in tests/stages/test_metrics.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fuseline.cli import app
from fuseline.cli.report import NO_VERIFY_RESULT, build_report, render_text
from fuseline.core.build_metrics import STATS_DIR, stats_path
from stages.runtime import stage_ids, write_stage_metrics

runner = CliRunner()


def catalog(*templates: str) -> dict:
    return {
        "version": 1,
        "vae": {"source": "file:vae"},
        "checkpoints": {"base": {"source": "file:base"}},
        "templates": {t: {"checkpoint": "base"} for t in templates},
    }


def write(root: Path, stage: str, item_id: str, wall_ms: float, **extra) -> None:
    write_stage_metrics(stage, item_id, {**extra, **stage_ids(stage, item_id), "wall_ms": wall_ms}, root)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder where `alpha` was built and verified, `beta` is in the catalog but never built."""
    (tmp_path / "templates.json").write_text(json.dumps(catalog("alpha", "beta")))
    write(tmp_path, "fetch-checkpoint", "base", 50.0)
    write(tmp_path, "convert", "base", 9000.0)
    write(tmp_path, "vae", "vae", 3000.0)
    write(tmp_path, "fetch-loras", "alpha", 100.0)
    loras = {
        "0": {"source": "file:/data/loras/ink.safetensors", "scale": 0.8, "file_keys": 12,
              "placed_keys": {"unet": 12, "text_encoder": 0, "text_encoder_2": 0}, "unplaced_keys": 0},
        "1": {"source": "https://example.com/dl/te.safetensors?token=abc123secret", "scale": 0.5,
              "file_keys": 6, "placed_keys": {"unet": 0, "text_encoder": 4, "text_encoder_2": 2},
              "unplaced_keys": 0},
    }  # fmt: skip
    write(tmp_path, "merge", "alpha", 20_000.0, checkpoint="base", model_bytes=6_900_000_000, lora_count=2,
          loras=loras, placed_keys={"unet": 12, "text_encoder": 4, "text_encoder_2": 2, "total": 18},
          unplaced_keys=0)  # fmt: skip
    preview = tmp_path / "artifacts/verify/alpha/preview.png"
    preview.parent.mkdir(parents=True)
    preview.write_bytes(b"\x89PNG")
    write(tmp_path, "verify", "alpha", 5000.0, result="pass", preview="artifacts/verify/alpha/preview.png")
    return tmp_path


def test_report_json_sums_each_template_own_stages(project):
    result = runner.invoke(app, ["report", "--project", str(project), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    alpha, beta = data["templates"]
    assert alpha["template"] == "alpha" and alpha["built"] and alpha["checkpoint"] == "base"
    # fetch-loras + merge + verify; the shared convert/vae/fetch-checkpoint are listed apart.
    assert alpha["build_ms"] == 100.0 + 20_000.0 + 5000.0
    assert alpha["stage_ms"] == {"fetch-loras": 100.0, "merge": 20_000.0, "verify": 5000.0}
    assert data["shared_stage_ms"] == {"fetch-checkpoint@base": 50.0, "convert@base": 9000.0, "vae": 3000.0}
    assert alpha["model_bytes"] == 6_900_000_000 and "unplaced_keys" not in alpha
    assert [lora["scale"] for lora in alpha["loras"]] == [0.8, 0.5]
    assert alpha["placed_keys"]["total"] == 18
    assert alpha["verify"] == "pass" and alpha["preview"] == "artifacts/verify/alpha/preview.png"
    assert beta == {
        **beta,
        "built": False,
        "build_ms": None,
        "verify": NO_VERIFY_RESULT,
        "checkpoint": "base",
    }
    assert "abc123secret" not in result.output  # the stage redacted it when writing the file


def test_report_table_shows_size_time_loras_keys_and_verify(project):
    result = runner.invoke(app, ["report", "--project", str(project)])
    assert result.exit_code == 0, result.output
    alpha = next(line for line in result.output.splitlines() if "alpha" in line)
    for cell in ("6.9 GB", "25.1 s", "2: ink.safetensors x0.8, te.safetensors x0.5", "18 (unet 12,", "pass"):
        assert cell in alpha, (cell, alpha)
    assert "artifacts/verify/alpha/preview.png" in result.output
    beta = next(line for line in result.output.splitlines() if "beta" in line)
    assert "not built" in beta
    assert "convert@base 9.0 s" in result.output
    assert "\x1b[" not in result.output  # piped: no colour codes


def test_nothing_built_says_so(tmp_path):
    (tmp_path / "templates.json").write_text(json.dumps(catalog("alpha")))
    result = runner.invoke(app, ["report", "--project", str(tmp_path)])
    assert result.exit_code == 0
    assert "nothing built yet" in result.output and "dvc repro" in result.output
    data = json.loads(runner.invoke(app, ["report", "--project", str(tmp_path), "--json"]).output)
    assert [t["built"] for t in data["templates"]] == [False]


def test_unreadable_metrics_and_removed_templates_are_reported_not_fatal(project):
    stats_path("merge", "beta", project).write_text("{not json")
    write(project, "merge", "gone", 10.0, model_bytes=1)
    report = build_report(project)
    (problem,) = [p for p in report.problems if "merge/beta.json" in p]
    # A cached output: restored by checkout of that one path; never `repro -f` (it re-runs all upstream).
    assert "`dvc checkout artifacts/stats/merge/beta.json`" in problem and "`dvc repro merge@beta`" in problem
    assert "-f" not in problem
    gone = next(t for t in report.templates if t.template == "gone")
    assert gone.built and not gone.in_catalog
    text = render_text(report)
    assert "gone (not in catalog)" in text and "problem:" in text


def test_report_works_without_a_catalog(project):
    (project / "templates.json").unlink()
    report = build_report(project)
    assert [t.template for t in report.templates] == ["alpha"] and report.templates[0].in_catalog
    assert (project / STATS_DIR).is_dir()


def test_repair_advice_names_shared_stages_without_an_id(project):
    stats_path("vae", "vae", project).write_text("[]")  # JSON, but not an object
    (problem,) = build_report(project).problems
    assert "`dvc checkout artifacts/stats/vae/vae.json`" in problem and "`dvc repro vae`" in problem
    assert "vae@" not in problem


def test_table_cells_are_text_not_rich_markup(project):
    # A LoRA file name, a template id and a preview path with square brackets, as a user may name them.
    loras = {"0": {"source": "file:/data/style[red]x.safetensors", "scale": 1.0, "file_keys": 1,
                   "placed_keys": {"unet": 1}, "unplaced_keys": 0}}  # fmt: skip
    write(project, "merge", "odd[bold]", 10.0, checkpoint="base", model_bytes=1, loras=loras,
          placed_keys={"unet": 1, "total": 1}, unplaced_keys=0)  # fmt: skip
    text = render_text(build_report(project))
    assert "style[red]x.safetensors x1.0" in text
    assert "odd[bold] (not in catalog)" in text


def test_a_built_template_without_verify_metrics_may_have_failed_and_says_so(project):
    stats_path("verify", "alpha", project).unlink()  # what a failed verify leaves: no metrics file
    report = build_report(project)
    alpha = next(t for t in report.templates if t.template == "alpha")
    assert alpha.built and alpha.verify == NO_VERIFY_RESULT
    line = next(line for line in render_text(report).splitlines() if line.lstrip("│ ").startswith("alpha"))
    assert "not verified (or failed: see the verify stage's log)" in line
