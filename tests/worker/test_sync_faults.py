"""The sync under the faults of issue 16's adversarial pass: unreadable releases, hostile listings, unknown
release formats, an S3 server echoing credentials, a lock whose holder died on this machine."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.worker.sync_fixtures")

from fuseline.core.release import Release, object_key  # noqa: E402
from testkit.servers import RangeHTTPServer, RecordedRequest, Response  # noqa: E402
from tests.worker.sync_fixtures import (  # noqa: E402
    PART,
    REPO,
    DvcRemote,
    assert_complete,
    sync_cmd,
    write_release,
)
from worker.serving import Worker  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402
from worker.startup import SelfCheck, log_start  # noqa: E402
from worker.sync.errors import ListingUnsafe, LockTimeout  # noqa: E402
from worker.sync.locks import VolumeLock, holder_is_gone  # noqa: E402
from worker.sync.templates import sync_templates  # noqa: E402
from worker.sync.volume import MAX_LISTING_DEPTH, parse_listing  # noqa: E402

pytestmark = pytest.mark.s3
pytest_plugins = ["tests.worker.sync_fixtures"]

NOBODY = 65534


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A sync process's environment: no AWS_* of ours, output piped (so JSON lines)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FUSELINE_LOG"))}
    return env | (extra or {}) | {"PYTHONPATH": str(REPO), "AWS_EC2_METADATA_DISABLED": "true"}


def json_lines(text: str) -> list[dict]:
    """Every line of `text` as a JSON object (a line that is not one fails the test)."""
    return [json.loads(line) for line in text.splitlines()]


def events(text: str, name: str) -> list[dict]:
    return [r for r in json_lines(text) if r["event"] == name]


def run_sync(
    release: str, volume: Path, env: dict[str, str] | None = None, prefix: list[str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*(prefix or []), *sync_cmd(release, volume)],
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def synced(dvc_remote: DvcRemote, tmp_path: Path) -> tuple[Path, Path, str]:
    """(remote copy, volume, release path): template tpl-b synced onto the volume from a remote of its own."""
    remote = tmp_path / "remote"
    shutil.copytree(dvc_remote.local, remote)
    volume = tmp_path / "volume"
    release = write_release(remote, "main", {"tpl-b": dvc_remote.b1.released})
    assert sync_templates(release, volume, part_size=PART).ok
    return remote, volume, release


# ------------------------------------------------------------------- defect 2: an unreadable release


def test_a_release_path_that_is_a_folder_is_coded_and_the_volume_stays_served(
    dvc_remote: DvcRemote, synced: tuple[Path, Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, volume, release = synced
    Path(release).unlink()
    Path(release).mkdir()  # e.g. a mis-mounted remote, or FUSELINE_RELEASE naming the wrong path

    done = run_sync(release, volume)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (summary,) = events(done.stderr, "sync.done")
    assert summary["error"].startswith("[RELEASE_INVALID] ") and "is a folder" in summary["error"]
    assert summary["templates"] == {"tpl-b": "kept"}
    assert_complete(volume, dvc_remote.b1)

    # The worker's start: a problem, not a crash; worker.start says what it serves and that it is unsynced.
    worker = Worker(WorkerSettings(volume=volume, release=release, device="cpu"))
    problems = worker.sync_volume()
    assert len(problems) == 1 and problems[0].startswith("[RELEASE_INVALID] ")
    logger = logging.getLogger("test.worker.start")
    with caplog.at_level(logging.INFO, logger=logger.name):
        fields = log_start(worker, problems, SelfCheck(True, "files", ["tpl-b"], 0.0), logger)
    assert fields["templates_unsynced"] == ["tpl-b"] and fields["sync"]["error"] == problems[0]
    (start,) = [r for r in caplog.records if r.name == logger.name]
    assert start.getMessage() == (
        f"worker started without its release ({problems[0]}); serving what the volume holds: tpl-b"
    )


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder another user may enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="fuseline-shared-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_other_user() -> list[str]:
    """The command prefix that runs a child as another user: nobody (with setpriv, util-linux) when we are
    root, since root reads any file; nothing otherwise."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def test_a_release_file_this_user_cannot_read_is_coded_and_the_volume_stays_served(
    dvc_remote: DvcRemote, shared_tmp: Path
) -> None:
    remote, volume = shared_tmp / "remote", shared_tmp / "volume"
    shutil.copytree(dvc_remote.local, remote)
    release = write_release(remote, "main", {"tpl-b": dvc_remote.b1.released})
    assert sync_templates(release, volume, part_size=PART).ok
    if os.geteuid() == 0:
        for path in [volume, *volume.rglob("*")]:
            os.lchown(path, NOBODY, NOBODY)
    Path(release).chmod(0o600)  # as the publisher wrote it before issue 16 (defect 9), for its user only

    done = run_sync(release, volume, prefix=as_other_user())
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (summary,) = events(done.stderr, "sync.done")
    assert summary["error"].startswith("[REMOTE_UNAVAILABLE] ") and "Permission denied" in summary["error"]
    assert release in summary["error"] and summary["templates"] == {"tpl-b": "kept"}
    assert_complete(volume, dvc_remote.b1)


