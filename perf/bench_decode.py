"""pytest-benchmark: paged decode attention at the seed format vs torch SDPA-flash on fp16 K/V.

Recorded time: GPU time per call (one round = REPLAYS graph-captured calls; the stats are per
round, extra_info has per-call figures).  See perf/README.md for the commands.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from conftest import graph_of  # noqa: E402

REPLAYS = 10
IDS = [f"b{b}-ctx{c // 1024}k" for b, c in common.DECODE_SHAPES]


@pytest.mark.parametrize("shape", common.DECODE_SHAPES, ids=IDS)
def test_decode_turboquant(benchmark, timed_rounds, shape, copy_bw):
    batch, ctx = shape
    case = common.decode_case(batch, ctx)
    g = graph_of(case.run, REPLAYS)
    timed_rounds(g)
    per_call = benchmark.stats.stats.median / REPLAYS
    benchmark.extra_info.update(
        bytes=case.bytes_read, gbps=case.bytes_read / per_call * 1e-9,
        pct_copy=case.bytes_read / per_call / copy_bw * 100, ms_per_call=per_call * 1e3,
        replays_per_round=REPLAYS, block_size=common.BLOCK_SIZE, format="seed")


@pytest.mark.parametrize("shape", common.DECODE_SHAPES, ids=IDS)
def test_decode_sdpa_flash_fp16(benchmark, timed_rounds, shape, copy_bw):
    batch, ctx = shape
    fn, name = common.sdpa_case(batch, ctx)
    g = graph_of(fn, REPLAYS)
    timed_rounds(g)
    per_call = benchmark.stats.stats.median / REPLAYS
    nbytes = batch * ctx * common.HKV * common.HEAD_DIM * 4
    benchmark.extra_info.update(
        bytes=nbytes, gbps=nbytes / per_call * 1e-9, pct_copy=nbytes / per_call / copy_bw * 100,
        ms_per_call=per_call * 1e3, replays_per_round=REPLAYS, baseline=name)
