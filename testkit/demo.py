"""`make demo`: fuseline's whole main job on the embedded default, real code end to end, offline on CPU.

    python -m testkit.demo [--output DIR] [--template ID ...]

Builds tiny source models (a single-file SDXL-layout checkpoint, LoRAs, a VAE), runs the real `dvc repro`
on a demo catalog in a scratch project, publishes to the project's embedded local remote, syncs a scratch
volume with the worker's sync code, starts the worker's local API, sends it one real request per template
and writes each PNG and JSON answer to the output folder. Everything lives under the output folder
(default `demo-output/`: sources/, project/ with its remote in project/.dvc-remote/, volume/, logs/), and a
second run reuses it: the kit is kept, `dvc repro` runs nothing, publish and sync find nothing to do.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fuseline.publish.project import built_templates, released_template, stale_templates
from fuseline.publish.releases import missing_objects, publish, read_release
from fuseline.remote.stores import open_store, read_remote_config
from testkit.project import REPO, RUNNING_STAGE, VENV_BIN, DvcProject, dvc_env, make_dvc_project
from testkit.servers import free_port, set_parent_death_signal

DEFAULT_OUTPUT = REPO / "demo-output"
CHANNEL = "main"
# The tiny kit models are trained for nothing; 64 px is their native size (8 latent pixels).
SIZE = 64
PROMPT = "a lighthouse on a cliff at dusk, (golden hour:1.2), dramatic clouds, [people]"
SEED = 42
# Small enough that the tiny UNet (~2 MB in fp16) is written as several shards, so sharding runs for real.
PARAMS = {"merge": {"shard_size_mb": 0.5}, "verify": {"steps": 2, "width": SIZE, "height": SIZE}}
# Two templates on the kit checkpoint with different LoRAs and scales: (kit LoRA name, scale) in fusing
# order, and the generation defaults the worker applies when a request leaves a parameter out.
TEMPLATES: dict[str, dict[str, Any]] = {
    "dusk": {
        "loras": [("kohya_sgm", 0.8)],
        "defaults": {"steps": 6, "guidance_scale": 5.0, "negative_prompt": "lowres, blurry"},
    },
    "sketch": {
        "loras": [("locon", 0.6), ("kohya_te", 0.5)],
        "defaults": {"steps": 4, "guidance_scale": 3.0},
    },
}
# Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads spinning against other
# processes made one 64 px generation 15x slower (tests/worker/conftest.py measured it). Respected if set.
TORCH_THREADS = "1"
WORKER_READY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 300
WORKER_STOP_TIMEOUT_S = 20


class DemoFailed(Exception):
    """One demo step failed: which step, why, and the log holding the details."""

    def __init__(self, step: str, message: str, log: Path | None = None) -> None:
        self.step, self.message, self.log = step, message, log
        where = f" (log: {log})" if log else ""
        super().__init__(f"demo step '{step}' failed: {message}{where}")


@dataclass
class StepRecord:
    name: str
    seconds: float
    produced: list[str] = field(default_factory=list)


@dataclass
class DemoResult:
    output: Path
    templates: list[str]
    steps: list[StepRecord] = field(default_factory=list)
    stages_run: list[str] = field(default_factory=list)
    published: bool = False
    release_created: str = ""
    release_path: str = ""
    sync_status: dict[str, str] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    answers: dict[str, str] = field(default_factory=dict)
    previews: dict[str, str] = field(default_factory=dict)
    worker_pid: int | None = None
    seconds: float = 0.0

    def to_json(self) -> str:
        data = asdict(self)
        data["output"] = str(self.output)
        return json.dumps(data, indent=2) + "\n"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _rel(path: Path) -> str:
    """A path as the user typed it when it lies under the current directory, else absolute."""
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(Path.cwd()))
    return str(path)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------- the catalog


def demo_catalog(kit: Any, template_ids: Sequence[str]) -> dict[str, Any]:
    """templates.json for the demo: `file:` sources into the kit, single files pinned by sha256 so that
    a rebuilt kit with other bytes re-runs the stages using it (an unpinned file: change goes unnoticed)."""

    def lora(name: str, scale: float) -> dict[str, Any]:
        path = kit.loras[name]
        return {"source": f"file:{path}", "sha256": _sha256(path), "scale": scale}

    return {
        "version": 1,
        "vae": {"source": f"file:{kit.vae_dir}"},
        "checkpoints": {
            "tiny-sdxl": {
                "source": f"file:{kit.single_file}",
                "sha256": _sha256(kit.single_file),
                "prediction": "epsilon",
                "config": f"file:{kit.config_dir}",
            }
        },
        "templates": {
            tid: {
                "checkpoint": "tiny-sdxl",
                "loras": [lora(name, scale) for name, scale in TEMPLATES[tid]["loras"]],
                "defaults": TEMPLATES[tid]["defaults"],
            }
            for tid in template_ids
        },
    }


def use_embedded_remote(project: DvcProject) -> str:
    """Give the scratch project the remotes (and default remote) the repo's .dvc/config ships; returns the
    default remote's name. A relative local url resolves against the project's own .dvc/ folder."""
    from configobj import ConfigObj

    shipped_path = REPO / ".dvc" / "config"
    if not shipped_path.is_file():
        raise RuntimeError(
            f"{shipped_path} not found: the repo ships its default remote there (fix: restore it from git)"
        )
    shipped = ConfigObj(str(shipped_path))
    default = shipped.get("core", {}).get("remote")
    if not default:
        raise RuntimeError(f"{shipped_path}: [core] has no `remote` (fix: `dvc remote default local`)")
    config = ConfigObj(str(project.root / ".dvc" / "config"))
    config.setdefault("core", {})["remote"] = default
    for section in shipped:
        if section.startswith("remote "):
            config[section] = dict(shipped[section])
    config.write()
    return default


# --------------------------------------------------------------------------------------- subprocesses


def stream_command(
    args: Sequence[str], *, cwd: Path, env: dict[str, str], log: Path, prefix: str = "    │ "
) -> tuple[int, str]:
    """Run a command, echoing each output line as it comes and writing all of it to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    with log.open("w") as handle:
        handle.write(f"$ {' '.join(args)}  (in {cwd})\n")
        proc = subprocess.Popen(
            list(args),
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            # Its own process group, so an interrupt stops dvc and the stage process it runs; and killed
            # with the demo even when the demo itself is killed.
            start_new_session=True,
            preexec_fn=set_parent_death_signal,
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.append(line)
                handle.write(line)
                handle.flush()
                _say(prefix + line.rstrip("\n"))
        except BaseException:
            # Interrupted (Ctrl-C): leave no dvc or stage process running behind us.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        code = proc.wait()
    return code, "".join(lines)


def _post_json(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class WorkerProcess:
    """`python -m worker.handler --rp_serve_api` on 127.0.0.1; stopped by `stop()` (idempotent)."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT_S) -> float:
        """Seconds until the API accepts connections (after startup() loaded the default template)."""
        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the worker exited with status {self.proc.returncode} before serving:\n"
                    + _log_tail(self.log)
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"the worker API did not open port {self.port} within {timeout:.0f} s")
            time.sleep(0.25)

    def runsync(self, job: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        try:
            return _post_json(f"{self.url}/runsync", job, timeout)
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")[:500]
            raise RuntimeError(f"POST {self.url}/runsync answered HTTP {exc.code}: {body}") from None

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=WORKER_STOP_TIMEOUT_S)


def worker_env(
    volume: Path, template_ids: Sequence[str], spec_hashes: dict[str, str], release: str | None
) -> dict[str, str]:
    """The worker's settings: this volume, these templates (the first is the default), checked against
    the release's spec hashes; with `release`, the worker's start-up sync runs too (a no-op once synced)."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "DVC_NO_ANALYTICS": "1",
            "FUSELINE_VOLUME": str(volume),
            "FUSELINE_DEFAULT_TEMPLATE": template_ids[0],
            "FUSELINE_PRELOAD": ",".join(template_ids),
            "FUSELINE_MIN_SIZE": str(SIZE),
            "FUSELINE_DEVICE": "cpu",
            # The worker refuses a folder whose manifest is not the one the release names.
            "FUSELINE_SPEC_HASHES": json.dumps(spec_hashes, sort_keys=True),
            # The worker code comes from this checkout even where it is not installed.
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.setdefault("OMP_NUM_THREADS", TORCH_THREADS)
    # Never a release from the caller's environment: the demo serves only what it built and published.
    env.pop("FUSELINE_RELEASE", None)
    if release:
        env["FUSELINE_RELEASE"] = release
    # Without these the worker would run RunPod's real job loop instead of the local API.
    for name in ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_WEBHOOK_POST_OUTPUT", "RUNPOD_REALTIME_PORT"):
        env.pop(name, None)
    return env


@contextlib.contextmanager
def running_worker(
    volume: Path,
    template_ids: Sequence[str],
    spec_hashes: dict[str, str],
    log: Path,
    workdir: Path,
    release: str | None = None,
) -> Iterator[WorkerProcess]:
    """The worker's local API for the duration of the block; stopped on the way out, also on failure."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.handler",
                "--rp_serve_api",
                "--rp_api_host",
                "127.0.0.1",
                "--rp_api_port",
                str(port),
            ],
            # Its own folder: runpod looks for test_input.json in the working directory.
            cwd=workdir,
            env=worker_env(volume, template_ids, spec_hashes, release),
            stdout=handle,
            stderr=subprocess.STDOUT,
            # Dies with the demo even when the demo is killed (SIGKILL included): no orphan worker API.
            preexec_fn=set_parent_death_signal,
        )
        worker = WorkerProcess(proc, port, log)
        try:
            yield worker
        finally:
            worker.stop()


def demo_job(template: str) -> dict[str, Any]:
    """A request like test_input.json's, at the tiny models' size; steps and CFG come from the template."""
    return {
        "input": {
            "template": template,
            "prompt": PROMPT,
            "width": SIZE,
            "height": SIZE,
            "seed": SEED,
            "output": {"format": "png"},
        }
    }


def serve_requests(
    volume: Path,
    template_ids: Sequence[str],
    spec_hashes: dict[str, str],
    output: Path,
    logs: Path,
    release: str | None = None,
    on_ready: Callable[[WorkerProcess, float], None] | None = None,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Start the worker API on `volume`, send one request per template, write `image-<id>.png` and
    `answer-<id>.json` under `output`; returns the answers and the worker's pid (stopped by then)."""
    answers: dict[str, dict[str, Any]] = {}
    with running_worker(
        volume, template_ids, spec_hashes, logs / "worker.log", output / "worker", release
    ) as worker:
        ready_s = worker.wait_ready()
        if on_ready:
            on_ready(worker, ready_s)
        for template in template_ids:
            answer = worker.runsync(demo_job(template))
            answer_path = output / f"answer-{template}.json"
            answer_path.write_text(json.dumps(answer, indent=2) + "\n")
            if answer.get("status") != "COMPLETED":
                raise RuntimeError(
                    f"the worker answered {answer.get('status')} for template {template!r}: "
                    f"{answer.get('error', answer)} (answer: {answer_path})"
                )
            image = answer["output"]["images"][0]
            (output / f"image-{template}.png").write_bytes(base64.b64decode(image["data"]))
            answers[template] = answer
    return answers, worker.proc.pid


# ---------------------------------------------------------------------------------------- the demo


class Demo:
    def __init__(self, output: Path, template_ids: Sequence[str], sources: Path | None = None) -> None:
        unknown = sorted(set(template_ids) - set(TEMPLATES))
        if unknown or not template_ids:
            raise ValueError(f"unknown demo template(s) {unknown}; choose from {sorted(TEMPLATES)}")
        self.output = Path(output).resolve()
        self.sources = Path(sources).resolve() if sources else self.output / "sources"
        self.project_dir = self.output / "project"
        self.volume = self.output / "volume"
        self.logs = self.output / "logs"
        self.template_ids = list(template_ids)
        self.result = DemoResult(output=self.output, templates=self.template_ids)

    @contextlib.contextmanager
    def step(self, name: str, what: str, log: Path | None = None) -> Iterator[StepRecord]:
        """Print the step as it starts and ends; any failure becomes DemoFailed naming the step and a log
        (the step's own log, or logs/<step>.log with the traceback)."""
        record = StepRecord(name, 0.0)
        _say(f"\n▶ [{name}] {what}")
        started = time.monotonic()
        try:
            yield record
        except DemoFailed:
            _say(f"✘ [{name}] failed after {time.monotonic() - started:.1f} s")
            raise
        except Exception as exc:
            record.seconds = time.monotonic() - started
            trace_log = self.logs / f"{name}.log"
            self.logs.mkdir(parents=True, exist_ok=True)
            with trace_log.open("a") as handle:
                handle.write(traceback.format_exc())
            message = str(exc).strip() or type(exc).__name__
            _say(f"✘ [{name}] failed after {record.seconds:.1f} s")
            raise DemoFailed(name, message, log or trace_log) from exc
        record.seconds = time.monotonic() - started
        self.result.steps.append(record)
        _say(f"✔ [{name}] {record.seconds:.1f} s")
        for line in record.produced:
            _say(f"    {line}")

    def run(self) -> DemoResult:
        started = time.monotonic()
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            message = f"cannot create {self.logs}: {exc.strerror}; pick another --output"
            raise DemoFailed("setup", message) from exc
        kit = self.build_sources()
        project = self.make_project(kit)
        self.build(project)
        release = self.publish(project)
        self.sync(release)
        self.serve({t: release.templates[t].spec_hash for t in self.template_ids})
        self.copy_previews(project)
        self.result.seconds = time.monotonic() - started
        (self.output / "summary.json").write_text(self.result.to_json())
        return self.result

    def build_sources(self):
        from testkit.models import MARKER_NAME, build_kit, kit_fingerprint

        with self.step("sources", f"tiny source models -> {_rel(self.sources)}") as rec:
            try:
                marker = json.loads((self.sources / MARKER_NAME).read_text())
            except (OSError, ValueError):
                marker = {}
            # build_kit keeps a kit only when it was built by the same kit sources and library versions.
            reused = marker.get("fingerprint") == kit_fingerprint()
            kit = build_kit(self.sources)
            used = sorted({name for t in self.template_ids for name, _ in TEMPLATES[t]["loras"]})
            rec.produced = [
                f"{'reused' if reused else 'built'}: checkpoint {_rel(kit.single_file)} "
                f"({_mb(_size(kit.single_file))}, SGM single-file layout), VAE {_rel(kit.vae_dir)}",
                "LoRAs used: " + ", ".join(f"{name} ({_mb(_size(kit.loras[name]))})" for name in used),
            ]
        return kit

    def make_project(self, kit) -> DvcProject:
        from fuseline.core.catalog.loading import load_catalog

        with self.step("project", f"scratch DVC project -> {_rel(self.project_dir)}") as rec:
            fresh = not (self.project_dir / ".dvc").is_dir()
            project = make_dvc_project(self.project_dir, demo_catalog(kit, self.template_ids), PARAMS)
            remote = use_embedded_remote(project)
            # The same validation `fuseline validate` does: a bad catalog fails here, not in a stage.
            load_catalog(project.catalog_path)
            rec.produced = [
                f"{'created' if fresh else 'refreshed'}: templates.json with "
                f"{', '.join(self.template_ids)} on checkpoint tiny-sdxl; default remote '{remote}'",
            ]
        return project

    def build(self, project: DvcProject) -> None:
        log = self.logs / "dvc-repro.log"
        with self.step("build", "dvc repro (stage output follows)", log) as rec:
            env = dvc_env({"PYTHONUNBUFFERED": "1"})
            env.setdefault("OMP_NUM_THREADS", TORCH_THREADS)
            code, text = stream_command([str(VENV_BIN / "dvc"), "repro"], cwd=project.root, env=env, log=log)
            if code != 0:
                # DVC's own last ERROR line names the stage that failed and its command.
                errors = [line[len("ERROR: ") :] for line in text.splitlines() if line.startswith("ERROR: ")]
                cause = f": {errors[-1].strip()}" if errors else ""
                raise DemoFailed("build", f"`dvc repro` exited {code} in {project.root}{cause}", log)
            ran = RUNNING_STAGE.findall(text)
            self.result.stages_run = ran
            models = project.root / "artifacts" / "models"
            rec.produced = [
                f"stages run: {', '.join(ran)}" if ran else "stages run: none (everything up to date)",
                *(
                    f"{_rel(models / t)}: {_mb(_size(models / t))}, "
                    f"{sum(1 for p in (models / t).rglob('*') if p.is_file())} files"
                    for t in self.template_ids
                ),
            ]

    def publish(self, project: DvcProject):
        with self.step("publish", f"push + release '{CHANNEL}' to the embedded local remote") as rec:
            root = project.root
            remote = read_remote_config(root)
            store = open_store(remote)
            release = _current_release_if_up_to_date(root, store)
            if release is None:
                from stages.archive import archive_sources
                from stages.settings import BuildSettings

                settings = BuildSettings.from_env()
                result = publish(
                    root,
                    channel=CHANNEL,
                    archive_sources=lambda root, store: archive_sources(root, store, settings),
                )
                release = result.release
                self.result.published = True
            path = Path(remote.url) / "releases" / f"{CHANNEL}.json"
            self.result.release_created = release.created
            self.result.release_path = str(path)
            rec.produced = [
                f"{'published' if self.result.published else 'up to date, nothing pushed'}: "
                f"{CHANNEL}@{release.created} -> {_rel(path)}",
                *(
                    f"{t}: {entry.dir_md5} ({entry.nfiles} files, {_mb(entry.size)})"
                    for t, entry in sorted(release.templates.items())
                ),
            ]
        return release

    def sync(self, release) -> None:
        from worker.sync.templates import sync_templates

        with self.step("sync", f"worker sync of the release onto {_rel(self.volume)}") as rec:
            report = sync_templates(self.result.release_path, self.volume, self.template_ids)
            self.result.sync_status = {t.template: t.status for t in report.templates}
            if not report.ok:
                raise RuntimeError("; ".join(report.lines()))
            statuses = ", ".join(f"{t}: {status}" for t, status in self.result.sync_status.items())
            rec.produced = [f"volume at the release's version ({statuses})", *report.lines()[1:]]

    def serve(self, spec_hashes: dict[str, str]) -> None:
        log = self.logs / "worker.log"
        what = f"worker local API on 127.0.0.1, one /runsync request per template (log {_rel(log)})"
        with self.step("serve", what, log) as rec:

            def ready(worker: WorkerProcess, seconds: float) -> None:
                self.result.worker_pid = worker.proc.pid
                _say(f"    worker pid {worker.proc.pid} serving {worker.url} after {seconds:.1f} s")

            answers, pid = serve_requests(
                self.volume,
                self.template_ids,
                spec_hashes,
                self.output,
                self.logs,
                release=self.result.release_path or None,
                on_ready=ready,
            )
            self.result.worker_pid = pid
            rec.produced.append(f"{len(answers)} request(s) answered COMPLETED, worker pid {pid} stopped")
            for template, answer in answers.items():
                out = answer["output"]
                self.result.images[template] = str(self.output / f"image-{template}.png")
                self.result.answers[template] = str(self.output / f"answer-{template}.json")
                params, timings = out["parameters"], out["timings_ms"]
                rec.produced.append(
                    f"{template}: {_rel(self.output / f'image-{template}.png')} "
                    f"{params['width']}x{params['height']}, {params['steps']} steps, "
                    f"cfg {params['guidance_scale']}, seed {out['images'][0]['seed']}; "
                    f"load {timings['load']:.0f} ms, inference {timings['inference']:.0f} ms"
                )

    def copy_previews(self, project: DvcProject) -> None:
        with self.step("previews", "copy each template's verify preview") as rec:
            for template in self.template_ids:
                src = project.root / "artifacts" / "verify" / template / "preview.png"
                dst = self.output / f"preview-{template}.png"
                shutil.copyfile(src, dst)
                self.result.previews[template] = str(dst)
                metrics = json.loads((src.parent / "metrics.json").read_text())
                shown = {k: metrics[k] for k in ("black_fraction", "std") if k in metrics}
                rec.produced.append(f"{_rel(dst)} {shown if shown else ''}".rstrip())


def _current_release_if_up_to_date(root: Path, store):
    """The channel's current release when it already serves exactly what dvc.lock holds and all its
    objects are on the remote (then publishing again would only add a duplicate history entry)."""
    current = read_release(store, CHANNEL)
    if current is None:
        return None
    built = built_templates(root)
    if stale_templates(root, built):
        return None  # publish() itself refuses, with the message that says what to run
    wanted = {t: released_template(root, b) for t, b in built.items()}
    if current.templates != wanted:
        return None
    if missing_objects(store, [b.dir_md5 for b in built.values()]):
        return None
    return current


def print_summary(result: DemoResult) -> None:
    _say(f"\nfuseline demo done in {result.seconds:.1f} s ({_rel(result.output)})")
    width = max(len(s.name) for s in result.steps)
    for record in result.steps:
        headline = record.produced[0] if record.produced else ""
        _say(f"  {record.name:<{width}}  {record.seconds:6.1f} s  {headline}")
    _say("outputs:")
    for template in result.templates:
        _say(
            f"  {template}: {_rel(Path(result.images[template]))}, {_rel(Path(result.answers[template]))}, "
            f"{_rel(Path(result.previews[template]))}"
        )
    _say(f"  summary: {_rel(result.output / 'summary.json')}")


def main(
    output: Path | str = DEFAULT_OUTPUT,
    template_ids: Sequence[str] | None = None,
    sources: Path | str | None = None,
) -> DemoResult:
    """Run the whole demo into `output`; raises DemoFailed (step, message, log) on the first failure."""
    # Every child (dvc, its stages, the worker) inherits these: nothing goes online or phones home.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["DVC_NO_ANALYTICS"] = "1"
    demo = Demo(Path(output), list(template_ids or TEMPLATES), Path(sources) if sources else None)
    result = demo.run()
    print_summary(result)
    return result


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testkit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="default: demo-output/")
    parser.add_argument(
        "--template",
        action="append",
        dest="templates",
        choices=sorted(TEMPLATES),
        help="repeatable; default: all demo templates",
    )
    args = parser.parse_args(argv)
    try:
        main(args.output, args.templates)
    except DemoFailed as exc:
        _say(f"\nerror: {exc}")
        if exc.log:
            tail = _log_tail(exc.log)
            if tail:
                _say(f"--- last lines of {exc.log}\n{tail}")
        return 1
    except KeyboardInterrupt:
        _say("\ninterrupted")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
