# fuseline: `make demo` and `make test` are all a fresh clone needs (README.md).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PYTHON ?= $(shell command -v python3.11 || command -v python3)
export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test lint demo lock clean

setup: $(VENV)/.installed

# Re-installs only when a lock file or pyproject.toml changes; `make setup` is idempotent.
$(VENV)/.installed: requirements/worker.lock requirements/build.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "fuseline needs Python 3.11, found " + sys.version)'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements/worker.lock -r requirements/build.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	if [ -f Dockerfile ]; then $(BIN)/hadolint Dockerfile; fi
	if [ -d .github/workflows ]; then $(BIN)/actionlint -shellcheck $(BIN)/shellcheck; fi

demo: setup
	$(PY) -m testkit.demo

# Recompute both lock files from requirements/*.in in two throw-away venvs (worker alone, then all).
lock:
	rm -rf /tmp/fuseline-lock && mkdir -p /tmp/fuseline-lock
	$(PYTHON) -m venv /tmp/fuseline-lock/worker && /tmp/fuseline-lock/worker/bin/pip install -q -r requirements/worker.in
	$(PYTHON) -m venv /tmp/fuseline-lock/all && /tmp/fuseline-lock/all/bin/pip install -q -r requirements/build.in
	/tmp/fuseline-lock/worker/bin/pip freeze --all --exclude pip > /tmp/fuseline-lock/worker.txt
	/tmp/fuseline-lock/all/bin/pip freeze --all --exclude pip > /tmp/fuseline-lock/all.txt
	$(PYTHON) tools/write_locks.py /tmp/fuseline-lock/worker.txt /tmp/fuseline-lock/all.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
