"""perf/ab_decode.py's summary on CPU: a GPU call costs minutes of device time, so the
table it prints (medians per build, ratios to the first build, speedups against SDPA, the
same-output flag) is checked here with made-up timings."""
from __future__ import annotations

import pytest

from helpers import perf_script


@pytest.fixture
def ab(monkeypatch):
    return perf_script(monkeypatch, "ab_decode")


def run(ms, sdpa, sha):
    return {"(1, 4k) page 64": dict(ms=ms, sdpa_ms=sdpa, sha=sha)}


def test_summary_medians_ratios_and_output_flag(ab):
    results = {"/x/new": [run(0.010, 0.020, "a"), run(0.012, 0.022, "a"), run(0.011, 0.021, "a")],
               "/x/old": [run(0.020, 0.019, "a"), run(0.024, 0.018, "a"), run(0.022, 0.023, "b")]}
    head, row = ab.summary(["/x/new", "/x/old"], results)
    assert "vs first" in head and "same output" in head
    cells = row.split()
    # the key has spaces; the numbers follow it
    nums = cells[4:]
    assert float(nums[0]) == pytest.approx(0.011)          # new's median
    assert float(nums[1]) == pytest.approx(0.022)          # old's median
    assert float(nums[2]) == pytest.approx(2.0)            # old / new
    assert float(nums[3]) == pytest.approx(0.0205)         # SDPA's median over all six runs
    assert nums[4] == "1.86x" and nums[5] == "0.93x"       # 0.0205 / 0.011, 0.0205 / 0.022
    assert nums[6] == "False"                              # one run hashed differently


def test_summary_same_output_when_every_hash_agrees(ab):
    results = {"a": [run(0.01, 0.02, "h")], "b": [run(0.01, 0.02, "h")]}
    assert ab.summary(["a", "b"], results)[1].endswith("True")


def test_key_names_the_shape_and_page(ab):
    assert ab.key(8, 32768, 16) == "(8, 32k) page 16"
