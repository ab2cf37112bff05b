"""Shared pytest setup.  Keep it small and generic: fixtures used by one file live in that file,
helpers shared by several live in tests/helpers.py."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings

# These tests run many tiny CPU matmuls.  With more than one OpenMP thread each one costs
# milliseconds of spin-waiting when the cores are shared (measured 6 ms vs 27 us for a
# (5,128)x(128,128) product on a loaded 2-core machine), so the suite runs single-threaded.
torch.set_num_threads(1)

# CI profile (style.md B3): no deadline (first calls compile/allocate), reproducible examples,
# example counts bounded per test with @settings(max_examples=...).
settings.register_profile(
    "ci", deadline=None, derandomize=True, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")
