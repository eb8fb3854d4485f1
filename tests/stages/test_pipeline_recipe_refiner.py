"""The real `dvc repro` over a catalog with a recipe checkpoint and a refiner, then the look before
shipping: `dvc plots diff main` renders every template's verify preview before and after a catalog change
in one HTML page, checked in a headless Chromium screenshot (Debian's `chromium` package: .ci/run installs
it; without it the test fails saying so)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fuseline.core.manifest import ModelManifest, RefinerManifest
from fuseline.core.release import Release
from testkit.project import DvcProject, make_dvc_project

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)
TEMPLATES = ("plain", "mixed")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "Chromium is not installed: the preview page is checked in a headless browser. Install Debian's "
            "package (`sudo make test-deps`, i.e. `apt-get install -y chromium`; .ci/run does) and run the "
            "test again"
        )
    return found


def catalog(kit, refiner, noisy: Path) -> dict:
    return {
        "version": 1,
        "vae": {"source": f"file:{kit.vae_dir}"},
        "checkpoints": {
            "tiny": {"source": f"file:{kit.single_file}", "config": f"file:{kit.config_dir}"},
            "mix": {
                "recipe": {
                    "method": "weighted_sum",
                    "a": {"source": f"file:{kit.single_file}"},
                    "b": {"source": f"file:{noisy}"},
                    "alpha": 0.3,
                },
                "config": f"file:{kit.config_dir}",
            },
            "ref": {"source": f"file:{refiner.single_file}", "config": f"file:{refiner.config_dir}"},
        },
        "templates": {
            "plain": {
                "checkpoint": "tiny",
                "loras": [{"source": f"file:{kit.loras['kohya_sgm']}", "scale": 0.8}],
            },
            "mixed": {
                "checkpoint": "mix",
                "refiner": "ref",
                "defaults": {"refiner": {"switch_at": 0.8}, "scheduler": "DPM++ 2M SDE Karras"},
            },
        },
    }


def git(project: DvcProject, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=project.root, capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def project(kit, tmp_path_factory: pytest.TempPathFactory) -> DvcProject:
    from testkit.refiner import build_refiner

    root = tmp_path_factory.mktemp("recipe-refiner")
    refiner = build_refiner(root / "refiner-kit")
    state = load_file(kit.single_file)
    generator = torch.Generator().manual_seed(3)
    noisy = root / "noisy.safetensors"
    save_file(
        {k: (v + 0.05 * torch.randn(v.shape, generator=generator)).half() for k, v in state.items()}, noisy
    )
    project = make_dvc_project(
        root / "project",
        catalog(kit, refiner, noisy),
        params={"merge": {"shard_size_mb": 0.5}, "verify": {"steps": 2, "width": 64, "height": 64}},
    )
    # `dvc plots diff main` compares with a git revision: the project becomes a git repository.
    git(project, "init", "-q", "-b", "main")
    git(project, "config", "user.email", "test@example.com")
    git(project, "config", "user.name", "test")
    project.dvc("config", "core.no_scm", "false")
    (project.root / ".gitignore").write_text("/artifacts/\n")
    project.first_run = project.repro()  # type: ignore[attr-defined]
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "first build")
    return project


def test_recipe_and_refiner_build_through_dvc(project: DvcProject) -> None:
    ran = set(project.first_run)  # type: ignore[attr-defined]
    assert {"convert@mix", "convert@ref", "merge@mixed", "verify@mixed", "verify@plain"} <= ran
    root = project.root / "artifacts"
    # The recipe's receipt lists its inputs; its output is a base folder in fp32.
    receipt = json.loads((root / "sources" / "checkpoints" / "mix.json").read_text())
    assert [e["where"] for e in receipt["sources"]][:2] == [
        "checkpoints.mix.recipe.a",
        "checkpoints.mix.recipe.b",
    ]
    unet = load_file(next((root / "base" / "mix" / "unet").glob("*.safetensors")))
    assert {t.dtype for t in unet.values()} == {torch.float32}
    # The refiner's folder is its fp16 export with a refiner manifest; the template names it.
    assert RefinerManifest.read(root / "base" / "ref").refiner == "ref"
    manifest = ModelManifest.read(root / "models" / "mixed")
    assert manifest.refiner == "ref" and manifest.checkpoint.source.startswith("recipe:")
    assert manifest.checkpoint.recipe["alpha"] == 0.3
    assert manifest.defaults.scheduler == "dpmpp_2m_sde_karras"


def test_release_entry_of_a_refiner_template(project: DvcProject) -> None:
    from fuseline.publish.project import built_refiners, built_templates, released_refiner, released_template

    templates = {t: released_template(project.root, b) for t, b in built_templates(project.root).items()}
    assert templates["mixed"].refiner == "ref" and templates["plain"].refiner is None
    refiners = {
        r: released_refiner(project.root, b) for r, b in built_refiners(project.root, ["ref"]).items()
    }
    release = Release(channel="main", created="20260101T000000Z", templates=templates, refiners=refiners)
    assert Release.from_json(release.to_json()).refiners["ref"].path == "artifacts/base/ref"
    with pytest.raises(ValueError, match="lacks"):
        Release(channel="main", created="20260101T000000Z", templates=templates)


def test_publish_then_sync_brings_the_refiner_beside_its_template(
    project: DvcProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fuseline publish` puts the refiner's folder in the release; the worker's sync brings it to
    `refiners/<id>` beside the template that names it, and only for that template."""
    from fuseline.publish.releases import publish
    from worker.sync.templates import sync_templates

    for name, value in project.env.items():
        if name.startswith("AWS_") or name in ("PATH", "DVC_NO_ANALYTICS"):
            monkeypatch.setenv(name, value)
    remote = tmp_path / "remote"
    project.dvc("remote", "add", "-f", "publish-test", str(remote))
    result = publish(project.root, remote_name="publish-test", channel="main")
    release = result.release
    assert release.templates["mixed"].refiner == "ref" and set(release.refiners) == {"ref"}
    assert release.refiners["ref"].path == "artifacts/base/ref"

    volume = tmp_path / "volume"
    report = sync_templates(str(remote / "releases" / "main.json"), volume, ["mixed"])
    assert report.ok, report.lines()
    assert [(r.template, r.status) for r in report.refiners] == [("ref", "synced")]
    assert RefinerManifest.read(volume / "refiners" / "ref").refiner == "ref"
    assert ModelManifest.read(volume / "models" / "mixed").refiner == "ref"
    alone = sync_templates(str(remote / "releases" / "main.json"), tmp_path / "plain-only", ["plain"])
    assert alone.ok and alone.refiners == [] and not (tmp_path / "plain-only" / "refiners" / "ref").exists()


