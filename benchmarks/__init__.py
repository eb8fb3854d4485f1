"""Benchmarks at real SDXL scale (not part of `make test`; `tests/test_benchmarks_quick.py` runs their --quick
modes). See docs/benchmarks.md for what each measures and the figures recorded so far."""
