# fuseline worker image: CUDA runtime + the locked worker dependencies + worker code. No model weights,
# no DVC, no git: models come from the release onto the network volume at first start (worker.sync).
#
# Build:  docker build -t <registry>/fuseline-worker:<tag> .
# The install step uses requirements/worker.lock, the same file CI installs to run the worker tests
# (tests/test_lock_parity.py fails when the two drift).

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

FROM ghcr.io/astral-sh/uv:0.13.8 AS uv

FROM ${CUDA_IMAGE} AS builder
COPY --from=uv /uv /usr/local/bin/uv
# A uv-managed CPython 3.11 in a fixed prefix, copied as-is into the runtime stage together with the venv.
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
RUN uv python install 3.11 && uv venv --python 3.11 /opt/venv
COPY requirements/worker.lock /tmp/worker.lock
RUN uv pip install --python /opt/venv/bin/python -r /tmp/worker.lock

FROM ${CUDA_IMAGE}
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY fuseline/__init__.py ./fuseline/
COPY fuseline/core/ ./fuseline/core/
COPY worker/ ./worker/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true \
    FUSELINE_VOLUME=/runpod-volume
CMD ["python", "-m", "worker.handler"]
