"""Publishing without a build: release history and rollback on a local remote, remote errors on a real S3
(SeaweedFS), the `dvc status` reading behind CI's job matrix, and the workflows' lint.

The end-to-end tests over a built project (distributed build, publish, gc) are in test_publish_build.py.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from fuseline.cli.publish import register
from fuseline.core.manifest import CheckpointRef, ModelManifest, VaeRef
from fuseline.core.release import (
    Release,
    ReleasedRefiner,
    ReleasedTemplate,
    history_key,
    object_key,
    release_key,
)
from fuseline.publish.errors import PublishError
from fuseline.publish.gc import find_local_garbage, find_remote_garbage
from fuseline.publish.project import (
    changed_templates,
    git_commit,
    read_lock,
    run_dvc,
    stale_templates,
    unverified_templates,
)
from fuseline.publish.releases import (
    current_releases,
    missing_objects,
    publish,
    read_release,
    release_history,
    rollback,
    write_release,
)
from fuseline.remote.errors import RemoteError
from fuseline.remote.stores import LocalStore, ObjectStore, RemoteConfig, S3Store, read_remote_config
from testkit.servers import free_port
from tests.worker.sync_fixtures import RecordingProxy

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def put_folder(store: ObjectStore, files: dict[str, bytes]) -> str:
    """Store a folder in DVC's remote layout (one object per file, plus the `.dir` listing); its hash."""
    listing = []
    for relpath, data in sorted(files.items()):
        md5 = hashlib.md5(data).hexdigest()
        store.write(object_key(md5), data)
        listing.append({"md5": md5, "relpath": relpath})
    body = json.dumps(listing, separators=(", ", ": ")).encode()
    dir_md5 = hashlib.md5(body).hexdigest() + ".dir"
    store.write(object_key(dir_md5), body)
    return dir_md5


def release_of(channel: str, created: str, **dirs: str) -> Release:
    return Release(
        channel=channel,
        created=created,
        templates={
            t: ReleasedTemplate(
                dir_md5=d, path=f"artifacts/models/{t}", size=1, nfiles=1, spec_hash="x", checkpoint="file:x"
            )
            for t, d in dirs.items()
        },
    )


# ------------------------------------------------------------------------------ history and rollback


def test_release_history_and_rollback_on_a_local_store(tmp_path):
    store = LocalStore(tmp_path / "remote")
    old = put_folder(store, {"unet/w.safetensors": b"old weights", "fuseline.json": b"{}"})
    new = put_folder(store, {"unet/w.safetensors": b"new weights", "fuseline.json": b"{}"})
    first = release_of("main", "20260101T000000Z", alpha=old)
    second = release_of("main", "20260102T000000Z", alpha=new)
    other = release_of("staging", "20260103T000000Z", alpha=new)
    for release in (first, second, other):
        write_release(store, release)

    assert read_release(store, "main") == second
    assert [r.created for r in release_history(store, "main")] == [first.created, second.created]
    assert len(release_history(store)) == 3
    assert set(current_releases(store)) == {"main", "staging"}

    assert rollback(store, "main", first.created) == first
    assert read_release(store, "main") == first
    # History is not rewritten by a rollback, and other channels are untouched.
    assert store.read(history_key("main", second.created)) == second.to_json().encode()
    assert read_release(store, "staging") == other


def test_rollback_refuses_unknown_timestamps_and_releases_with_missing_objects(tmp_path):
    store = LocalStore(tmp_path / "remote")
    good = put_folder(store, {"a.bin": b"a"})
    gone = put_folder(store, {"b.bin": b"b", "c.bin": b"c"})
    write_release(store, release_of("main", "20260101T000000Z", alpha=gone))
    write_release(store, release_of("main", "20260102T000000Z", alpha=good))
    store.delete([object_key(hashlib.md5(b"c").hexdigest())])

    with pytest.raises(PublishError, match=r"no release '20250101T000000Z'.*20260101T000000Z") as exc:
        rollback(store, "main", "20250101T000000Z")
    assert exc.value.code == "NO_SUCH_RELEASE"
    with pytest.raises(PublishError, match="lacks 1 objects") as exc:
        rollback(store, "main", "20260101T000000Z")
    assert exc.value.code == "INCOMPLETE_RELEASE"
    assert read_release(store, "main").created == "20260102T000000Z"


