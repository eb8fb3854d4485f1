# fuseline worker image: Python 3.11 + the hash-locked worker dependencies (torch with its own CUDA wheels)
# + the worker code. No model weights, no DVC, no git: models come from the release onto the network volume
# at first start (worker.sync). docs/image.md has the measured size and the reasons for the base.
#
# Build:  make image   (buildah; builds local stand-ins for the base where it cannot be pulled)
#   or:   docker build -t <registry>/fuseline-worker:<tag> .
# BASE_IMAGE is the only thing that differs between a build from the public base and one from the local
# stand-in (tools/build_image.sh); every step below is the same in both.

ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# One venv, installed from requirements/worker.lock with every package pinned by version and hash (CUDA
# wheels included), the same lock CI's CPU install is derived from (tests/test_locks.py). The wheels are
# downloaded into a build cache mount first and installed from there, so a rebuild on the same machine
# downloads nothing (pip's own HTTP cache is not enough: it keeps nothing when a proxy strips the cache
# headers, as the egress proxy of fuseline's build machines does). `pip-ca` is an optional build secret: a
# CA bundle for builds behind a TLS-intercepting proxy; it never lands in the image.
COPY requirements/worker.lock /tmp/worker.lock
RUN --mount=type=cache,target=/var/cache/fuseline-wheels,sharing=locked \
    --mount=type=secret,id=pip-ca,required=false \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip download --no-input --disable-pip-version-check --no-deps --require-hashes \
      --only-binary=:all: --dest /var/cache/fuseline-wheels -r /tmp/worker.lock \
 && /opt/venv/bin/pip install --no-input --disable-pip-version-check --no-cache-dir --require-hashes \
      --only-binary=:all: --no-index --find-links /var/cache/fuseline-wheels -r /tmp/worker.lock \
 && rm /tmp/worker.lock

WORKDIR /app
# Exactly the code the worker imports: the core and worker/ (tests/worker/test_image_fileset.py imports
# every worker module from this set in a clean interpreter); .dockerignore lets nothing else in.
COPY fuseline/__init__.py ./fuseline/
COPY fuseline/core/ ./fuseline/core/
COPY worker/ ./worker/

# NVIDIA_* tell the NVIDIA container runtime to mount the host's driver and to refuse a host whose driver
# cannot run CUDA 13.0, the build torch's wheels carry (what the nvidia/cuda bases set).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true \
    FUSELINE_VOLUME=/runpod-volume \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"
CMD ["python", "-m", "worker.handler"]
