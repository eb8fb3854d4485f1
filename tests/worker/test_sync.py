"""Worker model sync against a real DVC remote (local folder and SeaweedFS S3 behind a recording proxy)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

# Before the import below: its asserts (assert_complete, ...) get pytest's detailed messages too.
pytest.register_assert_rewrite("tests.worker.sync_fixtures")

from fuseline.core.errors import ConfigInvalid  # noqa: E402
from fuseline.core.release import object_key  # noqa: E402
from tests.worker.sync_fixtures import (  # noqa: E402
    BIG,
    PART,
    PYTHON,
    REPO,
    DvcRemote,
    assert_complete,
    aws_env,
    clone_bucket,
    folder_state,
    put_release,
    sync_cmd,
    sync_statuses,
    write_release,
)
from worker.settings import load_settings  # noqa: E402
from worker.sync.cli import main  # noqa: E402
from worker.sync.errors import ListingUnsafe, LockTimeout  # noqa: E402
from worker.sync.locks import VolumeLock  # noqa: E402
from worker.sync.templates import sync_templates  # noqa: E402
from worker.sync.volume import Volume, leased, parse_listing  # noqa: E402

pytestmark = pytest.mark.s3
pytest_plugins = ["tests.worker.sync_fixtures"]


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return env | extra | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


# ----------------------------------------------------------------------------------- basic + warm


def test_local_remote_sync_stores_shared_files_once_and_links(dvc_remote: DvcRemote, tmp_path: Path) -> None:
    release = write_release(
        dvc_remote.local, "main", {"tpl-a": dvc_remote.a1.released, "tpl-b": dvc_remote.b1.released}
    )
    report = sync_templates(release, tmp_path, part_size=PART)
    assert report.ok, report.lines()
    assert_complete(tmp_path, dvc_remote.a1)
    assert_complete(tmp_path, dvc_remote.b1)
    # The shared text encoder is one inode: one store object, linked into both folders.
    te = "text_encoder/model.fp16.safetensors"
    a, b = (tmp_path / "models" / t / te for t in ("tpl-a", "tpl-b"))
    assert a.stat().st_ino == b.stat().st_ino
    assert a.stat().st_nlink == 3  # store + two folders
    by_name = {t.template: t for t in report.templates}
    assert by_name["tpl-b"].objects_reused >= 3  # text encoder, VAE, scheduler config came from tpl-a
    # Second run: marker trusted, nothing fetched.
    again = sync_templates(release, tmp_path)
    assert [t.status for t in again.templates] == ["present", "present"]


def test_cli_reads_environment(dvc_remote: DvcRemote, tmp_path: Path) -> None:
    release = write_release(dvc_remote.local, "cli", {"tpl-b": dvc_remote.b1.released})
    env = _env({"FUSELINE_RELEASE": release, "FUSELINE_VOLUME": str(tmp_path)})
    done = subprocess.run([PYTHON, "-m", "worker.sync"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sync_statuses(done.stderr) == {"tpl-b": "synced"}
    assert_complete(tmp_path, dvc_remote.b1)
    assert main(["--release", release, "--volume", str(tmp_path), "--template", "nope"]) == 2


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FUSELINE_SYNC_WORKERS", "eight", "FUSELINE_SYNC_WORKERS='eight' is not an integer"),
        ("FUSELINE_SYNC_PART_SIZE", "0", "FUSELINE_SYNC_PART_SIZE=0 must be at least 1"),
        ("FUSELINE_SYNC_LOCK_STALE", "soon", "FUSELINE_SYNC_LOCK_STALE='soon' is not a number"),
        ("FUSELINE_SYNC_OBJECT_GRACE", "-1", "FUSELINE_SYNC_OBJECT_GRACE='-1' must be at least 0"),
    ],
)
def test_a_bad_sync_setting_is_config_invalid_never_a_traceback(
    dvc_remote: DvcRemote, tmp_path: Path, monkeypatch, variable: str, value: str, expected: str
) -> None:
    # Issue 15: FUSELINE_SYNC_WORKERS=eight escaped sync_templates (documented "never raises") as a
    # ValueError traceback at worker start.
    release = write_release(dvc_remote.local, "bad-env", {"tpl-b": dvc_remote.b1.released})
    monkeypatch.setenv(variable, value)
    report = sync_templates(release, tmp_path / "volume")
    assert not report.ok and report.error.startswith("[CONFIG_INVALID] ") and expected in report.error
    assert [(t.template, t.status) for t in report.templates] == []  # nothing fetched, nothing on the volume
    # The CLI (its own settings) and the worker's start (WorkerSettings) refuse it the same way.
    env = _env({variable: value, "FUSELINE_RELEASE": release, "FUSELINE_VOLUME": str(tmp_path / "cli")})
    done = subprocess.run([PYTHON, "-m", "worker.sync"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "[CONFIG_INVALID]" in done.stderr and expected in done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(ConfigInvalid, match=re.escape(expected)):
        load_settings({variable: value, "FUSELINE_RELEASE": release})


def test_warm_start_ten_templates_under_a_second(dvc_remote: DvcRemote, proxy, tmp_path: Path) -> None:
    templates = {f"t{i}": dvc_remote.a1.released for i in range(10)}
    release = put_release(proxy.s3, dvc_remote.bucket, "warm", templates)
    with aws_env(proxy.env()):
        assert sync_templates(release, tmp_path, part_size=PART).ok
        proxy.clear()
        start = time.perf_counter()
        report = sync_templates(release, tmp_path)
        elapsed = time.perf_counter() - start
    assert report.ok and {t.status for t in report.templates} == {"present"}
    assert elapsed < 1.0, f"warm check took {elapsed:.2f} s"
    assert [(s.method, s.path.rsplit("/", 1)[-1]) for s in proxy.seen] == [("GET", "warm.json")]


def test_verify_rehashes_and_repairs_a_damaged_file(dvc_remote: DvcRemote, tmp_path: Path) -> None:
    release = write_release(dvc_remote.local, "verify", {"tpl-b": dvc_remote.b1.released})
    assert sync_templates(release, tmp_path, part_size=PART).ok
    vae = tmp_path / "models/tpl-b/vae/diffusion_pytorch_model.fp16.safetensors"
    os.chmod(vae, 0o644)
    with vae.open("r+b") as f:  # bit rot on the volume: same size, other bytes
        f.write(b"\0" * 16)
    assert sync_templates(release, tmp_path).templates[0].status == "present"  # warm start trusts the marker
    report = sync_templates(release, tmp_path, verify=True, part_size=PART)
    assert report.templates[0].status == "repaired", report.lines()
    assert_complete(tmp_path, dvc_remote.b1)
    assert sync_templates(release, tmp_path, verify=True).templates[0].status == "verified"


# ------------------------------------------------------------------------------------ concurrency


@pytest.mark.slow
def test_eight_processes_fetch_each_object_once(dvc_remote: DvcRemote, proxy, tmp_path: Path) -> None:
    release = put_release(proxy.s3, dvc_remote.bucket, "eight", {"tpl-a": dvc_remote.a1.released})
    env = _env(proxy.env() | {"FUSELINE_SYNC_PART_SIZE": str(PART)})
    procs = [
        subprocess.Popen(sync_cmd(release, tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(8)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [o[1].decode() for o in outs]
    statuses = sorted(sync_statuses(o[1].decode())["tpl-a"] for o in outs)
    assert statuses == ["present"] * 7 + ["synced"]
    assert_complete(tmp_path, dvc_remote.a1)
    # Counted at the proxy: every (object, range) fetched exactly once, and all bytes exactly once.
    for md5 in {md5 for _, md5 in dvc_remote.a1.files.values()} | {dvc_remote.a1.dir_md5}:
        size = next((s for s, m in dvc_remote.a1.files.values() if m == md5), None)
        gets = proxy.gets(md5)
        if size == 0:
            assert gets == []  # the empty file needs no request
            continue
        ranges = [g.range for g in gets]
        assert len(ranges) == len(set(ranges)), f"{md5} fetched more than once: {ranges}"
        if size is not None:
            assert sum(g.sent for g in gets) == size
    big = proxy.gets(dvc_remote.a1.big_md5)
    assert len(big) == -(-dvc_remote.a1.files["unet/diffusion_pytorch_model.fp16.safetensors"][0] // PART)


def test_lock_excludes_and_is_taken_over_when_silent(tmp_path: Path) -> None:
    path = tmp_path / "t.lock"
    holder = VolumeLock(path, stale_after=1.0).acquire()
    with pytest.raises(LockTimeout, match="still held"):
        VolumeLock(path, stale_after=1.0, timeout=1.5).acquire()  # heartbeat keeps it fresh
    holder._stop.set()  # the holder goes silent (as a killed process would)
    holder._thread.join()
    taker = VolumeLock(path, stale_after=1.0, timeout=10).acquire()
    assert taker.took_over
    with pytest.raises(Exception, match="LOCK_LOST"):
        holder.check()  # the silent holder must not commit
    taker.release()
    assert not path.exists()


def test_kill_mid_object_resumes_and_readers_never_see_a_partial_folder(
    dvc_remote: DvcRemote, proxy, tmp_path: Path
) -> None:
    release = put_release(proxy.s3, dvc_remote.bucket, "kill", {"tpl-a": dvc_remote.a1.released})
    env = _env(proxy.env() | {"FUSELINE_SYNC_PART_SIZE": str(PART), "FUSELINE_SYNC_WORKERS": "2"})
    link = tmp_path / "models" / "tpl-a"
    torn: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if os.path.lexists(link):
                try:
                    state = folder_state(link)
                except OSError as err:
                    torn.append(f"error reading: {err}")
                    continue
                if state != dvc_remote.a1.files:
                    torn.append(f"saw {len(state)} files")
            time.sleep(0.005)

    poller = threading.Thread(target=reader)
    poller.start()
    try:
        proxy.delay_per_64k = 0.03  # the 3 MB object now takes ~1.5 s per worker
        first = subprocess.Popen(sync_cmd(release, tmp_path), env=env)
        journal = tmp_path / ".fuseline" / "partial" / f"{dvc_remote.a1.big_md5}.parts"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.exists() and len(journal.read_text().splitlines()) >= 4:  # header + 3 parts
                break
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        done_before = {int(x) for x in journal.read_text().split("\n")[1:-1]}  # newline-ended lines
        assert 3 <= len(done_before) < -(-BIG // PART) and not os.path.lexists(link)
        ranges_before = {g.range for g in proxy.gets(dvc_remote.a1.big_md5)}
        proxy.clear()
        proxy.delay_per_64k = 0.0
        # The killed holder left its lock behind: the next run takes it over once silent for 1 s.
        second = subprocess.run(
            sync_cmd(release, tmp_path),
            env=env | {"FUSELINE_SYNC_LOCK_STALE": "1"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 0, second.stderr
    finally:
        stop.set()
        poller.join()
    assert torn == []
    assert_complete(tmp_path, dvc_remote.a1)
    resumed = {g.range for g in proxy.gets(dvc_remote.a1.big_md5)}
    finished = {f"bytes={i * PART}-{min((i + 1) * PART, BIG) - 1}" for i in done_before}
    assert finished <= ranges_before and not (finished & resumed), "finished parts were fetched again"
    assert len(resumed) == -(-BIG // PART) - len(done_before)


def test_release_update_switches_atomically_while_old_is_read(dvc_remote: DvcRemote, tmp_path: Path) -> None:
    v1 = write_release(dvc_remote.local, "upd", {"tpl-a": dvc_remote.a1.released})
    assert sync_templates(v1, tmp_path, part_size=PART).ok
    reader_code = (
        "import sys, hashlib, pathlib\n"
        "from worker.sync.volume import leased\n"
        f"with leased({str(tmp_path)!r}, 'tpl-a') as folder:\n"
        "    print(folder, flush=True)\n"
        "    sys.stdin.readline()\n"
        "    for p in sorted(pathlib.Path(folder).rglob('*')):\n"
        "        if p.is_file() and not p.name.startswith('.'):\n"
        "            print(p.relative_to(folder), hashlib.md5(p.read_bytes()).hexdigest(), flush=True)\n"
    )
    reader = subprocess.Popen(
        [PYTHON, "-c", reader_code], env=_env({}), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    old_folder = Path(reader.stdout.readline().strip())
    v2 = write_release(dvc_remote.local, "upd", {"tpl-a": dvc_remote.a2.released})
    assert sync_templates(v2, tmp_path, part_size=PART).ok
    assert_complete(tmp_path, dvc_remote.a2)
    assert old_folder.is_dir(), "the old version went while a reader held a lease on it"
    out, _ = reader.communicate("go\n", timeout=30)
    read = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert read == {rel: md5 for rel, (_, md5) in dvc_remote.a1.files.items()}
    # The lease is gone: the next sync (warm) leaves it, garbage collection then removes it.
    Volume(tmp_path).collect_garbage("tpl-a")
    assert not old_folder.exists()
    with leased(tmp_path, "tpl-a") as folder:
        assert folder.name == f".v.tpl-a.{dvc_remote.a2.dir_md5.removesuffix('.dir')}"


# --------------------------------------------------------------------------------------- failures


def test_corrupt_object_refetched_once_then_fails_naming_it(
    dvc_remote: DvcRemote, proxy, tmp_path: Path
) -> None:
    s3 = proxy.s3
    bucket = clone_bucket(s3, dvc_remote.bucket)
    with aws_env(proxy.env()):
        v1 = put_release(s3, bucket, "bad", {"tpl-a": dvc_remote.a1.released})
        assert sync_templates(v1, tmp_path, part_size=PART).ok
        big = dvc_remote.a2.big_md5
        size = dvc_remote.a2.files["unet/diffusion_pytorch_model.fp16.safetensors"][0]
        s3.client().put_object(Bucket=bucket, Key=object_key(big), Body=b"x" * size)
        v2 = put_release(s3, bucket, "bad", {"tpl-a": dvc_remote.a2.released})
        proxy.clear()
        report = sync_templates(v2, tmp_path, part_size=PART)
    result = report.templates[0]
    assert not report.ok and result.status == "kept"
    assert "[OBJECT_CORRUPT]" in result.error and object_key(big) in result.error
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in result.error
    assert len(proxy.gets(big)) == 2 * -(-size // PART)  # fetched, then refetched once
    assert_complete(tmp_path, dvc_remote.a1)  # the old version is still served
    assert not list((tmp_path / ".fuseline" / "partial").glob(f"{big}*"))


def test_traversal_in_listing_is_rejected(dvc_remote: DvcRemote, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    shutil.copytree(dvc_remote.local, remote)
    volume = tmp_path / "volume"
    ok = write_release(remote, "trav", {"tpl-b": dvc_remote.b1.released})
    assert sync_templates(ok, volume, part_size=PART).ok
    for bad in ("../../evil.txt", "/etc/evil", "a/./b"):
        with pytest.raises(ListingUnsafe):
            parse_listing(json.dumps([{"md5": "0" * 32, "relpath": bad}]).encode(), "test")
    with pytest.raises(ListingUnsafe, match="not a plain file"):
        parse_listing(json.dumps([{"md5": "0" * 32, "relpath": "x", "symlink": "/etc"}]).encode(), "t")
    # A listing object with a traversal path, named by its own md5 as DVC would name it.

    raw = json.dumps(
        [{"md5": dvc_remote.b1.files["vae/config.json"][1], "relpath": "../../evil.json"}]
    ).encode()
    md5 = hashlib.md5(raw).hexdigest() + ".dir"
    (remote / object_key(md5)).parent.mkdir(parents=True, exist_ok=True)
    (remote / object_key(md5)).write_bytes(raw)
    evil = dvc_remote.b1.released.model_copy(update={"dir_md5": md5, "nfiles": 1})
    report = sync_templates(write_release(remote, "trav", {"tpl-b": evil}), volume)
    assert report.templates[0].status == "kept"
    assert "[LISTING_UNSAFE]" in report.templates[0].error and "../../evil.json" in report.templates[0].error
    assert not (tmp_path / "evil.json").exists() and not (volume / "evil.json").exists()
    assert_complete(volume, dvc_remote.b1)


def test_stopped_server_gives_clear_error_and_keeps_served_templates(
    dvc_remote: DvcRemote, proxy, tmp_path: Path
) -> None:
    release = put_release(proxy.s3, dvc_remote.bucket, "down", {"tpl-b": dvc_remote.b1.released})
    with aws_env(proxy.env()):
        assert sync_templates(release, tmp_path, part_size=PART).ok
        proxy.stop()
        start = time.monotonic()
        report = sync_templates(release, tmp_path)
    assert time.monotonic() - start < 20
    assert not report.ok and "[REMOTE_UNAVAILABLE]" in report.error and proxy.url in report.error
    assert [(t.template, t.status) for t in report.templates] == [("tpl-b", "kept")]
    assert report.available == ["tpl-b"]
    assert_complete(tmp_path, dvc_remote.b1)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_full_volume_fails_before_fetching(dvc_remote: DvcRemote, tmp_path: Path) -> None:
    volume = tmp_path / "small"
    volume.mkdir()
    # A real small filesystem: 8 MiB holds template b (~4.4 MB) but not a's own 3 MB UNet on top.
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(volume)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {mounted.stderr!r}")
    try:
        first = write_release(dvc_remote.local, "full", {"tpl-b": dvc_remote.b1.released})
        assert sync_templates(first, volume, part_size=PART).ok
        release = write_release(
            dvc_remote.local, "full", {"tpl-a": dvc_remote.a1.released, "tpl-b": dvc_remote.b1.released}
        )
        report = sync_templates(release, volume, part_size=PART)
        by_name = {t.template: t for t in report.templates}
        error = by_name["tpl-a"].error or ""
        assert by_name["tpl-a"].status == "failed" and "[VOLUME_FULL]" in error, report.lines()
        assert str(volume) in error and "bytes free" in error and "template tpl-a" in error
        assert by_name["tpl-b"].status == "present"
        assert not os.path.lexists(volume / "models" / "tpl-a")
        assert not list((volume / ".fuseline" / "partial").iterdir())  # failed before fetching anything
        assert_complete(volume, dvc_remote.b1)
    finally:
        subprocess.run(["umount", str(volume)], check=False)


def test_object_missing_on_remote_names_it_and_fetches_nothing_into_models(
    dvc_remote: DvcRemote, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    shutil.copytree(dvc_remote.local, remote)
    missing = dvc_remote.b1.big_md5
    (remote / object_key(missing)).unlink()
    volume = tmp_path / "volume"
    report = sync_templates(write_release(remote, "gone", {"tpl-b": dvc_remote.b1.released}), volume)
    error = report.templates[0].error or ""
    assert report.templates[0].status == "failed" and "[REMOTE_MISSING]" in error
    assert str(remote / object_key(missing)) in error and "dvc push" in error
    assert not os.path.lexists(volume / "models" / "tpl-b")
    assert not list((volume / ".fuseline" / "objects").rglob("*.tmp*"))


@pytest.mark.slow
def test_synced_folder_loads_in_the_worker(kit, tmp_path: Path) -> None:
    """The contract end to end: a real fp16 export, `dvc add` + `dvc push`ed, synced by the worker at start,
    loaded and served."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from fuseline.core.manifest import CheckpointRef, ModelManifest, VaeRef
    from tests.worker.sync_fixtures import DVC, released_entry
    from worker.pipelines import load_template
    from worker.serving import Worker
    from worker.settings import load_settings

    project, remote = tmp_path / "project", tmp_path / "remote"
    project.mkdir()
    export = project / "tiny"
    pipe = StableDiffusionXLPipeline.from_pretrained(kit.diffusers_dir, local_files_only=True)
    pipe.to(torch.float16).save_pretrained(export, variant="fp16", safe_serialization=True)
    ModelManifest(
        template="tiny",
        checkpoint=CheckpointRef(id="tiny", source="file:tiny", sha256="a" * 64),
        loras=[],
        vae=VaeRef(source="checkpoint"),
        prediction_type="epsilon",
        spec_hash="c" * 64,
        fuseline_version="test",
    ).write(export)
    env = _env({"DVC_NO_ANALYTICS": "1"})
    for args in (["init", "--no-scm", "-q"], ["add", "-q", "tiny"], ["push", "-q", "-r", "loc"]):
        if args[0] == "push":
            subprocess.run([DVC, "remote", "add", "loc", str(remote)], cwd=project, env=env, check=True)
        subprocess.run([DVC, *args], cwd=project, env=env, check=True, capture_output=True)
    release = write_release(remote, "main", {"tiny": released_entry(project, "tiny")})
    volume = tmp_path / "volume"
    # The worker's own start: an empty volume is synced from the release, then the default is loaded.
    settings = load_settings(
        {
            "FUSELINE_VOLUME": str(volume),
            "FUSELINE_DEVICE": "cpu",
            "FUSELINE_RELEASE": release,
            "FUSELINE_DEFAULT_TEMPLATE": "tiny",
            "FUSELINE_MIN_SIZE": "64",
        }
    )
    worker = Worker(settings)
    assert worker.startup() == []
    assert (volume / "models" / "tiny" / "fuseline.json").is_file()
    out = worker.run({"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1})
    assert "error" not in out, out
    assert out["images"][0]["seed"] == 1 and out["template"]["id"] == "tiny"
    loaded = load_template(settings, "tiny", device="cpu")
    image = loaded.pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_two_templates_sharing_objects_sync_at_once(dvc_remote: DvcRemote, proxy, tmp_path: Path) -> None:
    """Different templates hold different locks, so both may fetch a shared object: both must still end
    complete, with the shared file stored once."""
    both = {"tpl-a": dvc_remote.a1.released, "tpl-b": dvc_remote.b1.released}
    release = put_release(proxy.s3, dvc_remote.bucket, "pair", both)
    proxy.delay_per_64k = 0.005  # long enough for the two downloads to overlap
    env = _env(proxy.env() | {"FUSELINE_SYNC_PART_SIZE": str(PART)})
    procs = [
        subprocess.Popen(sync_cmd(release, tmp_path, t), env=env, stderr=subprocess.PIPE, text=True)
        for t in ("tpl-a", "tpl-b")
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert_complete(tmp_path, dvc_remote.a1)
    assert_complete(tmp_path, dvc_remote.b1)
    te = "text_encoder/model.fp16.safetensors"
    inodes = {(tmp_path / "models" / t / te).stat().st_ino for t in ("tpl-a", "tpl-b")}
    assert inodes == {Volume(tmp_path).object_path(dvc_remote.a1.files[te][1]).stat().st_ino}


def test_copies_where_the_filesystem_refuses_hard_links(
    dvc_remote: DvcRemote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated: os.link fails as it does on filesystems without hard links (EPERM); a real such mount
    is not available here. Proves the fallback path, not any particular filesystem."""
    import errno

    import worker.sync.volume

    def refuse(*_: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(worker.sync.volume.os, "link", refuse)
    release = write_release(dvc_remote.local, "nolink", {"tpl-b": dvc_remote.b1.released})
    assert sync_templates(release, tmp_path, part_size=PART).ok
    assert_complete(tmp_path, dvc_remote.b1)
    te = tmp_path / "models/tpl-b/text_encoder/model.fp16.safetensors"
    assert te.stat().st_nlink == 1  # a copy, not a link into the store
    te.chmod(0o644)
    te.write_bytes(b"rot")
    assert sync_templates(release, tmp_path, verify=True, part_size=PART).templates[0].status == "repaired"
    assert_complete(tmp_path, dvc_remote.b1)


def test_journal_ignores_a_line_cut_short_by_a_kill(tmp_path: Path) -> None:
    from worker.sync.objects import _done_parts

    volume = Volume(tmp_path)
    volume.ensure()
    md5 = "f" * 32
    volume.partial_path(md5).write_bytes(b"\0" * 10)
    (volume.partial / f"{md5}.parts").write_text("v1 10 4\n0\n2\n1")  # "1" of "1\n" (or of "12\n")
    assert _done_parts(volume, md5, 10, 4) == {0, 2}
    # Another part size (another configuration): the partial is started over.
    assert _done_parts(volume, md5, 10, 5) == set()
    assert (volume.partial / f"{md5}.parts").read_text() == "v1 10 5\n"


# ------------------------------------------------------------------------------- races and cleanup


@pytest.mark.parametrize("other_part_size", [4, 5], ids=["same-config", "other-part-size"])
def test_partial_being_stored_is_not_zeroed_by_a_concurrent_sync(
    tmp_path: Path, other_part_size: int
) -> None:
    """Sync A (template a) has hashed a shared object's partial and is about to move it into the store
    when sync B (template b, another lock) reaches _done_parts for the same object: the stored object
    must still have its md5."""
    from types import SimpleNamespace

    from worker.sync.objects import _done_parts, _finish_object

    volume = Volume(tmp_path)
    volume.ensure()
    data = bytes(range(1, 11))
    md5 = hashlib.md5(data).hexdigest()
    volume.partial_path(md5).write_bytes(data)
    (volume.partial / f"{md5}.parts").write_text("v1 10 4\n0\n1\n2\n")
    commit = volume.commit_object

    def racing_commit(m: str, source: Path) -> Path:
        _done_parts(volume, m, len(data), other_part_size)  # sync B, in the gap before the move
        return commit(m, source)

    volume.commit_object = racing_commit  # type: ignore[method-assign]
    assert _finish_object(SimpleNamespace(volume=volume), md5, len(data)) is None  # type: ignore[arg-type]
    assert hashlib.md5(volume.object_path(md5).read_bytes()).hexdigest() == md5


def test_done_parts_without_journal_keeps_the_partial_bytes(tmp_path: Path) -> None:
    from worker.sync.objects import _done_parts

    volume = Volume(tmp_path)
    volume.ensure()
    md5 = "e" * 32
    volume.partial_path(md5).write_bytes(b"abcdef")
    assert _done_parts(volume, md5, 10, 4) == set()
    assert volume.partial_path(md5).read_bytes() == b"abcdef" + b"\0" * 4  # extended, never truncated


def test_release_rejects_template_ids_that_are_not_catalog_ids() -> None:
    from pydantic import ValidationError

    from fuseline.core.release import Release, ReleasedTemplate

    entry = ReleasedTemplate(
        dir_md5="0" * 32 + ".dir", path="m", size=1, nfiles=1, spec_hash="s", checkpoint="file:x"
    )
    for bad in ("../../evil", "a/b", ".hidden", "Upper", ""):
        with pytest.raises(ValidationError, match="not catalog ids"):
            Release(channel="c", created="20260101T000000Z", templates={bad: entry})
    assert Release(channel="c", created="20260101T000000Z", templates={"tmp": entry}).templates


def test_template_named_tmp_does_not_collect_another_templates_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sync of template `tmp` garbage-collects while sync of `tpl-a` builds: the build folder is not a
    version of `tmp`."""
    import worker.sync.volume
    from worker.sync.volume import Entry

    volume = Volume(tmp_path)
    volume.ensure()
    src = volume.partial / "obj"
    src.write_bytes(b"model")
    md5 = hashlib.md5(b"model").hexdigest()
    volume.commit_object(md5, src)
    real_place = worker.sync.volume.place
    collected: list[Path] = []

    def racing_place(source: Path, dest: Path) -> None:
        for template in ("tmp", "link", "trash", "retiring"):
            collected.extend(volume.collect_garbage(template))
        real_place(source, dest)

    monkeypatch.setattr(worker.sync.volume, "place", racing_place)
    version = volume.build_version("tpl-a", "f" * 32 + ".dir", [Entry(md5, "a/b.bin")], {"dir_md5": "x"})
    assert collected == []
    assert (version / "a/b.bin").read_bytes() == b"model"


def test_update_removes_old_version_and_its_objects_keeps_shared(
    dvc_remote: DvcRemote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FUSELINE_SYNC_OBJECT_GRACE", "0")
    both = {"tpl-a": dvc_remote.a1.released, "tpl-b": dvc_remote.b1.released}
    assert sync_templates(write_release(dvc_remote.local, "gc", both), tmp_path, part_size=PART).ok
    volume = Volume(tmp_path)
    old_version = volume.current_version("tpl-a")
    both["tpl-a"] = dvc_remote.a2.released
    assert sync_templates(write_release(dvc_remote.local, "gc", both), tmp_path, part_size=PART).ok
    assert_complete(tmp_path, dvc_remote.a2)
    assert_complete(tmp_path, dvc_remote.b1)
    assert old_version is not None and not old_version.exists()
    md5s = {
        name: {md5 for _, md5 in v.files.values()}
        for name, v in (("a1", dvc_remote.a1), ("a2", dvc_remote.a2), ("b1", dvc_remote.b1))
    }
    old_only = md5s["a1"] - md5s["a2"] - md5s["b1"]
    assert dvc_remote.a1.big_md5 in old_only
    assert not any(volume.has_object(m) for m in old_only), "objects only the old version used remain"
    assert all(volume.has_object(m) for m in md5s["a2"] | md5s["b1"])


def test_lock_heartbeat_survives_a_failed_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.sync.locks

    real_read = worker.sync.locks._read
    failures = {"left": 2}

    def flaky_read(path: Path) -> str | None:
        if failures["left"] and path.suffix == ".lock":
            failures["left"] -= 1
            if failures["left"]:
                return None  # as if missing for a moment (a rename seen half-way)
            raise OSError(116, "Stale file handle")
        return real_read(path)

    with VolumeLock(tmp_path / "x.lock", heartbeat=0.05, stale_after=1.0) as lock:
        monkeypatch.setattr(worker.sync.locks, "_read", flaky_read)
        time.sleep(0.4)  # several beats, the first ones meeting the failed reads
        assert failures["left"] == 0
        lock.check()  # still ours: no LockLost
        assert not lock._lost


def test_a_templates_refiner_is_synced_beside_it(dvc_remote: DvcRemote, tmp_path: Path) -> None:
    """A template naming a refiner brings `refiners/<id>` along, from the same store (a file the two
    share is one inode); templates not synced do not bring theirs; a second run fetches nothing."""
    import time

    from fuseline.core.logs import event_fields
    from fuseline.core.release import Release, ReleasedRefiner, release_key

    refiner_entry = ReleasedRefiner(**dvc_remote.b1.released.model_dump(exclude={"loras", "refiner"}))
    release = Release(
        channel="refined",
        created=time.strftime("%Y%m%dT%H%M%SZ"),
        templates={
            "tpl-a": dvc_remote.a1.released.model_copy(update={"refiner": "ref"}),
            "tpl-c": dvc_remote.a2.released.model_copy(update={"refiner": "other"}),
        },
        refiners={"ref": refiner_entry, "other": refiner_entry},
    )
    location = dvc_remote.local / release_key("refined")
    location.parent.mkdir(parents=True, exist_ok=True)
    location.write_text(release.to_json())
    report = sync_templates(str(location), tmp_path, ["tpl-a"], part_size=PART)
    assert report.ok, report.lines()
    assert [(r.template, r.status) for r in report.refiners] == [("ref", "synced")]
    assert report.summary()["refiners"] == {"ref": "synced"}
    assert any(line.startswith("  ref: synced") for line in report.lines()), report.lines()
    events = []
    handler = logging.Handler()
    handler.emit = events.append  # type: ignore[method-assign]
    logger = logging.getLogger("test.sync.refiner")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    report.log(logger)
    refined = [event_fields(e)[1] for e in events if event_fields(e)[0] == "sync.refiner"]
    assert [(f["refiner"], f["status"]) for f in refined] == [("ref", "synced")]
    refiner = tmp_path / "refiners" / "ref"
    assert refiner.is_symlink() and not (tmp_path / "refiners" / "other").exists()
    for relpath, (size, _md5) in dvc_remote.b1.files.items():
        assert (refiner / relpath).stat().st_size == size
    te = "text_encoder/model.fp16.safetensors"
    assert (refiner / te).stat().st_ino == (tmp_path / "models" / "tpl-a" / te).stat().st_ino
    again = sync_templates(str(location), tmp_path, ["tpl-a"])
    assert [(r.template, r.status) for r in again.refiners] == [("ref", "present")]