# ---------------------------------------------------------------- defect 3 and 10: hostile listings


def publish_listing(remote: Path, entries: list[dict]) -> str:
    """A listing object on the remote, named by its md5 as DVC names it; returns its `<md5>.dir`."""
    raw = json.dumps(entries).encode()
    dir_md5 = hashlib.md5(raw).hexdigest() + ".dir"
    (remote / object_key(dir_md5)).parent.mkdir(parents=True, exist_ok=True)
    (remote / object_key(dir_md5)).write_bytes(raw)
    return dir_md5


@pytest.mark.parametrize(
    ("relpath", "expected"),
    [
        ("a/" * 2000 + "model.json", "2001 levels deep"),  # was a RecursionError making the folders
        ("x" * 300 + ".json", "a name of 305 bytes"),  # was VOLUME_ERROR "check that it is mounted"
        (("n" * 250 + "/") * 4 + "x" * 30, "longer than 1024 bytes"),
    ],
)
def test_a_listing_too_deep_or_too_long_is_listing_unsafe(
    dvc_remote: DvcRemote, synced: tuple[Path, Path, str], relpath: str, expected: str
) -> None:
    remote, volume, _ = synced
    md5 = dvc_remote.b1.files["vae/config.json"][1]
    with pytest.raises(ListingUnsafe, match=expected):
        parse_listing(json.dumps([{"md5": md5, "relpath": relpath}]).encode(), "test")
    hostile = dvc_remote.b1.released.model_copy(
        update={
            "dir_md5": publish_listing(remote, [{"md5": md5, "relpath": relpath}]),
            "nfiles": 1,
            "size": 33,
        }
    )
    report = sync_templates(write_release(remote, "main", {"tpl-b": hostile}), volume)
    (result,) = report.templates
    assert (
        result.status == "kept" and result.error.startswith("[LISTING_UNSAFE] ") and expected in result.error
    )
    assert_complete(volume, dvc_remote.b1)


def test_listing_bounds_leave_real_folders_alone() -> None:
    entries = [
        {"md5": "0" * 32, "relpath": "/".join(["d"] * (MAX_LISTING_DEPTH - 1) + ["f"])},
        {"md5": "1" * 32, "relpath": "é" * 125 + ".json"},  # 250 + 5 = 255 bytes, the most a name may have
    ]
    assert [e.relpath for e in parse_listing(json.dumps(entries).encode(), "test")] == [
        e["relpath"] for e in entries
    ]


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,  # json.loads recursed past Python's limit: RecursionError
        json.dumps([{"md5": "0" * 32, "relpath": "\ud800.json"}]).encode(),  # a lone surrogate names no file
    ],
)
def test_a_listing_python_cannot_even_hold_is_listing_unsafe(raw: bytes) -> None:
    with pytest.raises(ListingUnsafe):
        parse_listing(raw, "test")


# ---------------------------------------------------------------------- defect 8: release formats


def test_a_release_of_an_unknown_format_is_refused_by_name(
    dvc_remote: DvcRemote, synced: tuple[Path, Path, str]
) -> None:
    _, volume, release = synced
    data = json.loads(Path(release).read_text())
    data["format"] = 99
    Path(release).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="release format 99 is not one this fuseline reads"):
        Release.from_json(json.dumps(data))
    report = sync_templates(release, volume)
    assert report.error.startswith("[RELEASE_INVALID] ") and "release format 99" in report.error
    assert [(t.template, t.status) for t in report.templates] == [("tpl-b", "kept")]
    assert_complete(volume, dvc_remote.b1)


# ------------------------------------------------------------- defect 7: the command's report


