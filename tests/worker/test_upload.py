"""S3 image output against a real S3 server (SeaweedFS): keys, content types, presigned URLs that download,
the settings that configure it, and failures that name the fix without leaking a credential."""

from __future__ import annotations

import base64
import io
import re
import time
import uuid
from collections.abc import Iterator

import pytest
import requests
from PIL import Image

from fuseline.core.errors import ConfigInvalid
from fuseline.core.redact import redact
from testkit.servers import SeaweedS3, free_port
from tests.worker.conftest import SMALL, TEMPLATE
from worker.errors import UploadFailed, UploadNotConfigured
from worker.handler import get_worker, handler
from worker.inputs import parse_input
from worker.serving import Worker
from worker.settings import WorkerSettings, load_settings
from worker.upload import ImageUploader, object_key

BATCH_KEY = re.compile(
    r"^(?P<prefix>.*/)?(?P<batch>[0-9a-f]{32})/(?P<index>\d+)-(?P<seed>\d+)\.(?P<ext>\w+)$"
)


def png_bytes(color: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format={"jpeg": "JPEG", "webp": "WEBP"}[fmt])
    return buffer.getvalue()


@pytest.fixture(scope="module")
def aws_like_s3() -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 that, like AWS, refuses uploads to a bucket that does not exist (by default `weed`
    creates the bucket on the first PUT of an admin identity, which would hide a misnamed bucket)."""
    with SeaweedS3(extra_args=("-s3.autoCreateBucket=false",)) as server:
        yield server


@pytest.fixture
def s3_bucket(aws_like_s3: SeaweedS3) -> str:
    return aws_like_s3.make_bucket(f"out-{uuid.uuid4().hex[:16]}")


@pytest.fixture
def s3_env(aws_like_s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    """The process's AWS_* pointing at this module's S3 server, as a deployment sets them."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in aws_like_s3.env().items():
        monkeypatch.setenv(name, value)
    return aws_like_s3


def listed(server: SeaweedS3, bucket: str) -> list[str]:
    return sorted(item["Key"] for item in server.client().list_objects_v2(Bucket=bucket).get("Contents", []))


# ------------------------------------------------------------------------------------------ keys


def test_object_key_layout() -> None:
    assert object_key("fuseline/images", "ab12", 0, 42, "png") == "fuseline/images/ab12/0-42.png"
    assert object_key("", "ab12", 3, 2**64 - 1, "jpeg") == f"ab12/3-{2**64 - 1}.jpg"
    assert object_key("p", "ab12", 1, 7, "webp") == "p/ab12/1-7.webp"


# ------------------------------------------------------------------------------------ uploads


def test_each_image_is_put_under_one_job_folder_and_its_url_downloads_it(s3_env, s3_bucket) -> None:
    images = [png_bytes((255, 0, 0)), png_bytes((0, 0, 255))]
    uploader = ImageUploader(s3_bucket, prefix="fuseline/images", url_expiry_s=600)
    results = uploader.upload(images, "png", [7, 8])

    assert [set(r) for r in results] == [{"url", "key", "format", "seed"}] * 2
    assert [(r["format"], r["seed"]) for r in results] == [("png", 7), ("png", 8)]
    keys = [BATCH_KEY.match(r["key"]) for r in results]
    assert all(keys), [r["key"] for r in results]
    assert {m["prefix"] for m in keys} == {"fuseline/images/"}
    assert keys[0]["batch"] == keys[1]["batch"]
    assert [(m["index"], m["seed"], m["ext"]) for m in keys] == [("0", "7", "png"), ("1", "8", "png")]
    assert listed(s3_env, s3_bucket) == sorted(r["key"] for r in results)

    for result, data in zip(results, images, strict=True):
        # A presigned GET: no credentials of the caller, only the URL.
        assert "X-Amz-Signature=" in result["url"] and "X-Amz-Expires=600" in result["url"]
        response = requests.get(result["url"], timeout=10)
        assert response.status_code == 200, response.text
        assert response.content == data
        assert response.headers["Content-Type"] == "image/png"
        head = s3_env.client().head_object(Bucket=s3_bucket, Key=result["key"])
        assert head["ContentType"] == "image/png"


def test_a_second_job_gets_its_own_folder(s3_env, s3_bucket) -> None:
    uploader = ImageUploader(s3_bucket)
    first = uploader.upload([png_bytes((1, 2, 3))], "png", [5])[0]["key"]
    second = uploader.upload([png_bytes((1, 2, 3))], "png", [5])[0]["key"]
    assert first != second and first.endswith("/0-5.png") and second.endswith("/0-5.png")
    assert BATCH_KEY.match(first)["prefix"] is None  # no prefix configured: the job folder is at the root


