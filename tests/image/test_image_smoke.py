"""`make image-smoke`: the built worker image, run as a container the way RunPod runs it.

A scratch folder is mounted at /runpod-volume, FUSELINE_RELEASE points at a release of two tiny templates
on a local S3 server (SeaweedFS, through a recording proxy) and the container gets read-only keys for it;
the image's own entry point (its CMD, unchanged) runs RunPod's real job loop against a local stand-in for
RunPod's queue (testkit RunpodQueue), which hands it one job shaped like test_input.json. First start: the
worker syncs the release from S3 onto the mounted volume and answers with a PNG made inside the container.
Second start on the same volume: no model byte is fetched (counted at the proxy, not by the worker), and the
job is answered again. The timings from container start to first answer are written to
build/image-smoke/report.json.

Containers run with `buildah run --isolation chroot` (no Docker engine or registry here; podman's OCI
runtime cannot set rlimits in this sandbox). Chroot isolation shares the host's network, so 127.0.0.1 in
the container is the host's loopback, where the S3 server and the queue listen.

Needs the image (`make image`); these tests are deselected from `make test` by the `image` marker.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

from testkit.demo import Demo
from testkit.project import VENV_BIN, dvc_env
from testkit.runpod_queue import RunpodQueue
from testkit.servers import SeaweedS3
from tests.image.buildah import BUILDAH, IMAGE, REPO, build_info, buildah, image_command
from tests.worker.sync_fixtures import RecordingProxy

pytestmark = pytest.mark.image

SMOKE = REPO / "build" / "image-smoke"
TEMPLATES = ("dusk", "sketch")
BUCKET = "fuseline-smoke"
RELEASE = f"s3://{BUCKET}/fuseline/releases/main.json"
# test_input.json's shape, at the tiny kit models' native size.
JOB = {
    "template": "dusk",
    "prompt": "a lighthouse on a cliff at dusk, (golden hour:1.2), dramatic clouds, [people]",
    "negative_prompt": "lowres, blurry, watermark, text",
    "width": 64,
    "height": 64,
    "steps": 4,
    "guidance_scale": 4.5,
    "seed": 42,
    "output": {"format": "png"},
}
START_TIMEOUT_S = 600


@dataclass
class Credentials:
    access_key: str
    secret_key: str


@dataclass
class Start:
    """One container start: what it answered, what it logged, and when."""

    answer: dict
    records: list[dict]
    started: float  # wall clock (time.time()) just before `buildah run`
    answered: float  # wall clock when the queue held the answer
    objects_fetched: list = field(default_factory=list)

    def event(self, name: str) -> dict:
        found = [r for r in self.records if r.get("event") == name]
        assert found, f"no `{name}` record in the container's log: {[r.get('event') for r in self.records]}"
        return found[0]

    def at(self, record: dict) -> float:
        return datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("buildah") is None:
        pytest.fail("buildah is not installed: `make image-smoke` needs it (apt-get install buildah)")
    build_info()
    probe = subprocess.run([*BUILDAH, "inspect", "--type", "image", IMAGE], capture_output=True, text=True)
    assert probe.returncode == 0, f"no image {IMAGE} in buildah's storage: run `make image` first"
    return IMAGE


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Iterator[tuple[SeaweedS3, RecordingProxy, Credentials]]:
    """Two tiny templates built by the real pipeline (the demo's catalog; reused between runs under
    build/image-smoke/) and published to SeaweedFS with `fuseline publish --remote s3`; the container gets a
    second, read-only identity."""
    demo = Demo(SMOKE, list(TEMPLATES))
    demo.logs.mkdir(parents=True, exist_ok=True)
    project = demo.make_project(demo.build_sources())
    demo.build(project)

    reader = Credentials("smokereader" + os.urandom(4).hex(), os.urandom(24).hex())
    admin = Credentials("smokeadmin" + os.urandom(4).hex(), os.urandom(24).hex())
    config = tmp_path_factory.mktemp("s3-config") / "identities.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "publisher",
                        "credentials": [{"accessKey": admin.access_key, "secretKey": admin.secret_key}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    },
                    {
                        "name": "worker",
                        "credentials": [{"accessKey": reader.access_key, "secretKey": reader.secret_key}],
                        "actions": ["Read", "List"],
                    },
                ]
            }
        )
    )
    with SeaweedS3(
        access_key=admin.access_key, secret_key=admin.secret_key, extra_args=(f"-s3.config={config}",)
    ) as s3:
        s3.make_bucket(BUCKET)
        env = dvc_env(s3.env())
        dvc = str(VENV_BIN / "dvc")
        for args in (("url", f"s3://{BUCKET}/fuseline"), ("endpointurl", s3.endpoint_url)):
            subprocess.run([dvc, "remote", "modify", "s3", *args], cwd=project.root, env=env, check=True)
        publish = subprocess.run(
            [str(VENV_BIN / "fuseline"), "publish", "--remote", "s3", "--channel", "main"],
            cwd=project.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert publish.returncode == 0, publish.stdout[-2000:] + publish.stderr[-2000:]
        denied = subprocess.run(
            [
                str(VENV_BIN / "python"),
                "-c",
                f"import boto3; boto3.client('s3').put_object(Bucket={BUCKET!r}, Key='x', Body=b'')",
            ],
            env={**env, "AWS_ACCESS_KEY_ID": reader.access_key, "AWS_SECRET_ACCESS_KEY": reader.secret_key},
            capture_output=True,
            text=True,
        )
        assert "AccessDenied" in denied.stderr, "the worker's keys must be read-only"
        proxy = RecordingProxy(s3)
        yield s3, proxy, reader
        proxy.stop()


def run_container(image: str, volume: Path, proxy: RecordingProxy, reader: Credentials, log: Path) -> Start:
    """Start the image's entry point in a fresh container, hand it one job, return when it answered."""
    with RunpodQueue() as queue:
        job_id = queue.put(JOB)
        env = {
            "FUSELINE_RELEASE": RELEASE,
            "FUSELINE_DEFAULT_TEMPLATE": "dusk",
            # The kit models are 64 px natives; production keeps the 256 px floor.
            "FUSELINE_MIN_SIZE": "64",
            "AWS_ACCESS_KEY_ID": reader.access_key,
            "AWS_SECRET_ACCESS_KEY": reader.secret_key,
            "AWS_ENDPOINT_URL": proxy.url,
            "AWS_DEFAULT_REGION": proxy.s3.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            # The tiny models gain nothing from threads on a shared 2-core machine.
            "OMP_NUM_THREADS": "1",
            **queue.env(),
        }
        container = buildah("from", "--pull-never", "--quiet", image)
        flags = [f"--env={name}={value}" for name, value in env.items()]
        flags.append(f"--volume={volume}:/runpod-volume:rw")
        proxy.clear()
        started = time.time()
        with log.open("w") as out:
            process = subprocess.Popen(
                [*BUILDAH, "run", "--isolation", "chroot", *flags, container, "--", *image_command()],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            results = queue.wait([job_id], timeout=START_TIMEOUT_S, alive=lambda: process.poll() is None)
            answered = time.time()
        finally:
            process.kill()
            process.wait(30)
            buildah("rm", container)
        assert job_id in results, (
            f"no answer; the container exited {process.returncode}:\n{log.read_text()[-4000:]}"
        )
        assert not queue.protocol_errors(), queue.protocol_errors()
    records = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    fetched = [s for s in proxy.seen if s.method == "GET" and "/files/md5/" in s.path]
    return Start(results[job_id], records, started, answered, fetched)


def assert_png_from_the_release(start: Start, volume: Path) -> Image.Image:
    assert "error" not in start.answer, start.answer
    output = start.answer["output"]
    (image,) = output["images"]
    picture = Image.open(io.BytesIO(base64.b64decode(image["data"])))
    picture.load()
    assert (picture.format, picture.size) == ("PNG", (64, 64))
    manifest = json.loads((volume / "models" / "dusk" / "fuseline.json").read_text())
    assert output["template"]["model_hash"] == manifest["spec_hash"]
    assert output["degraded"] is False
    return picture


def phases(start: Start) -> dict[str, float]:
    """Seconds from container start to first answer, split by the container's own log records."""
    first = start.at(start.records[0])
    began = start.event("worker.start")
    sync = (began.get("sync") or {}).get("seconds") or 0.0
    loaded = start.event("template.loaded")
    done = start.event("job.done")
    return {
        "interpreter_and_imports": round(first - start.started, 2),
        "sync": round(sync, 2),
        "pipeline_load": round(loaded["load_ms"] / 1000, 2),
        "self_check": round(start.at(began) - start.at(loaded), 2),
        "generation": round(done["inference_ms"] / 1000, 2),
        "job_total": round(done["total_ms"] / 1000, 2),
        "start_to_first_answer": round(start.answered - start.started, 2),
    }


def test_container_syncs_from_s3_then_answers_and_a_second_start_fetches_nothing(image, published):
    _, proxy, reader = published
    SMOKE.mkdir(parents=True, exist_ok=True)
    volume = Path(tempfile.mkdtemp(prefix="runpod-volume-", dir=SMOKE))
    try:
        first = run_container(image, volume, proxy, reader, SMOKE / "first-start.log")
        first_png = assert_png_from_the_release(first, volume)
        assert first.objects_fetched, "the first start fetched nothing from S3"
        for template in TEMPLATES:
            assert (volume / "models" / template / "model_index.json").is_file(), template
        assert sorted(first.event("worker.start")["templates_synced"]) == sorted(TEMPLATES)

        second = run_container(image, volume, proxy, reader, SMOKE / "second-start.log")
        second_png = assert_png_from_the_release(second, volume)
        assert second.objects_fetched == [], [s.path for s in second.objects_fetched]
        assert second_png.tobytes() == first_png.tobytes(), "same seed, same model: same pixels"

        report = {
            "image": image,
            "command": image_command(),
            "first_start": phases(first)
            | {
                "objects_fetched": len(first.objects_fetched),
                "bytes_fetched": sum(s.sent for s in first.objects_fetched),
            },
            "second_start": phases(second) | {"objects_fetched": 0},
        }
        (SMOKE / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(volume, ignore_errors=True)


def test_every_package_in_the_image_is_the_locked_one(image):
    """`pip freeze` inside the image names exactly the pins of requirements/worker.lock."""
    locked = {}
    for line in (REPO / "requirements" / "worker.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match:
            locked[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    container = buildah("from", "--pull-never", "--quiet", image)
    try:
        frozen = buildah(
            "run", "--isolation", "chroot", container, "--", "python", "-m", "pip", "freeze", "--all"
        )
    finally:
        buildah("rm", container)
    installed = {}
    for line in frozen.splitlines():
        name, _, version = line.partition("==")
        installed[re.sub(r"[-_.]+", "-", name).lower()] = version
    installed.pop("pip", None)  # the venv's own installer, from the base's ensurepip
    assert installed == locked
