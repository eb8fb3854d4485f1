"""B2 (no-op rebuild, one-template edit) and B5 (serving overhead) in their --quick modes, so they do not rot.

Timings are not asserted (a shared 2-core machine makes them noise at this size); the correctness checks the
benchmarks carry are: B2's edit re-runs exactly the edited template's stages and its no-op runs nothing;
B5's handler and bare diffusers paths return the same PNG bytes.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from benchmarks import b2_rebuild, b5_serving


@pytest.mark.slow
def test_b2_rebuild_quick(kit, tmp_path, monkeypatch):
    """3 templates built by the real `dvc repro`; no-op repro against the mirrored floor project; one LoRA
    scale edited: exactly fetch-loras, merge and verify of that template re-run, per DVC's output and per
    dvc.lock."""
    monkeypatch.setenv("FUSELINE_KIT_DIR", str(kit.root))
    out = tmp_path / "b2.json"
    b2_rebuild.main(["--quick", "--root", str(tmp_path / "root"), "--json-out", str(out)])
    summary = json.loads(out.read_text())

    count = b2_rebuild.QUICK_TEMPLATES
    assert summary["templates"] == count
    # Per template: fetch-loras, merge, verify; once: fetch-checkpoint, fetch-vae, convert, vae.
    assert summary["graph"]["stages"] == 3 * count + 4
    assert summary["build"]["stages_run"] == 3 * count + 4
    assert summary["graph"]["floor_stages_built"] == summary["graph"]["stages"]

    noop = summary["noop"]
    assert noop["nothing_ran"] is True
    assert [len(noop["runs"][name]) for name in ("ours", "floor")] == [2, 2]
    assert all(run["wall_s"] > 0 and run["cpu_s"] > 0 for runs in noop["runs"].values() for run in runs)

    edit = summary["edit"]
    edited = edit["template"]
    expected = [f"fetch-loras@{edited}", f"merge@{edited}", f"verify@{edited}"]
    assert edit["expected"] == expected
    assert edit["stages_ran"] == expected
    assert edit["lock_entries_changed"] == expected
    assert edit["count"] == 3 and edit["exactly_that_template"] is True

    ratios = summary["ratios"]
    assert ratios["noop_ours_vs_floor"] > 0
    assert ratios["target_met"] == (ratios["noop_ours_vs_floor"] <= b2_rebuild.TARGET_RATIO)
    assert ratios["target_met_cpu"] == (ratios["noop_ours_vs_floor_cpu"] <= b2_rebuild.TARGET_RATIO)
    assert ratios["edit_reran_exactly_one_template"] is True
    assert len(summary["code"]["head"]) >= 7, "the commit the figures were measured on"


def test_b2_floor_mirrors_the_lock(tmp_path):
    """The floor keeps every stage's dep and out counts and the graph's edges (an out of one stage is a
    dep of another in both projects)."""
    shape = {
        "a": {"deps": ["x.py", "dir/"], "outs": ["o/a"]},
        "b": {"deps": ["x.py", "o/a"], "outs": ["o/b1", "o/b2"]},
    }
    floor = b2_rebuild.write_floor(tmp_path / "floor", shape)
    written = yaml.safe_load((floor.root / "dvc.yaml").read_text())["stages"]
    (a_name, a), (b_name, b) = written.items()
    assert a_name.endswith("-a") and b_name.endswith("-b")
    assert len(a["deps"]) == 2 and len(a["outs"]) == 1 and len(b["deps"]) == 2 and len(b["outs"]) == 2
    assert a["outs"][0] in b["deps"], "an edge of the original graph is an edge of the floor"
    assert a["deps"][0] == b["deps"][0], "a source shared by two stages stays shared"
    assert floor.repro() == [a_name, b_name]
    assert floor.repro() == []


@pytest.mark.slow
def test_b5_serving_quick(kit, tmp_path):
    """Handler and bare pipeline, warmed and interleaved at 128 px: same PNG bytes on every run; the
    environment the handler reads is restored afterwards."""
    import worker.handler

    before = {key: os.environ.get(key) for key in ("FUSELINE_VOLUME", "FUSELINE_DEFAULT_TEMPLATE")}
    worker_before = worker.handler._worker
    out = tmp_path / "b5.json"
    summary = b5_serving.run_benchmark(tmp_path, quick=True, kit_dir=kit.root, log=lambda _line: None)
    out.write_text(json.dumps(summary))
    summary = json.loads(out.read_text())  # well-formed JSON, as main() writes it

    repeats = b5_serving.QUICK["repeats"]
    assert [len(summary["runs"][name]) for name in ("handler", "bare")] == [repeats, repeats]
    assert all(run["wall_ms"] > 0 and run["cpu_ms"] > 0 for runs in summary["runs"].values() for run in runs)
    assert summary["job"]["width"] == b5_serving.QUICK["size"]
    assert summary["image"]["png_bytes_equal"] is True
    assert summary["image"]["handler_deterministic"] and summary["image"]["bare_deterministic"]
    ratios = summary["ratios"]
    assert ratios["same_image"] is True
    assert ratios["handler_vs_bare"] > 0
    assert ratios["target_met"] == (ratios["handler_vs_bare"] <= b5_serving.TARGET_RATIO)
    assert ratios["target_met_cpu"] == (ratios["handler_vs_bare_cpu"] <= b5_serving.TARGET_RATIO)
    medians = summary["median_ms"]
    assert all(medians[name]["cpu_ms"] > 0 for name in ("handler", "bare"))
    assert medians["handler"]["wall_ms"] - medians["bare"]["wall_ms"] == pytest.approx(
        ratios["overhead_ms_per_job"], abs=0.2
    )
    assert {key: os.environ.get(key) for key in before} == before
    assert worker.handler._worker is worker_before

    # Issue 17: an img2img or inpaint job peaks within 10% of a txt2img job (the components are shared),
    # while an img2img pipeline loaded again (a second copy of the weights) shows up plainly.
    memory = summary["modes_memory"]
    assert memory["components_shared"] is True
    jobs = memory["jobs"]
    assert all(jobs[mode]["held_after_bytes"] == jobs[mode]["held_before_bytes"] for mode in jobs)
    assert jobs["txt2img"]["held_before_bytes"] == jobs["inpaint"]["held_after_bytes"]  # nothing copied
    assert memory["ratios"]["img2img_vs_txt2img"] <= b5_serving.MODES_MEMORY_TARGET
    assert memory["ratios"]["inpaint_vs_txt2img"] <= b5_serving.MODES_MEMORY_TARGET
    assert memory["ratios"]["target_met"] is True
    reference = memory["reference_img2img_loaded_again"]
    assert reference["peak_above_held_bytes"] > 0.9 * jobs["txt2img"]["held_before_bytes"]
    assert memory["ratios"]["reference_vs_txt2img"] > 1.3


def test_b5_compare_images_reports_pixel_differences():
    """Different PNGs are reported with how far apart their pixels are, not only as unequal."""
    import base64
    import io

    from PIL import Image

    def png(value: int) -> str:
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4), (value, 0, 0)).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    assert b5_serving.compare_images(png(10), png(10))["png_bytes_equal"] is True
    different = b5_serving.compare_images(png(10), png(13))
    assert different["png_bytes_equal"] is False
    assert different["max_abs_diff"] == 3 and different["fraction_differing"] == pytest.approx(1 / 3)
