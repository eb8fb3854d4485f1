"""S3 access: one client factory for every S3 client fuseline makes (publishing to a DVC remote, `s3://`
sources, the worker's volume sync and image upload), with one addressing rule.

A client is configured by an `S3Config`, made either from a DVC remote's options (`.dvc/config` and
`config.local`: endpointurl, region, profile, credentialpath, configpath, keys, use_ssl, ssl_verify, sse,
sse_kms_key_id, sse_customer_*, acl, timeouts) or from the process environment (the standard AWS_*
variables, read by boto3 itself, and FUSELINE_S3_ADDRESSING). Addressing: FUSELINE_S3_ADDRESSING when set;
otherwise path-style with a custom endpoint (MinIO, SeaweedFS, R2: S3-compatible stores often have no
wildcard DNS for virtual hosts), and botocore's `auto` on AWS itself (virtual-hosted where the bucket name
allows). boto3 is imported only when a client is made.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fuseline.core.errors import ConfigInvalid

# The variables that point boto3 at a non-AWS endpoint (the service-specific one wins in boto3).
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
ADDRESSING_VARIABLE = "FUSELINE_S3_ADDRESSING"
ADDRESSING_STYLES = ("path", "virtual")


def addressing_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """FUSELINE_S3_ADDRESSING (`path` or `virtual`, any case), None when unset; ConfigInvalid otherwise."""
    env = os.environ if env is None else env
    raw = env.get(ADDRESSING_VARIABLE, "")
    style = raw.strip().lower()
    if not style:
        return None
    if style not in ADDRESSING_STYLES:
        raise ConfigInvalid(
            f"{ADDRESSING_VARIABLE}={raw!r} must be 'path' (bucket in the URL path) or 'virtual' (bucket in "
            "the host name); fix or unset it"
        )
    return style


def check_endpoint_variables(env: Mapping[str, str] | None = None) -> None:
    """Refuse what boto3 refuses only when a client is made: an endpoint URL without scheme or host."""
    env = os.environ if env is None else env
    for name in ENDPOINT_VARIABLES:
        value = env.get(name, "").strip()
        if not value:
            continue
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigInvalid(
                f"{name}={value!r} is not an endpoint URL: write it with its scheme and host, e.g. "
                f"{name}=http://{value.split('://')[-1] or 'localhost:9000'} (or https://...)"
            )


@dataclass(frozen=True)
class S3Config:
    """How to reach one S3 endpoint. Unset fields fall back to boto3's own chain (AWS_* variables,
    ~/.aws/credentials and config)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    credentials_file: str | None = None
    config_file: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    use_ssl: bool = True
    # True/False, or the path of a CA bundle (DVC's ssl_verify).
    verify: bool | str | None = None
    # "path" or "virtual"; None: the rule in the module docstring.
    addressing: str | None = None
    read_timeout: int | None = None
    connect_timeout: int | None = None
    # Arguments every write (put_object) carries: server-side encryption, ACL, SSE-C.
    write_args: Mapping[str, str] = field(default_factory=dict)
    # Arguments every read (get/head_object) carries: SSE-C needs its key on reads too.
    read_args: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Config:
        """The worker's and the sources' configuration: the standard AWS_* variables (read by boto3 when
        the client is made) and FUSELINE_S3_ADDRESSING. ConfigInvalid names a malformed variable."""
        check_endpoint_variables(env)
        return cls(addressing=addressing_from_env(env))

    @classmethod
    def from_dvc_remote(cls, options: Mapping[str, Any], env: Mapping[str, str] | None = None) -> S3Config:
        """The configuration of a DVC S3 remote, from its merged config section (without `url`)."""
        write_args: dict[str, str] = {}
        read_args: dict[str, str] = {}
        if options.get("sse"):
            write_args["ServerSideEncryption"] = str(options["sse"])
        if options.get("sse_kms_key_id"):
            write_args["SSEKMSKeyId"] = str(options["sse_kms_key_id"])
        if options.get("acl"):
            write_args["ACL"] = str(options["acl"])
        if options.get("sse_customer_key"):
            customer = {
                "SSECustomerAlgorithm": str(options.get("sse_customer_algorithm") or "AES256"),
                "SSECustomerKey": str(options["sse_customer_key"]),
            }
            write_args.update(customer)
            read_args.update(customer)
        check_endpoint_variables(env)
        return cls(
            endpoint_url=options.get("endpointurl") or None,
            region=options.get("region") or None,
            profile=options.get("profile") or None,
            credentials_file=options.get("credentialpath") or None,
            config_file=options.get("configpath") or None,
            access_key_id=options.get("access_key_id") or None,
            secret_access_key=options.get("secret_access_key") or None,
            session_token=options.get("session_token") or None,
            use_ssl=bool(options.get("use_ssl", True)),
            verify=options.get("ssl_verify"),
            addressing=addressing_from_env(env),
            read_timeout=options.get("read_timeout"),
            connect_timeout=options.get("connect_timeout"),
            write_args=write_args,
            read_args=read_args,
        )

    def endpoint(self, env: Mapping[str, str] | None = None) -> str | None:
        """The endpoint a client of this configuration talks to (None: AWS's own)."""
        env = os.environ if env is None else env
        return self.endpoint_url or next(
            (env[n].strip() for n in ENDPOINT_VARIABLES if env.get(n, "").strip()), None
        )

    def addressing_style(self, env: Mapping[str, str] | None = None) -> str:
        """The one addressing rule: explicit style, else path with a custom endpoint, else botocore's auto."""
        if self.addressing:
            return self.addressing
        return "path" if self.endpoint(env) else "auto"


def make_client(
    config: S3Config,
    *,
    read_timeout: int = 60,
    connect_timeout: int = 5,
    max_attempts: int = 3,
    max_pool_connections: int = 10,
    unsigned_without_credentials: bool = False,
) -> Any:
    """A boto3 S3 client for `config`. Few retries and short timeouts: an endpoint that is down must fail in
    seconds with a clear message, not hang. `unsigned_without_credentials`: when no credentials are found
    at all, make an anonymous client (public buckets) instead of one that fails on every call.

    ConfigInvalid when boto3 refuses the configuration (an invalid region name, a broken profile)."""
    import boto3
    import botocore
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    try:
        core = botocore.session.Session()
        if config.credentials_file:
            core.set_config_variable("credentials_file", config.credentials_file)
        if config.config_file:
            core.set_config_variable("config_file", config.config_file)
        session = boto3.session.Session(botocore_session=core, profile_name=config.profile)
        signature: Any = "s3v4"  # presigned URLs too: SigV4 (valid up to 7 days) on every provider
        if unsigned_without_credentials and not config.access_key_id and session.get_credentials() is None:
            signature = botocore.UNSIGNED
        client_config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=config.connect_timeout or connect_timeout,
            read_timeout=config.read_timeout or read_timeout,
            max_pool_connections=max_pool_connections,
            signature_version=signature,
            s3={"addressing_style": config.addressing_style()},
        )
        return session.client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            aws_session_token=config.session_token,
            use_ssl=config.use_ssl,
            verify=config.verify,
            config=client_config,
        )
    except (ValueError, BotoCoreError) as err:
        raise ConfigInvalid(
            f"cannot make an S3 client ({err}); check the endpoint, region and profile (AWS_ENDPOINT_URL, "
            "AWS_DEFAULT_REGION, AWS_PROFILE, or the DVC remote's endpointurl, region and profile)"
        ) from None
