"""B3 (storage of templates sharing a checkpoint) at the test kit's size, so the benchmark does not rot and
its central claim is checked: files the templates share are stored once in the DVC cache and the remote."""

from __future__ import annotations

import json

import pytest

from benchmarks import b3_storage


@pytest.mark.slow
def test_b3_storage_quick(tmp_path):
    out = tmp_path / "b3.json"
    # Two templates are enough to see sharing (or its absence) and keep the real `dvc repro` short.
    b3_storage.main(["--quick", "--templates", "2", "--root", str(tmp_path), "--json-out", str(out)])
    summary = json.loads(out.read_text())
    measured, ratios = summary["measured"], summary["ratios"]
    # Every stage up to the merges ran once (DVC picks the order; verify is not a target).
    assert sorted(summary["stages_run"]) == [
        "convert@synth",
        "fetch-checkpoint@synth",
        "fetch-loras@t1",
        "fetch-loras@t2",
        "fetch-vae",
        "merge@t1",
        "merge@t2",
        "vae",
    ]
    # The LoRA touches only the UNet, and the two UNets differ (different scales): two sets of UNet objects.
    unets = measured["unet_bytes"]
    assert set(unets) == {"t1", "t2"} and all(b > 0 for b in unets.values())
    # Each UNet's weights are its own; its config.json is the same file in every template, stored once.
    assert 0.99 * sum(unets.values()) < measured["by_category"]["template UNets"] < sum(unets.values())
    # Everything in the cache is named by dvc.lock, and the push copied exactly the cache.
    assert not any(c.startswith("unreferenced") for c in measured["by_category"])
    assert measured["remote_bytes"] == measured["cache_bytes"] > 0
    assert measured["remote_objects"] == measured["cache_objects"]
    # ... object for object: the same md5s, each with the same size.
    assert measured["remote_equals_cache"] is True, (
        measured["remote_missing"],
        measured["remote_extra"],
        measured["remote_size_differs"],
    )
    # Stored once: were the non-UNet files (text encoders, VAE, ...) stored per template, the excess over
    # base + 2 x UNet would be at least one template's non-UNet bytes.
    non_unet = measured["template_folder_bytes"]["t1"] - unets["t1"]
    assert 0 <= ratios["excess_cache_bytes"] < non_unet // 10
    expected = measured["base_bytes"] + sum(unets.values())
    assert ratios["expected_bytes"] == expected
    assert ratios["cache_vs_expected"] == round(measured["cache_bytes"] / expected, 4)
    assert ratios["target_met"] == (abs(measured["cache_bytes"] / expected - 1) <= 0.02)
    assert ratios["no_dedup_vs_cache"] > 1
    assert not list(tmp_path.glob("b3-work-*")), "the work folder (project, cache, remote) is removed"


def test_compare_stores_checks_each_object_not_only_the_totals(tmp_path):
    def store(name: str, objects: dict[str, bytes]):
        for md5, data in objects.items():
            path = tmp_path / name / "files" / "md5" / md5[:2] / md5[2:]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return b3_storage._objects(tmp_path / name)

    cache = store("cache", {"aa11": b"12345", "bb22": b"1", "cc33.dir": b"[]"})
    assert b3_storage.compare_stores(
        cache, store("same", {"aa11": b"12345", "bb22": b"1", "cc33.dir": b"[]"})
    )["remote_equals_cache"]
    # Same object count and total bytes, yet one object missing and another in its place.
    swapped = store("swapped", {"aa11": b"12345", "dd44": b"1", "cc33.dir": b"[]"})
    assert (len(swapped), sum(swapped.values())) == (len(cache), sum(cache.values()))
    result = b3_storage.compare_stores(cache, swapped)
    assert result["remote_equals_cache"] is False
    assert (result["remote_missing"], result["remote_extra"]) == (["bb22"], ["dd44"])
    # An object of the right name with the wrong size (a truncated upload).
    truncated = store("truncated", {"aa11": b"1234", "bb22": b"1", "cc33.dir": b"[]"})
    result = b3_storage.compare_stores(cache, truncated)
    assert result["remote_equals_cache"] is False and result["remote_size_differs"] == ["aa11"]
