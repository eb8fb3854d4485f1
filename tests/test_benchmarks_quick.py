"""The benchmarks' --quick modes, so they do not rot, plus the full-size layout claims that need no disk.

The benchmarks themselves (docs/benchmarks.md) run at SDXL scale outside `make test`; here every code path
runs at the test kit's tiny size, and what the full-size generator would write is checked on meta models.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from benchmarks import b1_merge, gpu, synth_sdxl


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    report = synth_sdxl.generate(root, quick=True, seed=0, log=lambda _line: None)
    return synth_sdxl.synth_paths(root), report


def test_full_size_layout_matches_sdxl():
    """What the generator writes at full size: SDXL's parameter counts and ~6.9 GB of fp16, per the
    component configs kept in the repo (meta models: no memory, no disk)."""
    models = synth_sdxl.meta_models(synth_sdxl.SDXL_CONFIG_DIR)
    params = {c: sum(t.numel() for t in m.state_dict().values()) for c, m in models.items()}
    assert params == {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }
    sizes = {c: synth_sdxl.safetensors_layout(synth_sdxl.tensor_shapes(m))[2] for c, m in models.items()}
    assert 6.9e9 < sum(sizes.values()) < 7.0e9
    # Every diffusers tensor has an SGM name (the kit's key map raises on any it cannot place).
    sgm_names = set()
    metas = {c: m.state_dict() for c, m in models.items()}
    for component, keys, convert in synth_sdxl.sgm_groups(models):
        sgm_names |= set(convert({k: metas[component][k] for k in keys}))
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in sgm_names
    assert "model.diffusion_model.output_blocks.8.0.skip_connection.weight" in sgm_names


def test_synth_tensor_scale_and_determinism():
    weight = synth_sdxl.synth_tensor(3, "unet", "a.weight", (640, 320, 3, 3))
    assert weight.dtype == torch.float16
    assert weight.float().std().item() == pytest.approx(1 / math.sqrt(320 * 9), rel=0.05)
    assert torch.equal(weight, synth_sdxl.synth_tensor(3, "unet", "a.weight", (640, 320, 3, 3)))
    assert not torch.equal(weight, synth_sdxl.synth_tensor(4, "unet", "a.weight", (640, 320, 3, 3)))
    assert torch.equal(
        synth_sdxl.synth_tensor(3, "unet", "norm.weight", (8,)), torch.ones(8, dtype=torch.float16)
    )
    assert torch.equal(
        synth_sdxl.synth_tensor(3, "unet", "norm.bias", (8,)), torch.zeros(8, dtype=torch.float16)
    )


def test_synth_quick_loads_in_diffusers_both_layouts(synth):
    """The diffusers folder and the single file hold the same tensors, as diffusers itself reads them."""
    from diffusers import StableDiffusionXLPipeline

    paths, report = synth
    assert json.loads(paths.marker.read_text()) == report
    assert synth_sdxl.is_complete(paths, quick=True, seed=0)
    assert not synth_sdxl.is_complete(paths, quick=True, seed=1)
    folder = StableDiffusionXLPipeline.from_pretrained(paths.base_dir, local_files_only=True)
    single = StableDiffusionXLPipeline.from_single_file(
        str(paths.single_file), config=str(paths.config_dir), local_files_only=True
    )
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(folder, component).state_dict(), getattr(single, component).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), component
    assert report["params_total"] == sum(report["params"].values())


def test_synth_quick_loras_are_kohya_and_place_fully(synth):
    """Both LoRAs use kohya names on all three components, and fuseline's reader places every key."""
    from stages.lora import LoraInput, read_lora
    from stages.merge import read_base_layout

    paths, _ = synth
    shapes, unet_config = read_base_layout(paths.base_dir)
    for name, path in paths.loras.items():
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
        prefixes = {key.split("_", 2)[1] for key in keys}
        assert prefixes == {"unet", "te1", "te2"}
        assert any("_resnets_" in k or "_in_layers_" in k for k in keys), "ResNet convs are targeted"
        loaded = read_lora(LoraInput(path=path, scale=1.0, name=name), shapes, unet_config)
        assert sum(loaded.placed_keys.values()) == len(keys)


