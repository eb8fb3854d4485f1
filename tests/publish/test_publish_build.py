"""Publishing a real build: three clones of one scratch project share a SeaweedFS bucket as CI's jobs do,
then publish, read with boto3 alone, interrupt, roll back and collect garbage.

One module fixture builds once (clone A: alpha and beta; clone B: gamma, restoring the shared stages from
the run-cache; clone C: `dvc repro --pull` only). Every other test works on a copy of clone C.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
import yaml
from configobj import ConfigObj
from typer.testing import CliRunner

from fuseline.cli.publish import register
from fuseline.core.release import Release, object_key, release_key
from fuseline.publish.project import project_changed_templates
from fuseline.publish.releases import dir_listing, missing_objects, release_history
from fuseline.remote.stores import LocalStore, S3Store, read_remote_config
from tests.fixtures.project import REPO, RUNNING_STAGE, DvcProject, dvc_env, make_dvc_project

pytestmark = [pytest.mark.slow, pytest.mark.s3]

TEMPLATES = ("alpha", "beta", "gamma")


def kit_catalog(kit) -> dict:
    """Three templates on one checkpoint (one convert stage: every stage process costs ~10 s here)."""
    return {
        "version": 1,
        "vae": {"source": f"file:{kit.vae_dir}"},
        "checkpoints": {"tiny": {"source": f"file:{kit.single_file}", "config": f"file:{kit.config_dir}"}},
        "templates": {
            "alpha": {
                "checkpoint": "tiny",
                "loras": [{"source": f"file:{kit.loras['kohya_sgm']}", "scale": 0.8}],
            },
            "beta": {"checkpoint": "tiny", "loras": [{"source": f"file:{kit.loras['locon']}", "scale": 0.5}]},
            "gamma": {
                "checkpoint": "tiny",
                "loras": [{"source": f"file:{kit.loras['kohya_te']}", "scale": 1.0}],
            },
        },
    }


def use_repo_remotes(project: DvcProject) -> None:
    """Give the scratch project the remotes the repo's .dvc/config ships (the committed file under test)."""
    shipped = ConfigObj(str(REPO / ".dvc" / "config"))
    config = ConfigObj(str(project.root / ".dvc" / "config"))
    config.setdefault("core", {})["remote"] = shipped["core"]["remote"]
    for section in shipped:
        if section.startswith("remote "):
            config[section] = dict(shipped[section])
    config.write()


def point_s3_remote(project: DvcProject, bucket: str) -> None:
    # Only the bucket changes, in the clone's local (uncommitted) config. The endpoint and credentials
    # come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), which dvc-s3 honours.
    project.dvc("remote", "modify", "--local", "s3", "url", f"s3://{bucket}/fuseline")


def fuseline_ci(project: DvcProject, *args: str) -> str:
    """Run `fuseline ci ...` in the project as a CI job does; its output (DVC's included)."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "fuseline"), "ci", *args],
        cwd=project.root,
        env=project.env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def clone(src: Path, dst: Path, env: dict[str, str]) -> DvcProject:
    shutil.copytree(src, dst, symlinks=True)
    return DvcProject(dst, env=env)


def model_out(lock: dict, template: str) -> dict:
    """The merge stage's model folder output in dvc.lock (merge also outputs its metrics file)."""
    outs = lock["stages"][f"merge@{template}"]["outs"]
    return next(o for o in outs if o["path"] == f"artifacts/models/{template}")


