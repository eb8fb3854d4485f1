"""`make image-push` (tools/push_image.sh), the step the image workflow uses to publish the image, against a
real registry on 127.0.0.1 (Debian's docker-registry, the CNCF distribution registry GHCR and Docker Hub
speak) with htpasswd logins. It pushes the small stand-in base from the same buildah storage: the script's
logic (login, one push per tag, digests) is what is under test, and pushing the 5.6 GB worker image again
would only add minutes of compression."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import bcrypt
import pytest

from testkit.servers import free_port
from tests.image.buildah import BUILD_INFO, REPO, build_info, buildah

pytestmark = pytest.mark.image

STANDIN = "localhost/fuseline-standin/python:3.11-slim-bookworm"
USER = "ci"


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """A registry on 127.0.0.1 with one htpasswd user; yields (address, password)."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("docker-registry is not installed (apt-get install docker-registry)")
    root = tmp_path_factory.mktemp("registry")
    password = secrets.token_urlsafe(18)
    (root / "htpasswd").write_bytes(f"{USER}:".encode() + bcrypt.hashpw(password.encode(), bcrypt.gensalt(5)))
    port = free_port()
    (root / "config.yml").write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        f"auth:\n  htpasswd:\n    realm: fuseline-test\n    path: {root / 'htpasswd'}\n"
    )
    log = (root / "registry.log").open("w")
    process = subprocess.Popen(
        [binary, "serve", str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://{address}/v2/", timeout=2)
        except urllib.error.HTTPError as exc:
            if exc.code == 401:  # up, and asking for credentials
                break
        except OSError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, (root / "registry.log").read_text()
        time.sleep(0.2)
    yield address, password
    process.terminate()
    process.wait(10)


def push(address: str, password: str, tags: str | None, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")},
        **extra,
        "IMAGE": STANDIN,
        "IMAGE_REPO": f"{address}/fuseline/worker",
        **({"IMAGE_TAGS": tags} if tags is not None else {}),
        "REGISTRY_USER": USER,
        "REGISTRY_PASSWORD": password,
        "REGISTRY_TLS_VERIFY": "false",
    }
    return subprocess.run(
        ["make", "--no-print-directory", "image-push"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_image_push_logs_in_and_pushes_every_tag(registry):
    build_info()
    address, password = registry
    result = push(address, password, "sha-0123456789ab main")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert password not in result.stdout + result.stderr
    pushed = json.loads((BUILD_INFO.parent / "pushed.json").read_text())["pushed"]
    assert [ref.split("@")[0] for ref in pushed] == [
        f"{address}/fuseline/worker:sha-0123456789ab",
        f"{address}/fuseline/worker:main",
    ]
    # What the registry serves under each tag is what was pushed: pull it back and compare the image.
    local = json.loads(buildah("inspect", "--type", "image", STANDIN))["FromImageID"]
    for ref in pushed:
        name, digest = ref.split("@")
        assert digest.startswith("sha256:")
        pulled = buildah(
            "pull", "--quiet", "--tls-verify=false", f"--creds={USER}:{password}", f"docker://{name}"
        )
        assert pulled == local, (name, pulled, local)


def test_image_push_with_a_wrong_password_fails_without_echoing_it(registry):
    address, _ = registry
    wrong = "wrong-" + secrets.token_hex(8)
    result = push(address, wrong, "main")
    assert result.returncode != 0
    assert wrong not in result.stdout + result.stderr


def test_image_push_in_github_actions_tags_the_sha_the_channel_and_the_git_tag(registry):
    """What image.yml runs: no IMAGE_TAGS, the tags come from the GitHub environment."""
    address, password = registry
    sha = "0123456789abcdef0123456789abcdef01234567"
    result = push(
        address, password, None,
        GITHUB_SHA=sha, GITHUB_REF_TYPE="tag", GITHUB_REF_NAME="v1.2.3", RELEASE_CHANNEL="stable",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pushed = json.loads((BUILD_INFO.parent / "pushed.json").read_text())["pushed"]
    assert [ref.split("@")[0].rsplit(":", 1)[1] for ref in pushed] == ["sha-0123456789ab", "stable", "v1.2.3"]
