"""`make demo` (testkit.demo) on one template: real dvc repro, publish, sync, worker API; then a rerun that
reuses everything; and the failure path (the step is named, the log kept, the worker stopped)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from fuseline.core.catalog.loading import load_catalog
from fuseline.core.release import Release
from testkit import demo

TEMPLATE = "dusk"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_catalog_is_valid_and_pins_every_file(kit, tmp_path: Path) -> None:
    catalog = demo.demo_catalog(kit, sorted(demo.TEMPLATES))
    path = tmp_path / "templates.json"
    path.write_text(json.dumps(catalog))
    parsed = load_catalog(path)
    assert sorted(parsed.templates) == sorted(demo.TEMPLATES)
    loras = {t: [(x.source, x.scale) for x in parsed.templates[t].loras] for t in parsed.templates}
    assert len(set(map(tuple, loras.values()))) == len(loras), "the demo templates must differ in LoRAs"
    checkpoint = catalog["checkpoints"]["tiny-sdxl"]
    assert checkpoint["sha256"] == hashlib.sha256(kit.single_file.read_bytes()).hexdigest()
    for template in catalog["templates"].values():
        for lora in template["loras"]:
            file = Path(lora["source"].removeprefix("file:"))
            assert lora["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()


def test_a_failing_step_is_named_with_its_log(tmp_path: Path) -> None:
    runner = demo.Demo(tmp_path, [TEMPLATE])
    with pytest.raises(demo.DemoFailed) as caught, runner.step("publish", "something that breaks"):
        raise ValueError("remote on fire")
    failure = caught.value
    assert (failure.step, failure.message) == ("publish", "remote on fire")
    assert failure.log == tmp_path / "logs" / "publish.log"
    assert "ValueError: remote on fire" in failure.log.read_text()
    assert "demo step 'publish' failed: remote on fire (log: " in str(failure)


@pytest.mark.slow
def test_a_worker_failing_its_self_check_stops_the_demo_with_its_log(tmp_path: Path) -> None:
    # An empty volume: the worker's start self-check finds no default template and the worker exits
    # before serving (it would otherwise take jobs it cannot serve); the demo names the step and the log.
    runner = demo.Demo(tmp_path, [TEMPLATE])
    (tmp_path / "volume" / "models").mkdir(parents=True)
    with pytest.raises(demo.DemoFailed) as caught:
        runner.serve({})
    assert caught.value.step == "serve"
    assert caught.value.log == tmp_path / "logs" / "worker.log"
    assert "[UNKNOWN_TEMPLATE]" in caught.value.message and TEMPLATE in caught.value.message
    assert not (tmp_path / f"answer-{TEMPLATE}.json").exists()
    log = caught.value.log.read_text()
    assert "self-check failed" in log and "Uvicorn running" not in log
    assert runner.result.worker_pid is None or not _alive(runner.result.worker_pid)


@pytest.mark.slow
def test_demo_end_to_end_then_rerun_reuses_everything(kit, tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    first = demo.main(out, [TEMPLATE], sources=kit.root)
    project = out / "project"

    # The real pipeline ran every stage of the template once.
    assert {"convert@tiny-sdxl", "vae", f"merge@{TEMPLATE}", f"verify@{TEMPLATE}"} <= set(first.stages_run)
    assert len(first.stages_run) == len(set(first.stages_run))
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = lock["stages"][f"merge@{TEMPLATE}"]["outs"]
    model_out = next(o for o in outs if o["path"] == f"artifacts/models/{TEMPLATE}")

    # Published to the project's embedded local remote: the release names the folder dvc.lock built.
    assert first.published
    release_path = project / ".dvc-remote" / "releases" / "main.json"
    assert Path(first.release_path) == release_path
    release = Release.from_json(release_path.read_bytes())
    entry = release.templates[TEMPLATE]
    assert entry.dir_md5 == model_out["md5"]

    # Synced onto the scratch volume by the worker's own sync code.
    assert first.sync_status == {TEMPLATE: "synced"}
    served = json.loads((out / "volume" / "models" / TEMPLATE / "fuseline.json").read_text())
    assert served["spec_hash"] == entry.spec_hash

    # The worker API answered a real request with a PNG from that model, and was stopped.
    answer = json.loads((out / f"answer-{TEMPLATE}.json").read_text())
    assert answer["status"] == "COMPLETED"
    output = answer["output"]
    assert output["template"]["id"] == TEMPLATE and output["template"]["model_hash"] == entry.spec_hash
    # Steps and CFG come from the template's defaults in the catalog.
    defaults = demo.TEMPLATES[TEMPLATE]["defaults"]
    assert (output["parameters"]["steps"], output["parameters"]["guidance_scale"]) == (
        defaults["steps"],
        defaults["guidance_scale"],
    )
    image = Image.open(io.BytesIO((out / f"image-{TEMPLATE}.png").read_bytes()))
    assert (image.format, image.size) == ("PNG", (demo.SIZE, demo.SIZE))
    assert first.worker_pid is not None and not _alive(first.worker_pid)
    # The worker's own start-up sync read the same release and found the volume already at it.
    # fuseline's records are one JSON object per line (not a terminal; runpod and uvicorn print their own
    # plain lines in between): the sync.done event says so.
    lines = (out / "logs" / "worker.log").read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    (sync_done,) = [e for e in events if e["event"] == "sync.done"]
    assert any(TEMPLATE in line and "present" in line for line in sync_done["message"].splitlines())
    (start,) = [e for e in events if e["event"] == "worker.start"]
    assert start["self_check"]["ok"], start

    # The verify stage's preview is copied next to the answer.
    preview = project / "artifacts" / "verify" / TEMPLATE / "preview.png"
    assert (out / f"preview-{TEMPLATE}.png").read_bytes() == preview.read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == [
        "sources",
        "project",
        "build",
        "publish",
        "sync",
        "serve",
        "previews",
    ]

    # A second run reuses everything: nothing rebuilt, republished or re-fetched; the same image.
    first_image = (out / f"image-{TEMPLATE}.png").read_bytes()
    history = sorted((project / ".dvc-remote" / "releases" / "main").iterdir())
    second = demo.main(out, [TEMPLATE], sources=kit.root)
    assert second.stages_run == []
    assert not second.published and second.release_created == first.release_created
    assert sorted((project / ".dvc-remote" / "releases" / "main").iterdir()) == history
    assert second.sync_status == {TEMPLATE: "present"}
    assert (out / f"image-{TEMPLATE}.png").read_bytes() == first_image
    assert second.worker_pid != first.worker_pid and not _alive(second.worker_pid)
