"""pytest-benchmark: fused encode + paged-cache write (write_cache) at the seed format.

Throughput is counted on the fp16 K and V bytes read.  See perf/README.md for the commands.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from conftest import graph_of  # noqa: E402

REPLAYS = 10


def _encode(benchmark, timed_rounds, tokens, copy_bw, declared):
    run, nbytes = common.encode_case(tokens, declared=declared)
    g = graph_of(run, REPLAYS)
    timed_rounds(g)
    per_call = benchmark.stats.stats.median / REPLAYS
    benchmark.extra_info.update(
        bytes=nbytes, tbps=nbytes / per_call * 1e-12, pct_copy=nbytes / per_call / copy_bw * 100,
        ms_per_call=per_call * 1e3, replays_per_round=REPLAYS, format="seed",
        exact16_matrices=declared)


@pytest.mark.parametrize("tokens", [4096, common.ENCODE_TOKENS], ids=lambda t: f"tok{t}")
def test_encode_write_cache(benchmark, timed_rounds, tokens, copy_bw):
    """The op with its default arguments."""
    _encode(benchmark, timed_rounds, tokens, copy_bw, declared=False)


@pytest.mark.parametrize("tokens", [4096, common.ENCODE_TOKENS], ids=lambda t: f"tok{t}")
def test_encode_write_cache_declared(benchmark, timed_rounds, tokens, copy_bw):
    """exact16_matrices=True, as the vLLM backend calls it."""
    _encode(benchmark, timed_rounds, tokens, copy_bw, declared=True)