@pytest.mark.parametrize(
    ("fmt", "content_type", "ext"), [("jpeg", "image/jpeg", "jpg"), ("webp", "image/webp", "webp")]
)
def test_other_formats_carry_their_content_type(s3_env, s3_bucket, fmt, content_type, ext) -> None:
    data = encoded(fmt)
    (result,) = ImageUploader(s3_bucket).upload([data], fmt, [1])
    assert result["key"].endswith(f"/0-1.{ext}") and result["format"] == fmt
    response = requests.get(result["url"], timeout=10)
    assert response.status_code == 200 and response.content == data
    assert response.headers["Content-Type"] == content_type


def test_a_batch_that_fails_midway_leaves_no_object(s3_env, s3_bucket) -> None:
    # Two images but one seed: the second iteration fails after the first image was put.
    with pytest.raises(ValueError):
        ImageUploader(s3_bucket).upload([png_bytes((1, 1, 1)), png_bytes((2, 2, 2))], "png", [1])
    assert listed(s3_env, s3_bucket) == []


# ------------------------------------------------------------------------------------ failures


def assert_no_secret(message: str, *secrets: str) -> None:
    assert message.startswith("[UPLOAD_FAILED] "), message
    for secret in secrets:
        assert secret not in message
    assert redact(message) == message, "the message carries something redact() masks"


def test_missing_bucket_names_bucket_and_endpoint(s3_env) -> None:
    with pytest.raises(UploadFailed) as info:
        ImageUploader("no-such-bucket-here").upload([png_bytes((0, 0, 0))], "png", [1])
    message = str(info.value)
    assert "bucket 'no-such-bucket-here' does not exist at " + s3_env.endpoint_url in message
    assert "FUSELINE_OUTPUT_BUCKET" in message
    assert_no_secret(message, s3_env.secret_key, s3_env.access_key)


def test_refused_credentials_name_the_variables_not_their_values(s3_env, s3_bucket, monkeypatch) -> None:
    wrong = "wrong-secret-" + "x" * 30
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(UploadFailed) as info:
        ImageUploader(s3_bucket).upload([png_bytes((0, 0, 0))], "png", [1])
    message = str(info.value)
    assert "refused the upload (SignatureDoesNotMatch)" in message
    assert "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in message
    assert_no_secret(message, wrong, s3_env.secret_key, s3_env.access_key)
    assert listed(s3_env, s3_bucket) == []


def test_unreachable_endpoint_fails_fast_and_names_it(s3_env, monkeypatch) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    started = time.monotonic()
    with pytest.raises(UploadFailed) as info:
        ImageUploader("images").upload([png_bytes((0, 0, 0))], "png", [1])
    assert time.monotonic() - started < 20  # three quick retries, not a hang until RunPod's timeout
    message = str(info.value)
    assert "s3://images/" in message and f"S3 endpoint {closed} unreachable" in message
    assert "AWS_ENDPOINT_URL" in message
    assert_no_secret(message, s3_env.secret_key, s3_env.access_key)


# ------------------------------------------------------------------------------------ settings


def test_output_settings_from_the_environment() -> None:
    settings = load_settings(
        {
            "FUSELINE_OUTPUT_BUCKET": "my-images",
            "FUSELINE_OUTPUT_PREFIX": "/fuseline/out/",
            "FUSELINE_OUTPUT_URL_EXPIRY_S": "86400",
        }
    )
    assert (settings.output_bucket, settings.output_prefix, settings.output_url_expiry_s) == (
        "my-images",
        "fuseline/out",
        86400,
    )
    default = load_settings({})
    assert (default.output_bucket, default.output_prefix, default.output_url_expiry_s) == (None, "", 3600)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"FUSELINE_OUTPUT_BUCKET": "s3://my-images/out/"},
            "set FUSELINE_OUTPUT_BUCKET=my-images and FUSELINE_OUTPUT_PREFIX=out",
        ),
        ({"FUSELINE_OUTPUT_BUCKET": "My_Images"}, "'My_Images' is not a valid S3 bucket name"),
        (
            {"FUSELINE_OUTPUT_PREFIX": "a//b"},
            "FUSELINE_OUTPUT_PREFIX='a//b' has an empty, '.' or '..' segment",
        ),
        ({"FUSELINE_OUTPUT_PREFIX": "a/../b"}, "'..' segment"),
        ({"FUSELINE_OUTPUT_URL_EXPIRY_S": "0"}, "FUSELINE_OUTPUT_URL_EXPIRY_S=0 must be at least 1"),
        ({"FUSELINE_OUTPUT_URL_EXPIRY_S": "604801"}, "exceeds 604800 (7 days"),
        ({"FUSELINE_OUTPUT_URL_EXPIRY_S": "1h"}, "FUSELINE_OUTPUT_URL_EXPIRY_S='1h' is not an integer"),
    ],
)
def test_malformed_output_settings_fail_the_start(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigInvalid, match=re.escape(expected)):
        load_settings(env)


