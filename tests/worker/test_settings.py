"""The image inputs' and output places' settings in the worker's one settings model (worker/settings.py):
parsed once, a bad value CONFIG_INVALID naming the variable, handed inward as typed limits."""

from __future__ import annotations

import ipaddress
import re

import pytest

from fuseline.core.errors import ConfigInvalid
from worker.image_inputs import ImageInputLimits, SizeBounds
from worker.settings import WorkerSettings, load_settings


def test_image_input_settings_from_the_environment() -> None:
    settings = load_settings(
        {
            "FUSELINE_MAX_INPUT_BYTES": "1000000",
            "FUSELINE_MAX_INPUT_PIXELS": "4000000",
            "FUSELINE_ALLOW_PRIVATE_URLS": "1",
            "FUSELINE_ALLOWED_URL_NETWORKS": "10.20.0.0/16, fd00:1::/64",
            "FUSELINE_FETCH_TIMEOUT_S": "7.5",
            "FUSELINE_INPUT_BUCKETS": "pictures,uploads.example",
            "FUSELINE_OUTPUT_BUCKETS": "team-a,team-b",
            "FUSELINE_MIN_SIZE": "64",
            "FUSELINE_MAX_PIXELS": "1048576",
        }
    )
    assert settings.image_limits() == ImageInputLimits(
        max_bytes=1_000_000,
        max_pixels=4_000_000,
        allow_private_urls=True,
        allowed_networks=(ipaddress.ip_network("10.20.0.0/16"), ipaddress.ip_network("fd00:1::/64")),
        fetch_timeout_s=7.5,
        s3_buckets=frozenset({"pictures", "uploads.example"}),
    )
    assert settings.output_buckets == frozenset({"team-a", "team-b"})
    assert settings.size_bounds() == SizeBounds(min_side=64, max_side=2048, max_pixels=1_048_576)


def test_image_input_defaults() -> None:
    settings = load_settings({})
    assert settings.image_limits() == ImageInputLimits()  # 20 MiB, 4096², private URLs refused, 20 s
    assert settings.image_limits().s3_buckets is None  # any bucket the worker's keys can read
    assert settings.output_buckets == frozenset()
    assert WorkerSettings().image_limits() == ImageInputLimits()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"FUSELINE_MAX_INPUT_BYTES": "20MB"}, "FUSELINE_MAX_INPUT_BYTES='20MB' is not an integer"),
        ({"FUSELINE_MAX_INPUT_BYTES": "0"}, "FUSELINE_MAX_INPUT_BYTES=0 must be at least 1"),
        ({"FUSELINE_MAX_INPUT_PIXELS": "100000000"}, "above PIL's decompression-bomb limit (89478485"),
        ({"FUSELINE_ALLOW_PRIVATE_URLS": "maybe"}, "FUSELINE_ALLOW_PRIVATE_URLS='maybe' must be 1 or 0"),
        ({"FUSELINE_ALLOWED_URL_NETWORKS": "10.0.0.1/8"}, "'10.0.0.1/8' is not an address range"),
        ({"FUSELINE_ALLOWED_URL_NETWORKS": "intranet"}, "'intranet' is not an address range"),
        ({"FUSELINE_FETCH_TIMEOUT_S": "0"}, "FUSELINE_FETCH_TIMEOUT_S='0' must be above 0"),
        ({"FUSELINE_FETCH_TIMEOUT_S": "inf"}, "FUSELINE_FETCH_TIMEOUT_S='inf' must be a finite number"),
        ({"FUSELINE_INPUT_BUCKETS": "s3://pictures"}, "'s3://pictures' is not an S3 bucket name"),
        ({"FUSELINE_OUTPUT_BUCKETS": "ok-bucket,Bad_Bucket"}, "'Bad_Bucket' is not an S3 bucket name"),
    ],
)
def test_malformed_image_settings_fail_the_start(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigInvalid, match=re.escape(expected)):
        load_settings(env)


def test_output_buckets_make_the_start_check_the_s3_endpoint() -> None:
    # As with FUSELINE_OUTPUT_BUCKET: an endpoint boto3 would refuse at the first upload fails the start.
    with pytest.raises(ConfigInvalid, match="AWS_ENDPOINT_URL"):
        load_settings({"FUSELINE_OUTPUT_BUCKETS": "team-a", "AWS_ENDPOINT_URL": "localhost:9000"})
    load_settings({"AWS_ENDPOINT_URL": "localhost:9000"})  # no S3 use: not checked
