# fuseline: `make demo` and `make test` are all a fresh clone needs (README.md).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PYTHON ?= $(shell command -v python3.11 || command -v python3)
export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
TORCH_VERSION := $(shell sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements/worker.lock)
TORCH_CPU_LINKS ?= $(or $(PIP_FIND_LINKS),https://download.pytorch.org/whl/torch/)

.PHONY: setup test lint demo lock clean image image-smoke image-push image-deps test-deps

setup: $(VENV)/.installed

# Re-installs only when a lock file or pyproject.toml changes; `make setup` is idempotent. Every package is
# pinned with its hashes. Where pip can find the CPU build of the locked torch release (a find-links
# folder, as on CI machines), the worker set comes from worker-cpu.lock, which differs from the image's
# worker.lock only by that torch build (tests/test_locks.py); elsewhere it is the image's own lock.
$(VENV)/.installed: requirements/worker.lock requirements/worker-cpu.lock requirements/build.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "fuseline needs Python 3.11, found " + sys.version)'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -rf $(VENV)/.torch-probe; \
	if $(PY) -m pip download --quiet --no-deps --no-index --dest $(VENV)/.torch-probe "torch==$(TORCH_VERSION)+cpu" >/dev/null 2>&1; \
	then worker_lock=requirements/worker-cpu.lock; else worker_lock=requirements/worker.lock; fi; \
	rm -rf $(VENV)/.torch-probe; echo "worker set: $$worker_lock"; \
	$(PY) -m pip install --quiet --require-hashes -r $$worker_lock -r requirements/build.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/shellcheck tools/*.sh .ci/run
	$(BIN)/lint-imports
	if [ -f Dockerfile ]; then $(BIN)/hadolint Dockerfile; fi
	if [ -d .github/workflows ]; then $(BIN)/actionlint -shellcheck $(BIN)/shellcheck; fi

demo: setup
	$(PY) -m testkit.demo

# The Debian packages the tests need beyond the virtualenv (as root): chromium takes the headless screenshot
# of the `dvc plots diff` preview page (tests/stages/test_pipeline_recipe_refiner.py). Installs only what is
# missing.
test-deps:
	@command -v chromium >/dev/null || { echo "installing chromium"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The Debian packages the image targets need (as root): buildah builds and runs the image, debootstrap
# makes the stand-in base where the public one cannot be pulled, docker-registry is what `make image-push`
# is tested against. Installs only what is missing.
image-deps:
	@missing=""; for tool in buildah debootstrap docker-registry; do \
	  command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

# The worker image, built with buildah from the Dockerfile (stand-in bases where the public ones cannot be
# pulled): build/fuseline-worker.oci.tar + `localhost/fuseline-worker:dev` in buildah's local storage.
image:
	tools/build_image.sh

# Run the built image as RunPod would: volume mounted, release on a local S3, RunPod's job loop (docs/image.md).
image-smoke: setup
	$(BIN)/pytest -m image tests/image -p no:cacheprovider -s

# Push the built image: IMAGE_REPO=ghcr.io/<owner>/fuseline-worker IMAGE_TAGS="sha-<sha> main" (tools/push_image.sh).
image-push:
	tools/push_image.sh

# Recompute the three lock files from requirements/*.in with uv (tools/write_locks.py), for linux x86-64 /
# CPython 3.11. TORCH_CPU_LINKS is where the CPU build of torch lies: pip's find-links here, PyTorch's
# own wheel page elsewhere.
lock: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) tools/write_locks.py --torch-cpu-links "$(TORCH_CPU_LINKS)"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