def test_missing_objects_names_each_absent_listing_and_file(tmp_path):
    store = LocalStore(tmp_path / "remote")
    complete = put_folder(store, {"x": b"x", "y": b"y"})
    partial = put_folder(store, {"x": b"x", "z": b"z"})
    store.delete([object_key(hashlib.md5(b"z").hexdigest())])
    absent = "0" * 32 + ".dir"
    assert missing_objects(store, [complete]) == []
    assert missing_objects(store, [complete, partial, absent]) == sorted(
        [object_key(hashlib.md5(b"z").hexdigest()), object_key(absent)]
    )


def test_history_copies_are_never_overwritten_within_one_second(tmp_path):
    store = LocalStore(tmp_path / "remote")
    first = write_release(store, release_of("main", "20260101T120000Z", alpha="a" * 32 + ".dir"))
    second = write_release(store, release_of("main", "20260101T120000Z", alpha="b" * 32 + ".dir"))
    assert (first.created, second.created) == ("20260101T120000Z", "20260101T120001Z")
    assert [r.templates["alpha"].dir_md5[0] for r in release_history(store, "main")] == ["a", "b"]
    assert read_release(store, "main") == second


def test_concurrent_releases_on_a_local_store_never_overwrite_each_other(tmp_path):
    # Issue 16 defect 4: the free-id check and the write were two steps; the history copy is now created
    # exclusively (a hard link of a complete temporary file: no clobbering, never half a file).
    store = LocalStore(tmp_path / "remote")
    count = 8
    barrier = threading.Barrier(count)
    written: list[Release] = []

    def publish_one(i: int) -> None:
        release = release_of("main", "20260101T120000Z", alpha=f"{i:032x}.dir")
        barrier.wait()
        written.append(write_release(store, release))

    threads = [threading.Thread(target=publish_one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = release_history(store, "main")
    assert len({r.created for r in written}) == count and sorted(history, key=str) == sorted(written, key=str)
    for release in history:  # each copy is the one its id was given to
        assert store.read(history_key("main", release.created)) == release.to_json().encode()
    assert read_release(store, "main") in written


def test_local_release_files_are_readable_by_every_user_of_the_remote(tmp_path):
    # Issue 16 defect 9: written 0600 under a strict umask, so another user's worker could not read them
    # (DVC's own objects are 0444).
    store = LocalStore(tmp_path / "remote")
    previous = os.umask(0o077)
    try:
        release = write_release(store, release_of("main", "20260101T120000Z", alpha="a" * 32 + ".dir"))
        write_release(store, release_of("main", "20260101T120000Z", alpha="b" * 32 + ".dir"))
    finally:
        os.umask(previous)
    for key in (
        history_key("main", release.created),
        history_key("main", "20260101T120001Z"),
        release_key("main"),
    ):
        mode = stat.S_IMODE((tmp_path / "remote" / key).stat().st_mode)
        assert mode & 0o444 == 0o444, (key, oct(mode))


@pytest.mark.parametrize(
    "to", ["../../../outside", "../../other/20260101T000000Z", "20260101T000000Z/../x", "latest"]
)
def test_rollback_takes_only_release_ids(tmp_path, to):
    # Issue 16 defect 5: `--to ../../../../tmp/x` installed a file from outside the history as current.
    store = LocalStore(tmp_path / "remote")
    folder = put_folder(store, {"a": b"a"})
    current = write_release(store, release_of("main", "20260102T000000Z", alpha=folder))
    planted = release_of("main", "20260101T000000Z", alpha=folder).to_json()
    for path in (tmp_path / "outside.json", tmp_path / "remote/releases/other/20260101T000000Z.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(planted)
    with pytest.raises(PublishError, match="not a release id") as exc:
        rollback(store, "main", to)
    assert exc.value.code == "BAD_RELEASE_ID" and "fuseline release list" in str(exc.value)
    assert read_release(store, "main") == current


def test_release_list_and_rollback_commands(tmp_path):
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    remote = tmp_path / "remote"
    (project / ".dvc/config").write_text(
        f"[core]\n    no_scm = True\n    remote = local\n['remote \"local\"']\n    url = {remote}\n"
    )
    store = LocalStore(remote)
    folder = put_folder(store, {"a": b"a"})
    write_release(store, release_of("main", "20260101T000000Z", alpha=folder))
    write_release(store, release_of("main", "20260102T000000Z", alpha=folder))
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    listed = runner.invoke(app, ["release", "list", "--project", str(project)])
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines() == [
        "  main  20260101T000000Z  1 templates  commit -",
        "* main  20260102T000000Z  1 templates  commit -",
    ]
    rolled = runner.invoke(
        app,
        ["release", "rollback", "--channel", "main", "--to", "20260101T000000Z", "--project", str(project)],
    )
    assert rolled.exit_code == 0, rolled.output
    assert read_release(store, "main").created == "20260101T000000Z"
    unknown = ["release", "rollback", "-c", "main", "--to", "20250101T000000Z", "--project", str(project)]
    bad = runner.invoke(app, unknown)
    assert bad.exit_code == 1
    assert "error [NO_SUCH_RELEASE]" in bad.output
    outside = ["release", "rollback", "-c", "main", "--to", "../../../../tmp/x", "--project", str(project)]
    bad = runner.invoke(app, outside)
    assert bad.exit_code == 1 and "error [BAD_RELEASE_ID]" in bad.output
    assert read_release(store, "main").created == "20260101T000000Z"


def test_a_corrupt_release_file_is_an_error_naming_its_key(tmp_path):
    store = LocalStore(tmp_path / "remote")
    folder = put_folder(store, {"a": b"a"})
    write_release(store, release_of("main", "20260101T000000Z", alpha=folder))
    store.write(history_key("main", "20260102T000000Z"), b'{"channel": "main"}')  # truncated upload
    with pytest.raises(PublishError, match=r"releases/main/20260102T000000Z\.json: not a valid") as exc:
        release_history(store, "main")
    assert exc.value.code == "BAD_RELEASE" and "delete it from the remote" in str(exc.value)
    store.write(release_key("main"), b"not json")
    with pytest.raises(PublishError, match=r"releases/main\.json: not a valid.*rollback") as exc:
        current_releases(store)
    assert exc.value.code == "BAD_RELEASE" and "\n" not in str(exc.value)


def test_channel_names_are_checked():
    with pytest.raises(PublishError, match="lowercase letters") as exc:
        rollback(LocalStore(Path("/nonexistent")), "../etc", "x")
    assert exc.value.code == "BAD_CHANNEL"


# ------------------------------------------------------------------- a merge whose check failed


# A two-stage pipeline shaped like the real one (merge@<id> writes the model, verify@<id> checks it), with
# shell commands so it runs in a second; verify passes only while the file `ok` exists.
TINY_PIPELINE = """\
stages:
  merge:
    foreach: [alpha]
    do:
      cmd: mkdir -p artifacts/models/${item} && echo w > artifacts/models/${item}/w
      outs:
        - artifacts/models/${item}
  verify:
    foreach: [alpha]
    do:
      cmd: test -f ok && mkdir -p artifacts/verify/${item} && echo 1 > artifacts/verify/${item}/metrics.json
      deps:
        - artifacts/models/${item}
      metrics:
        - artifacts/verify/${item}/metrics.json
"""


def tiny_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    remote = tmp_path / "remote"
    (project / ".dvc/config").write_text(
        f"[core]\n    no_scm = True\n    remote = local\n['remote \"local\"']\n    url = {remote}\n"
    )
    (project / "dvc.yaml").write_text(TINY_PIPELINE)
    (project / "templates.json").write_text(json.dumps({"templates": {"alpha": {}}}))
    return project


def test_ci_plan_prints_the_json_list_and_writes_the_github_output(tmp_path):
    """`fuseline ci plan`, as the workflows run it: the list on stdout, `templates=<list>` appended to
    $GITHUB_OUTPUT (the build matrix) and a line to $GITHUB_STEP_SUMMARY."""
    project = tiny_project(tmp_path)
    (project / "ok").write_text("")
    assert run_dvc(project, "repro").returncode == 0
    output, summary = tmp_path / "github-output", tmp_path / "summary.md"
    env = {**os.environ, "GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(summary)}

    def plan() -> list[str]:
        proc = subprocess.run(
            [str(VENV_BIN / "fuseline"), "ci", "plan"], cwd=project, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    assert plan() == []
    (project / "dvc.yaml").write_text(TINY_PIPELINE.replace("echo w >", "echo w2 >"))
    assert plan() == ["alpha"]
    assert output.read_text().splitlines() == ["templates=[]", 'templates=["alpha"]']
    assert '`["alpha"]`' in summary.read_text()


def test_publish_refuses_a_template_whose_verify_failed(tmp_path):
    project = tiny_project(tmp_path)
    failed = run_dvc(project, "repro")
    assert failed.returncode != 0  # verify@alpha failed, yet DVC has locked merge@alpha
    assert "merge@alpha" in read_lock(project)["stages"]
    assert stale_templates(project, ["alpha"]) == []

    with pytest.raises(PublishError, match=r"alpha not verified.*dvc repro verify@alpha") as exc:
        publish(project, do_push=False)
    assert exc.value.code == "UNVERIFIED"
    assert not (tmp_path / "remote" / "releases").exists()

    (project / "ok").write_text("")
    assert run_dvc(project, "repro").returncode == 0
    assert unverified_templates(project, ["alpha"]) == []
    # A verify entry that no longer matches the model (rebuilt after the check) is refused too.
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    lock["stages"]["verify@alpha"]["deps"][0]["md5"] = "0" * 32 + ".dir"
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert unverified_templates(project, ["alpha"]) == ["alpha"]


# ----------------------------------------------------------------------------- S3 errors, one line


def s3_remote(bucket: str, endpoint: str, **options: str) -> RemoteConfig:
    return RemoteConfig(
        name="s3", url=f"s3://{bucket}/fuseline", options={"endpointurl": endpoint, **options}
    )


@pytest.fixture
def clean_aws_env(monkeypatch):
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.mark.s3
def test_wrong_credentials_give_one_line_without_the_secret(s3_server, s3_bucket, clean_aws_env, monkeypatch):
    secret = "wrong-secret-" + "q" * 20
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = S3Store(s3_remote(s3_bucket, s3_server.endpoint_url))
    with pytest.raises(RemoteError) as exc:
        store.check()
    message = str(exc.value)
    assert exc.value.code == "BAD_CREDENTIALS"
    assert "\n" not in message and secret not in message
    assert "AWS_SECRET_ACCESS_KEY" in message and "dvc remote modify --local s3" in message


@pytest.mark.s3
def test_missing_bucket_names_it_and_the_fix(s3_server, clean_aws_env, monkeypatch):
    for name, value in s3_server.env().items():
        if name.startswith("AWS_ACCESS") or name.startswith("AWS_SECRET"):
            monkeypatch.setenv(name, value)
    store = S3Store(s3_remote("no-such-bucket-here", s3_server.endpoint_url))
    with pytest.raises(RemoteError) as exc:
        store.check()
    assert exc.value.code == "NO_BUCKET"
    assert "'no-such-bucket-here' does not exist" in str(exc.value)
    assert "dvc remote modify s3 url" in str(exc.value) and "\n" not in str(exc.value)
    assert s3_server.secret_key not in str(exc.value)


def test_unreachable_endpoint_names_it_and_the_fix(clean_aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-used-secret")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Store(s3_remote("models", endpoint))
    with pytest.raises(RemoteError) as exc:
        store.check()
    assert exc.value.code == "UNREACHABLE"
    assert endpoint in str(exc.value) and "endpointurl" in str(exc.value) and "\n" not in str(exc.value)
    assert "not-used-secret" not in str(exc.value)


@pytest.mark.s3
def test_s3_store_round_trip_under_a_prefix(s3_server, s3_bucket, clean_aws_env, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    store = S3Store(RemoteConfig(name="s3", url=f"s3://{s3_bucket}/team/models"))  # endpoint from env
    folder = put_folder(store, {"a.bin": b"a", "sub/b.bin": b"b"})
    write_release(store, release_of("main", "20260101T000000Z", alpha=folder))
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert all(k.startswith("team/models/") for k in keys) and len(keys) == 5
    assert missing_objects(store, [folder]) == []
    assert read_release(store, "main").templates["alpha"].dir_md5 == folder
    store.delete([object_key(hashlib.md5(b"a").hexdigest())])
    assert missing_objects(store, [folder]) == [object_key(hashlib.md5(b"a").hexdigest())]
    assert store.read(release_key("nope")) is None


@pytest.mark.s3
def test_two_publishes_in_the_same_second_from_two_clones_keep_both_releases(
    s3_server, s3_bucket, clean_aws_env, monkeypatch, tmp_path
):
    # Issue 16 defect 4 as it was found: two clones publishing at once both took the id that looked free
    # and one history copy overwrote the other. Here the remote answers release requests slowly, so both
    # publishes are at that step at once, as on a busy bucket; each then holds its own id.
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    first = tiny_project(tmp_path / "a")
    (first / "ok").write_text("")
    # The model folder carries a manifest, as a real merge writes it (publish reads its summary).
    ModelManifest(
        template="alpha",
        checkpoint=CheckpointRef(id="tiny", source="file:tiny.safetensors", sha256="a" * 64),
        loras=[],
        vae=VaeRef(source="checkpoint"),
        prediction_type="epsilon",
        spec_hash="0" * 64,
        fuseline_version="test",
    ).write(first)
    pipeline = TINY_PIPELINE.replace("/w\n", "/w && cp fuseline.json artifacts/models/${item}/\n", 1)
    (first / "dvc.yaml").write_text(pipeline)
    url = f"s3://{s3_bucket}/fuseline"
    config = (first / ".dvc/config").read_text()
    (first / ".dvc/config").write_text(
        config + f"['remote \"s3\"']\n    url = {url}\n    endpointurl = {s3_server.endpoint_url}\n"
    )
    assert run_dvc(first, "repro").returncode == 0
    assert run_dvc(first, "push", "-r", "s3").returncode == 0
    proxy = RecordingProxy(s3_server)
    proxy.request_delays = {"/releases/": 2.0}
    (first / ".dvc/config").write_text(
        config + f"['remote \"s3\"']\n    url = {url}\n    endpointurl = {proxy.url}\n"
    )
    second = tmp_path / "b" / "project"
    shutil.copytree(first, second)
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    barrier = threading.Barrier(2)
    results: dict[Path, Release] = {}
    errors: list[BaseException] = []

    def publish_from(project: Path) -> None:
        try:
            barrier.wait()
            results[project] = publish(project, remote_name="s3", do_push=False, now=now).release
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish_from, args=(p,)) for p in (first, second)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        proxy.stop()
    assert not errors, errors
    ids = sorted(r.created for r in results.values())
    assert ids == ["20260101T120000Z", "20260101T120001Z"]
    store = S3Store(RemoteConfig(name="s3", url=url, options={"endpointurl": s3_server.endpoint_url}))
    assert sorted(r.created for r in release_history(store, "main")) == ids
    # The second one learnt that its first id was taken from the store itself: a refused conditional put.
    assert [s.status for s in proxy.seen if s.method == "PUT" and "/releases/main/" in s.path] == [
        200,
        412,
        200,
    ]


class PartialDeleteHandler(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint whose DeleteObjects refuses every key, answering 200 as S3 does in Quiet mode."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        keys = re.findall(r"<Key>([^<]+)</Key>", body)
        errors = "".join(
            f"<Error><Key>{k}</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            for k in keys
        )
        answer = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{errors}</DeleteResult>'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_s3_delete_reports_the_keys_the_remote_refused(clean_aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-used-secret")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PartialDeleteHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = S3Store(s3_remote("models", f"http://127.0.0.1:{server.server_port}"))
        with pytest.raises(RemoteError, match=r"could not delete 2 objects: fuseline/files/") as exc:
            store.delete(["files/md5/aa/b", "files/md5/cc/d"])
    finally:
        server.shutdown()
    assert exc.value.code == "DELETE_FAILED" and "AccessDenied" in str(exc.value)


# ---------------------------------------------------------------------- what CI's matrix would build


CATALOG = {
    "templates": {
        "alpha": {"checkpoint": "tiny"},
        "beta": {"checkpoint": "tiny"},
        "gamma": {"checkpoint": "other"},
    }
}
PRODUCED = {"artifacts/base/tiny", "artifacts/base/other", "artifacts/vae", "artifacts/models/alpha"}


def test_changed_templates_ignores_outputs_missing_in_a_fresh_clone():
    fresh_clone = {
        "merge@alpha": [
            {"changed deps": {"artifacts/base/tiny": "deleted", "artifacts/vae": "deleted"}},
            {"changed outs": {"artifacts/models/alpha": "deleted"}},
        ],
        "verify@alpha": [{"changed deps": {"artifacts/models/alpha": "deleted"}}],
        "convert@tiny": [{"changed outs": {"artifacts/base/tiny": "deleted"}}],
    }
    assert changed_templates(fresh_clone, CATALOG, PRODUCED) == []


def test_changed_templates_follows_params_code_and_upstream_stages():
    status = {"merge@beta": [{"changed deps": {"params.yaml": {"merge": "modified"}}}]}
    assert changed_templates(status, CATALOG, PRODUCED) == ["beta"]
    status = {"merge@alpha": [{"changed params": {"templates.json": {"templates.alpha": "modified"}}}]}
    assert changed_templates(status, CATALOG, PRODUCED) == ["alpha"]
    status = {"merge@gamma": [{"changed deps": {"stages/merge.py": "modified"}}]}
    assert changed_templates(status, CATALOG, PRODUCED) == ["gamma"]
    status = {"convert@tiny": [{"changed deps": {"stages/convert.py": "modified"}}]}
    assert changed_templates(status, CATALOG, PRODUCED) == ["alpha", "beta"]
    assert changed_templates({"vae": ["always changed"]}, CATALOG, PRODUCED) == ["alpha", "beta", "gamma"]
    # A stage of a template no longer in the catalog builds nothing.
    assert changed_templates({"merge@old": ["changed command"]}, CATALOG, PRODUCED) == []


# ------------------------------------------------------------------------------------- workflows


WORKFLOWS = REPO / ".github" / "workflows"


def actionlint(folder: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(VENV_BIN / "actionlint"),
            "-shellcheck",
            str(VENV_BIN / "shellcheck"),
            "-no-color",
            *map(str, files),
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_workflows_pass_actionlint_and_make_lint_runs_it(tmp_path):
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) == ["image.yml", "main.yml", "pr.yml"]
    proc = actionlint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    makefile = (REPO / "Makefile").read_text()
    assert "actionlint -shellcheck $(BIN)/shellcheck" in makefile
    # The check can fail: the same workflow with an unquoted variable and an unknown job is rejected.
    broken = tmp_path / ".github" / "workflows"
    broken.mkdir(parents=True)
    text = (WORKFLOWS / "main.yml").read_text()
    text = text.replace('"${{ matrix.template }}" --remote s3', "$TEMPLATE --remote s3").replace(
        "needs: [plan, build]", "needs: [plan, bulid]"
    )
    (broken / "main.yml").write_text(text)
    proc = actionlint(tmp_path, broken / "main.yml")
    assert proc.returncode != 0
    assert "bulid" in proc.stdout and "SC2086" in proc.stdout  # the unknown job and the shellcheck finding


def test_main_workflow_builds_each_template_then_restores_and_publishes():
    flow = yaml.safe_load((WORKFLOWS / "main.yml").read_text())
    jobs = flow["jobs"]
    build_steps = " ".join(s.get("run", "") for s in jobs["build"]["steps"])
    assert "fromJSON(needs.plan.outputs.templates)" in str(jobs["build"]["strategy"]["matrix"]["template"])
    assert "fuseline ci plan" in " ".join(s.get("run", "") for s in jobs["plan"]["steps"])
    assert 'fuseline ci build "${{ matrix.template }}" --remote s3' in build_steps
    publish_steps = [s.get("run", "") for s in jobs["publish"]["steps"]]
    assert publish_steps[-2:] == ["make setup", ".venv/bin/fuseline ci publish --remote s3 --channel main"]
    for job in jobs.values():
        assert any(s.get("run") == "make setup" for s in job["steps"])
    # Credentials come from repository secrets only.
    assert flow["env"]["AWS_SECRET_ACCESS_KEY"] == "${{ secrets.AWS_SECRET_ACCESS_KEY }}"
    # Every secret and variable the workflow reads is listed in the docs for the repository settings.
    text = (WORKFLOWS / "main.yml").read_text()
    settings = (REPO / "docs" / "publishing.md").read_text().split("## CI", 1)[1].split("\n## ", 1)[0]
    for name in re.findall(r"\$\{\{\s*(?:secrets|vars)\.(\w+)", text):
        assert f"`{name}`" in settings, name


def test_publishing_workflows_run_only_make_targets_and_fuseline_commands():
    """Every step the build/publish workflows run on GitHub is a make target or a `fuseline` command, each of
    which the tests here run too (`fuseline ci plan` above, `fuseline ci build|publish` in
    tests/publish/test_publish_build.py)."""
    for name in ("main.yml", "pr.yml"):
        flow = yaml.safe_load((WORKFLOWS / name).read_text())
        for job in flow["jobs"].values():
            for step in job["steps"]:
                if "run" in step:
                    command = step["run"].strip()
                    assert "\n" not in command, f"{name}: one command per step: {command!r}"
                    assert re.match(r"^(make [a-z-]+|\.venv/bin/fuseline [a-z]+\b)", command), (name, command)


def test_committed_dvc_config_has_the_remotes_and_no_secrets(tmp_path):
    text = (REPO / ".dvc" / "config").read_text()
    for word in ("access_key_id", "secret_access_key", "session_token", "password"):
        assert word not in text
    project = tmp_path / "clone"
    (project / ".dvc").mkdir(parents=True)
    shutil.copy(REPO / ".dvc" / "config", project / ".dvc" / "config")
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    local = read_remote_config(project)
    assert local.name == "local" and not local.is_s3
    # A fresh clone can publish with no setup: the default remote is a folder inside the clone.
    assert Path(local.url) == project / ".dvc-remote"
    assert "/.dvc-remote/" in (REPO / ".gitignore").read_text().splitlines()
    s3 = read_remote_config(project, "s3")
    assert s3.is_s3 and s3.url.startswith("s3://")
    with pytest.raises(RemoteError, match=r"no remote named 'r2' \(known: local, s3;") as exc:
        read_remote_config(project, "r2")
    assert exc.value.code == "UNKNOWN_REMOTE" and "\n" not in str(exc.value)


def test_a_folder_outside_any_dvc_project_is_a_coded_remote_error(tmp_path):
    # The source archive asks for the remote of whatever folder holds the catalog; a stage run outside a
    # DVC project (tests/stages/test_convert.py) must keep upstream's error, not die with DVC's.
    with pytest.raises(RemoteError, match="not inside a DVC project") as exc:
        read_remote_config(tmp_path)
    assert exc.value.code == "NOT_DVC_PROJECT"


def test_git_commit_is_head_or_none(tmp_path):
    assert git_commit(tmp_path) is None
    run = {"cwd": tmp_path, "check": True, "capture_output": True}
    subprocess.run(["git", "init", "-q"], **run)
    (tmp_path / "f").write_text("x")
    subprocess.run(["git", "add", "f"], **run)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "x"], **run
    )
    head = subprocess.run(["git", "rev-parse", "HEAD"], text=True, **run).stdout.strip()
    assert git_commit(tmp_path) == head and len(head) == 40


def test_gc_refuses_without_a_pipeline_instead_of_emptying_the_lock(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc/config").write_text("[core]\n    no_scm = True\n")
    lock = "schema: '2.0'\nstages:\n  merge@alpha:\n    cmd: python -m stages.merge alpha\n"
    (tmp_path / "dvc.lock").write_text(lock)
    with pytest.raises(PublishError, match=r"dvc\.yaml: not found") as exc:
        find_local_garbage(tmp_path)
    assert exc.value.code == "NO_PIPELINE"
    assert (tmp_path / "dvc.lock").read_text() == lock


def test_gc_and_rollback_count_a_released_refiners_folder(tmp_path):
    """A refiner's folder is in releases beside the templates: remote gc keeps its objects while a release
    names it, and rollback refuses a release whose refiner lost an object."""
    store = LocalStore(tmp_path / "remote")
    template = put_folder(store, {"unet/w.safetensors": b"template weights"})
    refiner = put_folder(store, {"unet/w.safetensors": b"refiner weights", "fuseline.json": b"{}"})
    plain = release_of("main", "20260101T000000Z", alpha=template)
    release = Release(
        channel="main",
        created="20260102T000000Z",
        templates={"alpha": plain.templates["alpha"].model_copy(update={"refiner": "ref"})},
        refiners={
            "ref": ReleasedRefiner(
                dir_md5=refiner,
                path="artifacts/base/ref",
                size=1,
                nfiles=2,
                spec_hash="x",
                checkpoint="file:r",
            )
        },
    )
    write_release(store, plain)
    write_release(store, release)
    project = tmp_path / "project"
    project.mkdir()
    assert find_remote_garbage(project, store) == []
    store.delete([object_key(hashlib.md5(b"refiner weights").hexdigest())])
    with pytest.raises(PublishError, match="lacks 1 objects") as exc:
        rollback(store, "main", release.created)
    assert exc.value.code == "INCOMPLETE_RELEASE"


def test_register_adds_the_commands():
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("publish", "release", "gc"):
        assert command in result.output
