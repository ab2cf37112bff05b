"""pytest-benchmark setup for the GPU suites (bench_decode.py, bench_encode.py).

The recorded time is GPU time: `--benchmark-timer=perf.common.cuda_timer` (perf/README.md's
commands) records a CUDA event and returns the GPU time elapsed since the first event, so a
round's (t1 - t0) is the GPU time of the round's work.  Each round replays a captured
CUDA graph of the op several times, so launch overhead is out of the numbers.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the perf suites need a CUDA GPU (never skipped silently)")


@pytest.fixture(scope="session")
def copy_bw() -> float:
    import common

    return common.copy_bandwidth()


def graph_of(fn, replays: int):
    """Capture `replays` calls of fn in one CUDA graph (after a side-stream warm-up)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(replays):
            fn()
    return g