def test_the_command_logs_json_events_when_piped(dvc_remote: DvcRemote, tmp_path: Path) -> None:
    release = write_release(dvc_remote.local, "piped", {"tpl-b": dvc_remote.b1.released})
    done = run_sync(release, tmp_path / "volume", {"FUSELINE_SYNC_PART_SIZE": str(PART)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    (template,) = events(done.stderr, "sync.template")
    assert (template["template"], template["status"], template["level"]) == ("tpl-b", "synced", "info")
    assert template["objects"] > 0 and template["bytes"] > 0
    (summary,) = events(done.stderr, "sync.done")
    assert summary["templates"] == {"tpl-b": "synced"} and summary["error"] is None
    # On a terminal (FUSELINE_LOG_FORMAT=text stands in for one), the same report as text lines.
    text = run_sync(release, tmp_path / "volume", {"FUSELINE_LOG_FORMAT": "text"})
    assert text.returncode == 0 and "tpl-b: present" in text.stderr and not text.stderr.startswith("{")


AKID = "AKIAFUSELINETEST4242"
SECRET = "fuseline-test-secret-key-000000000000000"


@pytest.fixture
def echoing_s3(tmp_path: Path) -> Iterator[RangeHTTPServer]:
    """An S3 endpoint that answers every request 400 with the request's Authorization header in its error
    message, as a misconfigured proxy or a debugging server does."""

    def echo(req: RecordedRequest) -> Response:
        body = (
            "<?xml version='1.0' encoding='UTF-8'?><Error><Code>InvalidArgument</Code>"
            f"<Message>cannot parse this header: {req.headers.get('authorization', '')}</Message></Error>"
        ).encode()
        return Response(400, {"Content-Type": "application/xml"}, body)

    (tmp_path / "echo").mkdir()
    with RangeHTTPServer(tmp_path / "echo") as server:
        server.add_route("/", echo)
        yield server


@pytest.mark.parametrize("keys_from", ["environment", "credentials file"])
def test_the_command_redacts_what_the_server_echoes(
    echoing_s3: RangeHTTPServer, tmp_path: Path, keys_from: str
):
    env = {"AWS_ENDPOINT_URL": echoing_s3.base_url, "AWS_DEFAULT_REGION": "us-east-1"}
    if keys_from == "environment":
        env |= {"AWS_ACCESS_KEY_ID": AKID, "AWS_SECRET_ACCESS_KEY": SECRET}
    else:  # not in the environment: only the shape of the text can give the key away
        credentials = tmp_path / "credentials"
        credentials.write_text(f"[default]\naws_access_key_id = {AKID}\naws_secret_access_key = {SECRET}\n")
        env |= {"AWS_SHARED_CREDENTIALS_FILE": str(credentials)}
    done = run_sync("s3://models/releases/main.json", tmp_path / "volume", env)
    assert done.returncode == 2, done.stderr
    assert any("Credential=" in r.headers.get("authorization", "") for r in echoing_s3.requests)
    (summary,) = events(done.stderr, "sync.done")
    assert summary["error"].startswith("[REMOTE_UNAVAILABLE] ") and "InvalidArgument" in summary["error"]
    assert "Credential=***" in summary["error"]
    assert AKID not in done.stdout + done.stderr and SECRET not in done.stdout + done.stderr


# ------------------------------------------------------------------ defect 10: a dead lock holder


HOLD = """
import sys, time
from worker.sync.locks import VolumeLock
lock = VolumeLock(sys.argv[1], stale_after=30).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_holder_that_died_on_this_machine_is_taken_over_at_once(tmp_path: Path) -> None:
    path = tmp_path / "t.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], env=cli_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        record = path.read_text()
        assert not holder_is_gone(record)  # alive: it must be waited for
        with pytest.raises(LockTimeout):
            VolumeLock(path, stale_after=30, timeout=1).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert holder_is_gone(path.read_text())
    start = time.monotonic()
    taker = VolumeLock(path, stale_after=30, timeout=10).acquire()
    assert time.monotonic() - start < 2 and taker.took_over  # not the 30 s a silent holder is given
    taker.release()


def test_a_dead_holder_elsewhere_is_still_judged_by_its_silence(tmp_path: Path) -> None:
    path = tmp_path / "t.lock"
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(gone.stdout)
    with VolumeLock(tmp_path / "probe.lock"):
        mine = json.loads((tmp_path / "probe.lock").read_text())  # this process's own record
    for other in ({"boot_id": "another-boot"}, {"pid_ns": "pid:[1]"}, {"boot_id": None}, {"start": None}):
        record = {**mine, "token": "t", "pid": pid, **other}
        path.write_text(json.dumps(record))
        assert not holder_is_gone(path.read_text()), other
        with pytest.raises(LockTimeout):
            VolumeLock(path, stale_after=30, timeout=0.5).acquire()
    path.write_text(json.dumps({**mine, "token": "t", "pid": pid}))
    assert holder_is_gone(path.read_text())  # the same record on this machine: gone
