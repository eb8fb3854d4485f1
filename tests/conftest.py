"""Shared pytest setup: fixtures live in tests/fixtures/, one module per concern."""

import os

# No test may reach a model hub or phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

pytest_plugins = [
    "tests.fixtures.kit",
    "tests.fixtures.servers",
    "tests.fixtures.project",
]