@pytest.mark.slow
def test_b1_merge_quick(synth):
    """All three contenders run as subprocesses; fuseline's export equals the diffusers path's."""
    paths, _ = synth
    summary = b1_merge.run_benchmark(
        paths.root, quick=True, contenders=list(b1_merge.CONTENDERS), profile=False
    )
    results = summary["results"]
    for contender in b1_merge.CONTENDERS:
        assert results[contender]["returncode"] == 0, results[contender].get("error")
        assert results[contender]["wall_s"] > 0
        assert results[contender]["peak_rss_bytes"] > 0
    assert results["fuseline"]["fused_tensors"]["unet"] > 0
    comparison = summary["fuseline_vs_naive_output"]
    assert comparison["unmatched"] == []
    assert comparison["tensors_compared"] > 1000
    assert comparison["max_ulp_diff"] <= 1
    assert set(summary["ratios"]) >= {
        "fuseline_vs_cp_wall",
        "fuseline_rss_target_met",
        "naive_vs_fuseline_wall",
    }
    assert not (paths.root / "b1-out").exists()


@pytest.mark.slow
def test_gpu_quick(tmp_path, monkeypatch):
    """benchmarks.gpu end to end on the CPU: every section runs, images are finite, speed options agree."""
    monkeypatch.setenv("OUT", str(tmp_path))
    summary = gpu.main(["--quick"])
    sections = summary["sections"]
    for name in gpu.SECTIONS:
        assert sections[name]["status"] == "ok", sections[name].get("traceback")
    assert sections["disk_load"]["weights_identical"]
    read, first = sections["disk_load"]["volume_read"], sections["disk_load"]["first_image"]
    assert read["bytes"] == sections["disk_load"]["folder_bytes"] and read["mb_per_s"] > 0
    assert first["image_finite"] and first["read_floor_s"] > 0
    assert 0 < first["since_spawn_s"]["imported_at"] < first["since_spawn_s"]["image_at"] <= first["wall_s"]
    batch = sections["batch"]["by_num_images"]
    assert [batch[n]["images"] for n in ("1", "2", "4")] == [1, 2, 4]
    assert all(row["finite"] and row["images_per_gpu_second"] > 0 for row in batch.values())
    # The CPU has no fp8 matmuls: the section records the worker's refusal, with its code.
    assert sections["fp8"]["available"] is False
    assert sections["fp8"]["refused"]["code"] == "CONFIG_INVALID"
    assert "remove fp8 from FUSELINE_SPEED" in sections["fp8"]["refused"]["message"]
    assert sections["worker"]["available"], sections["worker"].get("why")
    assert sections["flops"]["unet_flops_per_step"] > 0
    assert sections["matmul"]["bf16_tflops"] > 0
    assert summary["ratios"]["all_images_finite"]
    assert summary["ratios"]["speed_options_unchanged"] == {
        "channels_last": True,
        "fuse_qkv": True,
        "channels_last+compile": True,
        "fuse_qkv+channels_last+compile_max_autotune": True,
    }
    assert "fraction_of_bf16_matmul" in summary["variants"]["plain"]
    assert json.loads((tmp_path / "gpu.json").read_text())["ratios"] == summary["ratios"]