def tree_md5s(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class Build:
    def __init__(self, root: Path, bucket: str, env: dict[str, str], clones: dict[str, DvcProject]):
        self.root, self.bucket, self.env, self.clones = root, bucket, env, clones
        self.ran: dict[str, list[str]] = {}

    def copy_of_c(self, name: str) -> DvcProject:
        return clone(self.clones["C"].root, self.root / f"{name}-{uuid.uuid4().hex[:6]}", self.env)


@pytest.fixture(scope="module")
def build(kit, s3_server, tmp_path_factory) -> Build:
    root = tmp_path_factory.mktemp("publish")
    bucket = s3_server.make_bucket(f"build-{uuid.uuid4().hex[:12]}")
    env = dvc_env({k: v for k, v in s3_server.env().items()})
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(name, None)
    base = make_dvc_project(
        root / "commit",
        kit_catalog(kit),
        params={"merge": {"shard_size_mb": 0.5}, "verify": {"steps": 2, "width": 64, "height": 64}},
    )
    use_repo_remotes(base)
    point_s3_remote(base, bucket)
    result = Build(root, bucket, env, {n: clone(base.root, root / n, env) for n in "ABC"})
    a, b, c = (result.clones[n] for n in "ABC")
    # CI's matrix: one job per template, each `fuseline ci build <id> --remote s3` as main.yml runs it
    # (`dvc repro --pull verify@<id>` then `dvc push --run-cache`).
    result.ran["A"] = RUNNING_STAGE.findall(fuseline_ci(a, "build", "alpha", "beta", "--remote", "s3"))
    result.ran["B"] = RUNNING_STAGE.findall(fuseline_ci(b, "build", "gamma", "--remote", "s3"))
    # CI's final job restores everything from the run-cache (`fuseline ci publish` is run by
    # test_ci_publish_restores_commits_the_lock_and_publishes).
    c.dvc("remote", "default", "--local", "s3")
    result.ran["C"] = c.repro("--pull")
    return result


def test_distributed_build_restores_every_stage_from_the_run_cache(build):
    assert sorted(build.ran["A"]) == sorted(
        [
            "fetch-checkpoint@tiny",
            "fetch-vae",
            "fetch-loras@alpha",
            "fetch-loras@beta",
            "convert@tiny",
            "vae",
            "merge@alpha",
            "merge@beta",
            "verify@alpha",
            "verify@beta",
        ]
    )
    # B found the shared stages (fetch, convert, vae) in the run-cache A pushed and built only its template.
    assert sorted(build.ran["B"]) == ["fetch-loras@gamma", "merge@gamma", "verify@gamma"]
    assert build.ran["C"] == []
    a, b, c = (build.clones[n] for n in "ABC")
    for template, builder in (("alpha", a), ("beta", a), ("gamma", b)):
        built = tree_md5s(builder.root / "artifacts/models" / template)
        assert built and tree_md5s(c.root / "artifacts/models" / template) == built
        assert c.lock()["stages"][f"merge@{template}"] == builder.lock()["stages"][f"merge@{template}"]
    assert c.status() == {}


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def invoke(project: DvcProject, monkeypatch, *args: str):
    for name, value in project.env.items():
        if name.startswith("AWS_") or name in ("PATH", "DVC_NO_ANALYTICS"):
            monkeypatch.setenv(name, value)
    result = CliRunner().invoke(cli(), [*args, "--project", str(project.root)])
    # CliRunner interleaves stderr into `output`; the command's log records go there as JSON lines
    # (fuseline.core.logs, not a terminal). Keep the command's own text, which is what these tests check.
    text = "".join(line for line in result.output.splitlines(keepends=True) if not line.startswith('{"ts": '))
    return SimpleNamespace(exit_code=result.exit_code, output=text, exception=result.exception)


def reader_client(s3_server):
    """What a reader holds: the bucket's endpoint and credentials, nothing of the project."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )


def test_publish_to_s3_then_a_reader_with_boto3_alone_gets_every_file(build, s3_server, monkeypatch):
    project = build.copy_of_c("publish")
    bucket = s3_server.make_bucket(f"rel-{uuid.uuid4().hex[:12]}")
    point_s3_remote(project, bucket)
    result = invoke(project, monkeypatch, "publish", "--remote", "s3", "--channel", "main")
    assert result.exit_code == 0, result.output
    assert "published main@" in result.output

    s3 = reader_client(s3_server)
    release = Release.from_json(
        s3.get_object(Bucket=bucket, Key="fuseline/" + release_key("main"))["Body"].read()
    )
    assert sorted(release.templates) == list(TEMPLATES)
    assert release.git_commit is None  # the scratch project is not a git repo
    history = s3.get_object(Bucket=bucket, Key=f"fuseline/releases/main/{release.created}.json")[
        "Body"
    ].read()
    assert Release.from_json(history) == release
    for template, entry in release.templates.items():
        folder = project.root / "artifacts/models" / template
        manifest = json.loads((folder / "fuseline.json").read_text())
        assert entry.spec_hash == manifest["spec_hash"]
        assert [lora.sha256 for lora in entry.loras] == [x["sha256"] for x in manifest["loras"]]
        key = "fuseline/" + object_key(entry.dir_md5)
        listing = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        fetched = {}
        for item in listing:
            body = s3.get_object(Bucket=bucket, Key="fuseline/" + object_key(item["md5"]))["Body"].read()
            assert hashlib.md5(body).hexdigest() == item["md5"]
            fetched[item["relpath"]] = item["md5"]
        assert fetched == tree_md5s(folder)
        sizes = [p.stat().st_size for p in folder.rglob("*") if p.is_file()]
        assert (entry.nfiles, entry.size) == (len(fetched), sum(sizes))
    # The run-cache went up too (what CI's final job restores from).
    assert s3.list_objects_v2(Bucket=bucket, Prefix="fuseline/runs/")["KeyCount"] > 0


def test_publish_to_the_embedded_local_remote_needs_no_setup(build, monkeypatch):
    project = build.copy_of_c("local")
    (project.root / ".dvc/config.local").unlink()  # drop the clone's s3 settings: a fresh clone has none
    result = invoke(project, monkeypatch, "publish")
    assert result.exit_code == 0, result.output
    remote = project.root / ".dvc-remote"
    release = Release.from_json((remote / "releases/main.json").read_bytes())
    store = LocalStore(remote)
    assert missing_objects(store, [t.dir_md5 for t in release.templates.values()]) == []


def test_interrupted_push_keeps_the_old_release_and_a_rerun_completes(build, s3_server, monkeypatch):
    bucket = s3_server.make_bucket(f"cut-{uuid.uuid4().hex[:12]}")
    # The old release: the same build before gamma joined the catalog.
    old = build.copy_of_c("old")
    point_s3_remote(old, bucket)
    old.edit_catalog(lambda c: c["templates"].pop("gamma"))
    assert invoke(old, monkeypatch, "publish", "-r", "s3").exit_code == 0
    s3 = reader_client(s3_server)
    old_bytes = read(s3, bucket, "releases/main.json")

    new = build.copy_of_c("new")
    point_s3_remote(new, bucket)
    # 1. A push cut halfway: gamma's folder reached the remote without its own files (push it, then
    #    remove the objects no other template shares).
    store = S3Store(read_remote_config(new.root, "s3"))
    new.dvc("push", "-r", "s3", "artifacts/models/gamma")

    def objects_of(template: str) -> set[str]:
        dir_md5 = model_out(new.lock(), template)["md5"]
        return {object_key(e["md5"]) for e in dir_listing(store, dir_md5)}

    gamma_dir = object_key(model_out(new.lock(), "gamma")["md5"])
    unique = sorted(objects_of("gamma") - objects_of("alpha") - objects_of("beta"))
    assert unique, "gamma must have objects of its own for this test to mean anything"
    # 1a. Files gone under a listing that stayed: DVC would skip the folder; the error names the fix.
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "fuseline/" + k} for k in unique]})
    result = invoke(new, monkeypatch, "publish", "-r", "s3", "--no-push")
    assert result.exit_code == 1
    assert "error [INCOMPLETE_PUSH]" in result.output and "current release is untouched" in result.output
    assert f"delete {gamma_dir} from the remote" in result.output
    assert read(s3, bucket, "releases/main.json") == old_bytes
    # 1b. What an interrupted push leaves (DVC sends a folder's listing after its files): some files, no
    #     listing. The other half of gamma's own files is there.
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "fuseline/" + gamma_dir}]})
    for key in unique[: len(unique) // 2]:
        body = (new.root / ".dvc/cache" / key).read_bytes()
        s3.put_object(Bucket=bucket, Key="fuseline/" + key, Body=body)
    result = invoke(new, monkeypatch, "publish", "-r", "s3", "--no-push")
    assert result.exit_code == 1 and "error [INCOMPLETE_PUSH]" in result.output
    assert read(s3, bucket, "releases/main.json") == old_bytes

    # 2. A publish killed (SIGKILL) while its `dvc push` runs.
    proc = subprocess.Popen(
        [sys.executable, "-m", "fuseline.cli", "publish", "-r", "s3", "--project", str(new.root)],
        env={**new.env, **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}},
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _has_child(proc.pid, "push"):
        time.sleep(0.05)
    assert _has_child(proc.pid, "push"), "publish never started `dvc push`"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert read(s3, bucket, "releases/main.json") == old_bytes

    # 3. The re-run completes it.
    result = invoke(new, monkeypatch, "publish", "-r", "s3")
    assert result.exit_code == 0, result.output
    current = Release.from_json(read(s3, bucket, "releases/main.json"))
    assert sorted(current.templates) == list(TEMPLATES)
    assert missing_objects(store, [t.dir_md5 for t in current.templates.values()]) == []

    # Rollback restores the previous manifest, byte for byte; the list marks it current.
    previous = Release.from_json(old_bytes)
    result = invoke(
        new, monkeypatch, "release", "rollback", "-r", "s3", "-c", "main", "--to", previous.created
    )
    assert result.exit_code == 0, result.output
    assert read(s3, bucket, "releases/main.json") == old_bytes
    listed = invoke(new, monkeypatch, "release", "list", "-r", "s3").output.splitlines()
    assert [line[0] for line in listed] == ["*", " "] and previous.created in listed[0]

    # gc --remote keeps every object of every release and removes only an orphan planted here.
    orphan_md5 = hashlib.md5(b"orphan " + uuid.uuid4().bytes).hexdigest()
    s3.put_object(Bucket=bucket, Key="fuseline/" + object_key(orphan_md5), Body=b"orphan")
    before = {o["Key"] for o in _list_all(s3, bucket)}
    dry = invoke(new, monkeypatch, "gc", "--remote", "s3")
    assert dry.exit_code == 0, dry.output
    assert dry.output.splitlines() == [
        f"would remove s3://{bucket}/fuseline/{object_key(orphan_md5)}",
        "dry run: 1 items; re-run with --yes to delete them",
    ]
    assert {o["Key"] for o in _list_all(s3, bucket)} == before
    done = invoke(new, monkeypatch, "gc", "--remote", "s3", "--yes")
    assert done.exit_code == 0, done.output
    assert {o["Key"] for o in _list_all(s3, bucket)} == before - {"fuseline/" + object_key(orphan_md5)}
    for release in release_history(store):
        assert missing_objects(store, [t.dir_md5 for t in release.templates.values()]) == []


def read(s3, bucket: str, key: str) -> bytes:
    """An object under the remote's prefix (`fuseline/` in these tests)."""
    return s3.get_object(Bucket=bucket, Key="fuseline/" + key)["Body"].read()


def _list_all(s3, bucket: str) -> list[dict]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item for page in pages for item in page.get("Contents", [])]