def test_plots_diff_shows_every_preview_before_and_after_in_one_page(project: DvcProject) -> None:
    before = {t: (project.root / "artifacts" / "verify" / t / "preview.png").read_bytes() for t in TEMPLATES}
    project.edit_catalog(lambda c: c["templates"]["plain"]["loras"][0].update(scale=-1.5))
    ran = project.repro()
    assert set(ran) == {"fetch-loras@plain", "merge@plain", "verify@plain"}
    after = (project.root / "artifacts" / "verify" / "plain" / "preview.png").read_bytes()
    assert after != before["plain"]

    out = project.root / "preview-diff"
    project.dvc("plots", "diff", "main", "--out", str(out))
    page = (out / "index.html").read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', page)
    # Each template's preview, from main and from the workspace: four images in one page.
    for template in TEMPLATES:
        shown = [src for src in images if f"verify_{template}_preview" in src.replace("/", "_")]
        assert len(shown) == 2, (template, images)
    assert all((out / src).is_file() for src in images)

    shot = project.root / "preview.png"
    profile = project.root / "chromium-profile"
    done = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
         "--window-size=1280,2000", (out / "index.html").as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = numpy.asarray(Image.open(shot).convert("RGB"), dtype=numpy.float64)
    assert pixels.std() > 5, "the screenshot is blank"
    # The previews are colourful noise on DVC's white page: count the strongly coloured pixels (a page of
    # text and broken-image icons has next to none).
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    assert (saturation > 40).mean() > 0.002, f"no preview visible ({(saturation > 40).mean():.4%} coloured)"