@pytest.mark.slow
@pytest.mark.s3
def test_b4_sync_quick(tmp_path):
    """B4 end to end at kit size: dvc push to SeaweedFS, then fuseline's sync and s5cmd fetch the same
    objects, each twice in a fresh subprocess; the JSON names both, equal bytes, and the ratio."""
    from benchmarks import b4_sync

    out = tmp_path / "b4.json"
    b4_sync.main(["--quick", "--root", str(tmp_path), "--repeats", "2", "--json-out", str(out)])
    summary = json.loads(out.read_text())
    results = summary["results"]
    assert set(results) == {"fuseline", "s5cmd"}
    for contender in ("fuseline", "s5cmd"):
        assert len(results[contender]) == 2
        for run in results[contender]:
            assert run["returncode"] == 0, run.get("error")
            assert run["wall_s"] > 0 and run["mb_per_s"] > 0
    byte_counts = {run["bytes"] for runs in results.values() for run in runs}
    # Every object of the folder (plus its .dir listing), fetched whole by both, and nothing else.
    assert len(byte_counts) == 1 and byte_counts.pop() > summary["model_bytes"] // 2
    assert {run["objects"] for runs in results.values() for run in runs} == {results["s5cmd"][0]["objects"]}
    ratios = summary["ratios"]
    assert len(ratios["s5cmd_vs_fuseline_wall_per_run"]) == 2
    assert ratios["s5cmd_vs_fuseline_wall_best"] > 0
    assert ratios["target_met"] == (ratios["s5cmd_vs_fuseline_wall_best"] >= 0.9)
    assert ratios["same_bytes"] is True
    # The verify floor, measured in the same run: md5 of s5cmd's bytes over all cores, every digest checked.
    for run in results["s5cmd"]:
        assert run["md5"]["returncode"] == 0 and run["md5"]["mismatches"] == 0
        assert run["md5"]["files"] == run["objects"] and run["md5"]["wall_s"] > 0
    floors = ratios["verify_floor_per_run_s"]
    assert floors == [round(max(r["wall_s"], r["md5"]["cpu_floor_s"]), 3) for r in results["s5cmd"]]
    assert all(r["md5"]["memory_rate_mb_per_s"] > 0 for r in results["s5cmd"])
    assert ratios["verify_floor_target_met"] == (ratios["fuseline_vs_verify_floor_best"] <= 1.1)
    assert ratios["s5cmd_then_md5_vs_fuseline_wall_best"] > 0
    for runs in results.values():
        for run in runs:
            assert run["server_cpu_s"] >= 0 and run["cpu_bound_wall_s"] > 0
    assert summary["code"]["head"]
    assert not list(tmp_path.glob("b4-work-*")), "the work folder (pushed project, destinations) is removed"


@pytest.mark.slow
@pytest.mark.s3
def test_b7_disk_quick(tmp_path):
    """B7 at kit size with the project's default cache type (hard links) and reflink: a cold build from
    s3:// sources into the download cache, sampled; the edit rebuild works over DVC's read-only links and
    leaves the status clean; reflink on a filesystem without it fails as DVC's own error, recorded."""
    from benchmarks import b7_disk

    out = tmp_path / "b7.json"
    b7_disk.main(
        ["--quick", "--root", str(tmp_path), "--cache-types", "hardlink,reflink", "--json-out", str(out)]
    )
    summary = json.loads(out.read_text())
    hardlink = summary["results"]["hardlink"]
    assert "error" not in hardlink, hardlink.get("error")
    assert hardlink["stages_run"] == [
        "fetch-checkpoint@synth", "fetch-loras@t1", "fetch-vae", "convert@synth", "vae", "merge@t1"
    ]  # fmt: skip
    assert hardlink["samples"] > 1 and hardlink["peak_bytes"] >= hardlink["final_bytes"] > 0
    split = hardlink["peak_split_bytes"]
    # The checkpoint was downloaded into the build's own download cache, and outputs reached the DVC cache.
    assert split["download-cache"] >= summary["checkpoint_bytes"] and split["dvc-cache"] > 0
    assert sum(split.values()) == hardlink["peak_bytes"]
    assert hardlink["model_files_linked"] > 0 and hardlink["model_files_read_only"] > 0
    assert "merge@t1" in hardlink["edit_stages_run"] and hardlink["status_clean"] is True
    assert hardlink["peak_vs_checkpoint_plus_model"] == round(
        hardlink["peak_bytes"] / (summary["checkpoint_bytes"] + hardlink["model_bytes"]), 3
    )
    if summary["filesystem"] not in ("btrfs", "xfs"):
        assert "No possible cache link types" in summary["results"]["reflink"]["error"]
    assert summary["code"]["head"]
    assert not list(tmp_path.glob("b7-*")), "every build folder is removed"