def _has_child(pid: int, word: str) -> bool:
    """Whether a descendant of `pid` runs a command line containing `word` (Linux /proc)."""
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            if os.getpgid(int(status.parent.name)) != pid:
                continue
            cmdline = (status.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if any(arg == word.encode() for arg in cmdline) and b"dvc" in b" ".join(cmdline):
            return True
    return False


def test_gc_removes_outputs_and_lock_entries_of_removed_templates(build, monkeypatch):
    project = build.copy_of_c("gc")
    project.edit_catalog(lambda c: c["templates"].pop("gamma"))
    dry = invoke(project, monkeypatch, "gc")
    assert dry.exit_code == 0, dry.output
    would = [line for line in dry.output.splitlines() if line.startswith("would remove")]
    assert {
        "would remove dvc.lock entry fetch-loras@gamma",
        "would remove dvc.lock entry merge@gamma",
        "would remove dvc.lock entry verify@gamma",
        "would remove artifacts/models/gamma",
        "would remove artifacts/verify/gamma/metrics.json",
    } <= set(would)
    assert all("gamma" in line for line in would), would
    assert (project.root / "artifacts/models/gamma").is_dir()
    done = invoke(project, monkeypatch, "gc", "--yes")
    assert done.exit_code == 0, done.output
    assert not (project.root / "artifacts/models/gamma").exists()
    assert not (project.root / "artifacts/verify/gamma").exists()
    stages = project.lock()["stages"]
    assert "merge@gamma" not in stages and "verify@gamma" not in stages and "merge@alpha" in stages
    assert project.status() == {}
    assert invoke(project, monkeypatch, "gc").output.strip() == "nothing to collect"


def test_changed_templates_in_a_fresh_clone_is_only_the_edited_one(build):
    project = build.copy_of_c("plan")
    shutil.rmtree(project.root / "artifacts")  # a CI checkout has dvc.lock but no outputs
    shutil.rmtree(project.root / ".dvc" / "cache")
    assert project_changed_templates(project.root) == []
    project.edit_catalog(lambda c: c["templates"]["beta"]["loras"][0].update(scale=0.25))
    assert project_changed_templates(project.root) == ["beta"]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_ci_publish_restores_commits_the_lock_and_publishes(build, s3_server, tmp_path):
    """main.yml's publish job, `fuseline ci publish`, in a checkout of the commit the build jobs built (a git
    clone with a remote to push to, no dvc.lock, no outputs): it restores every stage from the run-cache the
    `fuseline ci build` jobs pushed (recomputing nothing), commits dvc.lock and pushes that commit, and
    writes a release with all three templates."""
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    work = clone(build.root / "commit", tmp_path / "checkout", build.env)
    _git(work.root, "init", "-q", "-b", "main")
    _git(work.root, "add", "-A")
    _git(
        work.root, "-c", "user.name=dev", "-c", "user.email=dev@example.invalid", "commit", "-qm", "templates"
    )
    _git(work.root, "remote", "add", "origin", str(origin))
    _git(work.root, "push", "-q", "-u", "origin", "main")
    point_s3_remote(work, build.bucket)

    output = fuseline_ci(work, "publish", "--remote", "s3", "--channel", "ci")
    assert RUNNING_STAGE.findall(output) == [], "the publish job recomputed a stage"
    log = _git(origin, "log", "--format=%an %s", "main")
    assert log.splitlines()[0].startswith("fuseline-ci dvc.lock: build ") and "[skip ci]" in log
    pushed_lock = yaml.safe_load(_git(origin, "show", "main:dvc.lock"))
    assert {f"merge@{t}" for t in TEMPLATES} <= set(pushed_lock["stages"])
    s3 = reader_client(s3_server)
    current = Release.from_json(
        s3.get_object(Bucket=build.bucket, Key="fuseline/" + release_key("ci"))["Body"].read()
    )
    assert sorted(current.templates) == list(TEMPLATES)
    assert current.git_commit == _git(work.root, "rev-parse", "HEAD").strip()
    # Run again: nothing to commit, a second release of the same models.
    fuseline_ci(work, "publish", "--remote", "s3", "--channel", "ci", "--no-push-lock")
    assert len(_git(origin, "log", "--format=%H", "main").splitlines()) == 2
