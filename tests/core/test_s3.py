"""fuseline.core.s3: one client factory for every S3 client, configured from a DVC remote or the
environment, with one addressing rule (real boto3 clients; nothing here reaches a network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuseline.core.errors import ConfigInvalid
from fuseline.core.s3 import S3Config, make_client


@pytest.fixture
def no_aws_env(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "FUSELINE_S3_ADDRESSING"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_one_addressing_rule(no_aws_env, monkeypatch):
    assert S3Config.from_env().addressing_style() == "auto"  # AWS itself: virtual-hosted where possible
    assert S3Config(endpoint_url="http://127.0.0.1:9000").addressing_style() == "path"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert S3Config.from_env().addressing_style() == "path"  # a custom endpoint from the environment too
    monkeypatch.setenv("FUSELINE_S3_ADDRESSING", "Virtual")
    assert S3Config.from_env().addressing_style() == "virtual"
    client = make_client(S3Config.from_env())
    assert (
        client.meta.config.s3["addressing_style"] == "virtual"
        and client.meta.config.signature_version == "s3v4"
    )
    monkeypatch.setenv("FUSELINE_S3_ADDRESSING", "vhost")
    with pytest.raises(ConfigInvalid, match="FUSELINE_S3_ADDRESSING='vhost' must be 'path'"):
        S3Config.from_env()


def test_a_dvc_remote_config_is_honoured(no_aws_env, tmp_path: Path):
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[team]\naws_access_key_id = AKIATEAMTEAMTEAM\naws_secret_access_key = s3cr3t-team\n"
    )
    bundle = tmp_path / "ca.pem"
    options = {
        "endpointurl": "https://minio.internal:9000",
        "region": "eu-west-3",
        "profile": "team",
        "credentialpath": str(credentials),
        "ssl_verify": str(bundle),
        "sse": "aws:kms",
        "sse_kms_key_id": "key-1",
        "acl": "bucket-owner-full-control",
        "read_timeout": 7,
    }
    config = S3Config.from_dvc_remote(options)
    assert config.write_args == {
        "ServerSideEncryption": "aws:kms",
        "SSEKMSKeyId": "key-1",
        "ACL": "bucket-owner-full-control",
    }
    client = make_client(config)
    assert client.meta.endpoint_url == "https://minio.internal:9000"
    assert client.meta.region_name == "eu-west-3" and client.meta.config.read_timeout == 7
    assert client.meta.config.s3["addressing_style"] == "path"
    # The profile's keys, from the remote's credential file (not ~/.aws/credentials).
    assert client._request_signer._credentials.access_key == "AKIATEAMTEAMTEAM"
    assert client._endpoint.http_session._verify == str(bundle)
    unverified = make_client(
        S3Config.from_dvc_remote({"endpointurl": "https://x.internal", "ssl_verify": False})
    )
    assert unverified._endpoint.http_session._verify is False


def test_customer_keys_go_with_reads_and_writes(no_aws_env):
    config = S3Config.from_dvc_remote({"sse_customer_key": "k" * 32})
    assert (
        config.read_args
        == config.write_args
        == {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": "k" * 32}
    )


def test_anonymous_when_no_credentials_at_all(no_aws_env, monkeypatch, tmp_path: Path):
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    import botocore

    assert (
        make_client(S3Config(), unsigned_without_credentials=True).meta.config.signature_version
        is botocore.UNSIGNED
    )
    assert make_client(S3Config()).meta.config.signature_version == "s3v4"


def test_an_endpoint_without_scheme_is_config_invalid(no_aws_env):
    with pytest.raises(ConfigInvalid, match=r"AWS_ENDPOINT_URL='localhost:9000' is not an endpoint URL"):
        S3Config.from_env({"AWS_ENDPOINT_URL": "localhost:9000"})
