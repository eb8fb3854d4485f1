"""Shared pytest setup: fixtures live in tests/fixtures/, one module per concern."""

import os

from hypothesis import HealthCheck, settings

# No test may reach a model hub or phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
# Defaults that would otherwise point at the internet go to a closed port on loopback instead: a test that
# forgets to start its local server fails fast rather than reaching Civitai, the Hugging Face hub or AWS.
os.environ.setdefault("CIVITAI_BASE_URL", "http://127.0.0.1:9")
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

# The property-based fuzz tests (tests/**/test_*_fuzz.py): bounded so that together they take well under a
# minute in `make test`; HYPOTHESIS_PROFILE=deep runs many more examples by hand. No deadline: a shared
# 2-core box makes single examples slow now and then, which is not what these tests are about.
settings.register_profile(
    "fuseline", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fuseline"))

pytest_plugins = [
    "tests.fixtures.kit",
    "tests.fixtures.servers",
    "tests.fixtures.project",
]
