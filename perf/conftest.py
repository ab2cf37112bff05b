"""pytest-benchmark setup for the GPU suites (bench_decode.py, bench_encode.py).

The recorded time is GPU time: `--benchmark-timer=perf.common.cuda_timer` (perf/README.md's
commands) records a CUDA event and returns the GPU time elapsed since the first event, so a
round's (t1 - t0) is the GPU time of the round's work.  Each round replays a captured
CUDA graph of the op several times, so launch overhead is out of the numbers.

Before its rounds, each benchmark keeps the card busy with its own graph for `--bench-sustain`
seconds, so that it is timed in the state its own load puts the card in rather than whatever
the previous test (or a compile pause) left.  Without it, the first of three runs on an H200
timed the encode at 4096 tokens 8-11% faster than the two right after it (the clock was not
recorded then, so the cause is not known); with 2 s, three runs moved no median by more than
3.8% (perf/NOTES.md, session 20).
"""
from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-sustain", type=float, default=2.0, metavar="SECONDS",
                     help="back-to-back replays of each benchmark's graph before its timed rounds "
                          "(default 2; 0 times a card in whatever state the last test left it)")


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


@pytest.fixture
def timed_rounds(benchmark, request):
    """Times a captured graph's replays as the benchmark's rounds, after the sustain period;
    records the sustain and the SM clock read right after the rounds in extra_info."""
    import common

    sustain = request.config.getoption("--bench-sustain")

    def run(graph) -> None:
        if sustain > 0:
            common.keep_busy(graph.replay, sustain)
        benchmark.pedantic(graph.replay, rounds=15, iterations=1, warmup_rounds=2)
        benchmark.extra_info.update(sustain_s=sustain, clock=common.sm_clock())

    return run