def test_uploader_needs_a_bucket() -> None:
    with pytest.raises(UploadNotConfigured, match="set FUSELINE_OUTPUT_BUCKET"):
        ImageUploader.from_settings(WorkerSettings())


# ------------------------------------------------------------------------------ through the worker


@pytest.fixture(scope="module")
def output_bucket(aws_like_s3: SeaweedS3) -> str:
    return aws_like_s3.make_bucket("fuseline-output")


@pytest.fixture(scope="module")
def s3_worker(settings, output_bucket: str) -> Worker:
    return Worker(settings.model_copy(update={"output_bucket": output_bucket, "output_prefix": "jobs"}))


def test_worker_uploads_the_same_png_it_would_return_inline(s3_env, s3_worker, tiny_worker) -> None:
    job = {"template": TEMPLATE, "prompt": "a lighthouse", **SMALL, "seed": 11}
    result = s3_worker.run({**job, "output": {"return": "s3"}})
    (image,) = result["images"]
    assert set(image) == {"url", "key", "format", "seed"} and (image["format"], image["seed"]) == ("png", 11)
    assert re.fullmatch(r"jobs/[0-9a-f]{32}/0-11\.png", image["key"])
    assert result["parameters"]["output"]["return"] == "s3"
    assert result["timings_ms"]["upload"] > 0

    response = requests.get(image["url"], timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.format == "PNG" and picture.size == (64, 64)
    # Same seed, same model: the uploaded bytes are the ones base64 output would have carried.
    inline = tiny_worker.run(job)["images"][0]["data"]
    assert response.content == base64.b64decode(inline)


@pytest.mark.usefixtures("served")
def test_handler_refuses_s3_output_without_a_bucket_before_generating() -> None:
    entry, _ = get_worker().cache.get(TEMPLATE)
    unet_calls: list[int] = []
    hook = entry.pipe.unet.register_forward_pre_hook(lambda *_: unet_calls.append(1))
    try:
        result = handler({"id": "job-1", "input": {"prompt": "a cat", **SMALL, "output": {"return": "s3"}}})
    finally:
        hook.remove()
    assert set(result) == {"error"}
    assert result["error"].startswith("[UPLOAD_NOT_CONFIGURED] output.return 's3' needs an output bucket")
    assert "set FUSELINE_OUTPUT_BUCKET" in result["error"]
    assert unet_calls == []  # refused at validation: no GPU time spent on images with nowhere to go


def test_parse_input_accepts_s3_output_only_with_a_bucket() -> None:
    raw = {"template": "t", "prompt": "a", "output": {"return": "s3", "format": "webp"}}
    parsed = parse_input(raw, WorkerSettings(output_bucket="images"))
    assert parsed.output is not None and parsed.output.return_ == "s3"
    with pytest.raises(UploadNotConfigured, match=r"^\[UPLOAD_NOT_CONFIGURED\] .*FUSELINE_OUTPUT_BUCKET"):
        parse_input(raw, WorkerSettings())


def test_worker_upload_failure_is_reported_as_upload_failed(s3_env, s3_worker, monkeypatch) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    with pytest.raises(UploadFailed, match=re.escape(f"S3 endpoint {closed} unreachable")):
        s3_worker.run({"template": TEMPLATE, "prompt": "a cat", **SMALL, "output": {"return": "s3"}})


def test_missing_credentials_name_the_variables(s3_env, s3_bucket, monkeypatch, tmp_path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    # No shared credentials or config file either (the EC2 metadata probe is off in tests/conftest.py).
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(UploadFailed, match="no AWS credentials found; set AWS_ACCESS_KEY_ID and "):
        ImageUploader(s3_bucket).upload([png_bytes((0, 0, 0))], "png", [1])


# ------------------------------------------------------------------------- S3 client configuration


def test_endpoint_without_scheme_is_upload_failed_naming_the_variable(s3_env, s3_worker, monkeypatch) -> None:
    """boto3 refuses `localhost:9000` only when the client is made, after the generation: the job fails as
    UPLOAD_FAILED naming the variable and the fix (not INTERNAL_ERROR), and the start refuses it sooner."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "localhost:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with pytest.raises(UploadFailed) as info:
        s3_worker.run({"template": TEMPLATE, "prompt": "a cat", **SMALL, "output": {"return": "s3"}})
    message = str(info.value)
    assert message.startswith("[UPLOAD_FAILED] ") and "AWS_ENDPOINT_URL='localhost:9000'" in message
    assert "http://localhost:9000" in message
    with pytest.raises(ConfigInvalid, match=r"AWS_ENDPOINT_URL='localhost:9000' is not an endpoint URL"):
        load_settings({"FUSELINE_OUTPUT_BUCKET": "images", "AWS_ENDPOINT_URL": "localhost:9000"})
    with pytest.raises(ConfigInvalid, match=r"AWS_ENDPOINT_URL_S3='ftp://x' is not an endpoint URL"):
        load_settings({"FUSELINE_RELEASE": "s3://b/releases/main.json", "AWS_ENDPOINT_URL_S3": "ftp://x"})
    # A worker that never talks to S3 is not held to it.
    assert load_settings({"AWS_ENDPOINT_URL": "localhost:9000"}).output_bucket is None


def test_s3_addressing_is_validated(monkeypatch) -> None:
    with pytest.raises(ConfigInvalid, match=r"FUSELINE_S3_ADDRESSING='vhost' must be 'path' .* or 'virtual'"):
        load_settings({"FUSELINE_S3_ADDRESSING": "vhost"})
    assert load_settings({"FUSELINE_S3_ADDRESSING": "Virtual"}).output_bucket is None
    # Past the settings (e.g. the sync CLI): the sync and the upload refuse it with the same message.
    from worker.sync.errors import SyncError
    from worker.sync.remote import S3Remote

    monkeypatch.setenv("FUSELINE_S3_ADDRESSING", "vhost")
    with pytest.raises(SyncError, match=r"s3://models: FUSELINE_S3_ADDRESSING='vhost' must be"):
        S3Remote("models", "").client  # noqa: B018  (the property makes the client)
    with pytest.raises(UploadFailed, match=r"FUSELINE_S3_ADDRESSING='vhost' must be"):
        ImageUploader("images").upload([png_bytes((0, 0, 0))], "png", [1])


def test_sync_and_upload_clients_share_one_configuration(s3_env, monkeypatch) -> None:
    from worker.sync.remote import S3Remote
    from worker.upload import s3_client

    monkeypatch.setenv("FUSELINE_S3_ADDRESSING", "virtual")
    upload, sync = s3_client().meta, S3Remote("models", "").client.meta
    for meta in (upload, sync):
        assert meta.endpoint_url == s3_env.env()["AWS_ENDPOINT_URL"]
        assert meta.config.s3["addressing_style"] == "virtual" and meta.config.signature_version == "s3v4"
        assert (meta.config.connect_timeout, meta.config.retries["total_max_attempts"]) == (5, 4)
    # Only what each caller needs differs: a job waits on uploads; the sync runs parallel ranged GETs.
    assert (upload.config.read_timeout, sync.config.read_timeout) == (30, 60)
    assert sync.config.max_pool_connections == 32


# --------------------------------------------------------------------- the job's own output place


def test_a_job_can_name_its_own_place_in_an_allowed_bucket(s3_env, aws_like_s3, settings) -> None:
    bucket = aws_like_s3.make_bucket(f"team-{uuid.uuid4().hex[:12]}")
    worker = Worker(settings.model_copy(update={"output_buckets": frozenset({bucket})}))
    place = {"bucket": bucket, "prefix": "renders/today", "expires_in": 120}
    result = worker.run(
        {"template": TEMPLATE, "prompt": "a lighthouse", **SMALL, "seed": 11, "output": {"s3": place}}
    )
    (image,) = result["images"]
    assert re.fullmatch(r"renders/today/[0-9a-f]{32}/0-11\.png", image["key"])
    assert "X-Amz-Expires=120" in image["url"]
    assert listed(aws_like_s3, bucket) == [image["key"]]
    response = requests.get(image["url"], timeout=10)
    assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (64, 64)
    assert result["parameters"]["output"] == {"format": "png", "quality": 90, "return": "s3", "s3": place}


def test_a_missing_per_job_bucket_names_the_field_not_the_setting(s3_env, settings) -> None:
    worker = Worker(settings.model_copy(update={"output_buckets": frozenset({"not-created-here"})}))
    with pytest.raises(
        UploadFailed, match=r"bucket 'not-created-here' does not exist .*fix output\.s3\.bucket"
    ):
        worker.run(
            {
                "template": TEMPLATE,
                "prompt": "a cat",
                **SMALL,
                "output": {"s3": {"bucket": "not-created-here"}},
            }
        )


@pytest.mark.usefixtures("served")
def test_a_place_outside_the_allow_list_is_refused_before_generating() -> None:
    entry, _ = get_worker().cache.get(TEMPLATE)
    unet_calls: list[int] = []
    hook = entry.pipe.unet.register_forward_pre_hook(lambda *_: unet_calls.append(1))
    try:
        result = handler(
            {"id": "job-2", "input": {"prompt": "a cat", **SMALL, "output": {"s3": {"bucket": "elsewhere"}}}}
        )
    finally:
        hook.remove()
    assert set(result) == {"error"}
    assert result["error"].startswith(
        "[OUTPUT_NOT_ALLOWED] output.s3.bucket 'elsewhere': this worker allows no"
    )
    assert unet_calls == []
