"""perf/vllm_gpu_bench.py's bookkeeping, on CPU with a stand-in engine: a GPU sitting costs
minutes of device time before its first number, so a mistake in how the bench counts prefill
steps, decode steps or mid-run compiles must show up here first."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    # the bench imports vllm.SamplingParams inside timed_decode; a stand-in suffices here
    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.syspath_prepend(str(ROOT / "perf"))
    import vllm_gpu_bench
    return vllm_gpu_bench


class _Out:
    def __init__(self, rid, tokens, finished=False):
        self.request_id = rid
        self.outputs = [types.SimpleNamespace(token_ids=[0] * tokens)]
        self.finished = finished


class _Engine:
    """Requests get their first token after `prefill_steps` steps, one more per step after."""

    def __init__(self, prefill_steps):
        self.prefill_steps = prefill_steps
        self.ids, self.steps, self.aborted = [], 0, []

    def add_request(self, rid, prompt, params):
        self.ids.append(rid)

    def has_unfinished_requests(self):
        return True

    def step(self):
        self.steps += 1
        n = max(0, self.steps - self.prefill_steps + 1)
        return [_Out(r, n) for r in self.ids]

    def abort_request(self, ids):
        self.aborted += list(ids)


def test_timed_decode_counts_prefill_and_decode_steps(bench):
    eng = _Engine(prefill_steps=4)
    calls = iter(range(100))
    prefill_s, tpot, n_calls, rows, prefill = bench.timed_decode(
        types.SimpleNamespace(llm_engine=eng), [{}, {}], 5, calls=lambda: next(calls),
        prefill_profile_steps=2)
    assert prefill["steps"] == 4 and len(prefill["step_s"]) == 4
    assert eng.steps == 4 + 5          # the prefill, then exactly the timed decode steps
    assert prefill_s >= 0 and tpot >= 0 and rows == []
    assert n_calls == 1                # calls() read once after the prefill, once at the end
    assert len(prefill["profile"]) == 2   # the first two prefill steps ran under the profiler
    for p in prefill["profile"]:
        assert p["wall_us"] > 0 and isinstance(p["kernels"], list)
    assert sorted(eng.aborted) == ["timed-0", "timed-1"]


def test_timed_decode_times_each_decode_step_and_sees_a_mid_decode_compile(bench, tmp_path,
                                                                           monkeypatch):
    """One slow decode step (a compile) must show as the max step, and a kernel compiled during
    the timed decode must be told apart from one compiled during the prefill."""
    import time as _time

    from triton import knobs

    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path))

    def compile_(name):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.json").write_text("{}")

    class Compiling(_Engine):
        def step(self):
            outs = super().step()
            if self.steps == 2:
                compile_("prefill_kernel")
            if self.steps == self.prefill_steps + 3:
                compile_("decode_kernel")
                _time.sleep(0.05)
            return outs

    eng = Compiling(prefill_steps=3)
    _, tpot, _, _, prefill = bench.timed_decode(types.SimpleNamespace(llm_engine=eng), [{}], 5)
    steps = prefill["decode_step_s"]
    assert len(steps) == 5 and max(steps) == steps[2] >= 0.05
    assert tpot >= 0.05 / 5
    assert prefill["cache_at_first_token"] == ["prefill_kernel/prefill_kernel"]


def test_timed_decode_refuses_a_short_decode(bench):
    class Ending(_Engine):
        def step(self):
            outs = super().step()
            done = self.steps >= self.prefill_steps + 2
            return [_Out(o.request_id, len(o.outputs[0].token_ids), done) for o in outs]

    with pytest.raises(RuntimeError, match="full-batch decode steps"):
        bench.timed_decode(types.SimpleNamespace(llm_engine=Ending(3)), [{}], 5)


def test_triton_cache_entries_see_a_new_compile(bench, tmp_path, monkeypatch):
    from triton import knobs

    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path))
    (tmp_path / "AAA").mkdir()
    (tmp_path / "AAA" / "decode_split_kernel.json").write_text("{}")
    (tmp_path / "AAA" / "__grp__decode_split_kernel.json").write_text("{}")
    before = bench.triton_cache_entries()
    assert before == {"AAA/decode_split_kernel"}
    (tmp_path / "BBB").mkdir()
    (tmp_path / "BBB" / "prefill_kernel.json").write_text("{}")
    new = bench.triton_cache_entries() - before
    assert sorted(e.split("/")[1] for e in new) == ["prefill_kernel"]


def test_ab_summary_takes_medians_and_skips_failed_runs(monkeypatch):
    """perf/vllm_ab.py: each build's median TPOT over the rounds that returned, against bf16's
    median; a build with no result has no ratio rather than a wrong one."""
    monkeypatch.syspath_prepend(str(ROOT / "perf"))
    import vllm_ab

    rows = vllm_ab.summarize({"new": [9.6, 9.8, 9.7], "old": [9.9, None, 9.7], "broken": [None]},
                             [12.8, 12.6, None])
    by = {r["build"]: r for r in rows}
    assert by["new"]["median_ms"] == pytest.approx(9.7)
    assert by["new"]["vs_bf16"] == pytest.approx(9.7 / 12.7)
    assert by["old"]["median_ms"] == pytest.approx(9.8)
    assert by["broken"]["median_ms"] is None and by["broken"]["vs_bf16"] is None
    assert vllm_ab.summarize({"x": [9.0]}, [None])[0]["vs_bf16"] is None
