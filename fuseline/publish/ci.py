"""What the CI workflows run, as functions behind `fuseline ci plan|build|publish`, so that every step of
`.github/workflows/main.yml` and `pr.yml` is a command the tests here run too.

- plan: the templates a merge rebuilds (`dvc status` against the committed dvc.lock), as a JSON list, also
  appended to `$GITHUB_OUTPUT` (`templates=[...]`, the build matrix) and `$GITHUB_STEP_SUMMARY` when set.
- build: one matrix job: `dvc repro --pull verify@<id>...` (unchanged upstream stages come from the
  run-cache) then `dvc push --run-cache` to the shared remote.
- publish: the final job: `dvc repro --pull` (restores every stage from the run-cache), drop the outputs of
  removed templates, commit dvc.lock (and push the commit), then `fuseline publish`.

DVC's and git's output goes straight through to the job log; a failure raises PublishError naming the
command and its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from fuseline.core.redact import redact
from fuseline.publish.errors import PublishError
from fuseline.publish.gc import find_local_garbage, remove_local_garbage
from fuseline.publish.project import dvc_bin, project_changed_templates, read_lock
from fuseline.publish.releases import PublishResult, publish

LOCK_COMMIT_AUTHOR = ("fuseline-ci", "fuseline-ci@users.noreply.github.com")


def _run(root: Path, command: list[str], what: str) -> None:
    """Run a command in the project with its output going to ours (the CI log); fail with its last line."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(command, cwd=root, env=env, stderr=subprocess.PIPE, text=True, check=False)
    if proc.stderr:
        print(redact(proc.stderr), end="", flush=True)
    if proc.returncode != 0:
        last = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), "no output")
        raise PublishError("CI_STEP_FAILED", f"{what} exited {proc.returncode}: {redact(last.strip())}")


def _dvc(root: Path, *args: str) -> None:
    _run(root, [dvc_bin(), *args], f"`dvc {' '.join(args)}`")


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = redact((proc.stderr.strip().splitlines() or ["no output"])[-1])
        raise PublishError("CI_STEP_FAILED", f"`git {' '.join(args)}` exited {proc.returncode}: {last}")
    return proc.stdout


def plan(root: Path, github_output: Path | None = None, summary: Path | None = None) -> list[str]:
    """The templates to rebuild; appended to the GitHub output and step-summary files when given."""
    templates = project_changed_templates(root)
    text = json.dumps(templates)
    if github_output is not None:
        with github_output.open("a") as handle:
            handle.write(f"templates={text}\n")
    if summary is not None:
        with summary.open("a") as handle:
            handle.write(f"### Templates that would rebuild\n\n`{text}`\n")
    return templates


def use_remote(root: Path, remote: str) -> None:
    """Make `remote` the project's default in the uncommitted .dvc/config.local (`dvc repro --pull` and the
    run-cache use the default remote); the committed config keeps its own default."""
    _dvc(root, "remote", "default", "--local", remote)


def build(root: Path, templates: list[str], remote: str) -> None:
    """One CI build job: rebuild the templates' stages, restoring what is unchanged from the run-cache, then
    push their outputs and run-cache entries so that the publish job and other jobs can restore them."""
    if not templates:
        raise PublishError("CI_NOTHING_TO_BUILD", "no template given: pass the template ids to build")
    use_remote(root, remote)
    _dvc(root, "repro", "--pull", *(f"verify@{template}" for template in templates))
    _dvc(root, "push", "--run-cache", "-r", remote)


def commit_lock(root: Path, push: bool) -> bool:
    """Commit dvc.lock when it changed (and push the commit to the branch's upstream); True if committed."""
    if not _git(root, "status", "--porcelain", "--", "dvc.lock").strip():
        return False
    name, email = LOCK_COMMIT_AUTHOR
    sha = _git(root, "rev-parse", "--short=12", "HEAD").strip()
    _git(root, "add", "dvc.lock")
    _git(root, "-c", f"user.name={name}", "-c", f"user.email={email}", "commit", "-q", "-m",
         f"dvc.lock: build {sha} [skip ci]")  # fmt: skip
    if push:
        _git(root, "push", "-q")
    return True


def publish_job(root: Path, remote: str, channel: str, *, commit: bool, push_commit: bool) -> PublishResult:
    """The final CI job: restore every stage from the run-cache (nothing is recomputed for templates the
    build jobs made), drop removed templates' outputs and lock entries, commit dvc.lock, publish."""
    use_remote(root, remote)
    _dvc(root, "repro", "--pull")
    garbage = find_local_garbage(root)
    if garbage.stages or garbage.paths:
        remove_local_garbage(root, garbage)
    if not read_lock(root).get("stages"):
        lock = root / "dvc.lock"
        raise PublishError("CI_NOTHING_BUILT", f"{lock} records no stage after `dvc repro --pull`")
    if commit:
        commit_lock(root, push_commit)
    return publish(root, remote_name=remote, channel=channel)
