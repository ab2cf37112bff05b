"""Builds of our backend against each other inside vLLM, in one sitting (GPU, vLLM installed).

Op-level sweeps did not predict what helps inside vLLM (perf/NOTES.md, session 11: two waves
of split programs and 64-token pages were faster at the op level and not in vLLM), so decode
changes are ranked here.  A build is a copy of the code (tq_ops, tq_vllm and
perf/vllm_gpu_bench.py) in a folder of its own, made on the development machine and carried to the GPU machine as untracked files:

    mkdir -p perf/scratch/old
    git archive REV tq_ops tq_vllm perf/vllm_gpu_bench.py | tar -x -C perf/scratch/old

(perf/scratch is untracked, not ignored, so the device tool copies it; edit a copy to make a
variant).  Then on the GPU machine, after the vLLM install (`. /root/stash/env.sh`):

    PYTHONPATH=. python3 perf/vllm_ab.py . perf/scratch/old [--rounds 2] [--out DIR]

Each round runs `perf/vllm_gpu_bench.py one tq 32768 8` from every build in turn (its own
process, its own code first on sys.path) and then `one auto` (bf16), so that bf16's drift between
runs (12.59-12.93 ms over the sittings of sessions 8-11) shows beside the builds'.  A round of
two builds and bf16 takes about five minutes.  Prints, last, each build's TPOT per round, their
median, and its ratio to bf16's median; raw results go to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import vllm_gpu_bench

ROOT = vllm_gpu_bench.ROOT


def run_build(build: Path, config: str, ctx: int, batch: int, timeout: int,
              profile_steps: int = 0, prefill_profile_steps: int = 0) -> dict | None:
    """`vllm_gpu_bench.py one CONFIG` from the build's own copy, its code first on the path;
    its RESULT, or None.  profile_steps: that many decode steps under torch.profiler after the
    timed ones (the per-kernel times in the RESULT; the TPOT is not affected);
    prefill_profile_steps: the first that many prefill steps under torch.profiler (kernels and
    host runtime calls in prefill_steps.profile; those steps' times include the profiler)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(build)] + [p for p in env.get("PYTHONPATH", "")
                                                        .split(os.pathsep) if p not in ("", ".")])
    extra = ["--profile-steps", str(profile_steps)] if profile_steps else []
    if prefill_profile_steps:
        extra += ["--prefill-profile-steps", str(prefill_profile_steps)]
    return vllm_gpu_bench._spawn(["one", config, str(ctx), str(batch), "--runner", "v1"] + extra,
                                 timeout, root=build, env=env)


def summarize(tpots: dict[str, list[float | None]], bf16: list[float | None]) -> list[dict]:
    """Per build: its TPOTs by round (None: that run failed), their median, and the median's
    ratio to bf16's median TPOT (None without a bf16 or build result)."""
    base = [t for t in bf16 if t is not None]
    base_med = statistics.median(base) if base else None
    rows = []
    for name, ts in tpots.items():
        got = [t for t in ts if t is not None]
        med = statistics.median(got) if got else None
        rows.append(dict(build=name, tpot_ms=ts, median_ms=med,
                         vs_bf16=med / base_med if med is not None and base_med else None))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("builds", nargs="+",
                    help="folders holding tq_ops, tq_vllm and perf/vllm_gpu_bench.py")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="profile this many decode steps of every run of ours (after the timed "
                         "ones) for per-kernel times")
    ap.add_argument("--prefill-profile-steps", type=int, default=0,
                    help="profile this many first prefill steps of every run of ours")
    ap.add_argument("--no-bf16", action="store_true",
                    help="skip the bf16 run of each round (no ratio is printed then)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args()
    builds = [Path(b).resolve() for b in a.builds]
    for b in builds:
        if not (b / "perf" / "vllm_gpu_bench.py").exists() or not (b / "tq_vllm").is_dir():
            ap.error(f"{b} is not a build (perf/vllm_gpu_bench.py and tq_vllm/ expected)")
    names = [str(b.relative_to(ROOT)) if b.is_relative_to(ROOT) else str(b) for b in builds]
    tpots: dict[str, list] = {n: [] for n in names}
    bf16: list = []
    raw = []
    for r in range(a.rounds):
        for name, build in zip(names, builds):
            res = run_build(build, "tq", a.ctx, a.batch, a.timeout, a.profile_steps,
                            a.prefill_profile_steps)
            tpots[name].append(res["tpot_ms"] if res else None)
            raw.append(dict(round=r, build=name, config="tq", result=res))
        if not a.no_bf16:
            res = run_build(ROOT, "auto", a.ctx, a.batch, a.timeout)
            bf16.append(res["tpot_ms"] if res else None)
            raw.append(dict(round=r, build=".", config="auto", result=res))
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / "vllm_ab.json").write_text(json.dumps(raw))
    rows = summarize(tpots, bf16)
    print(f"\nvLLM A/B, batch {a.batch}, {a.ctx}-token prompts, {a.rounds} rounds; bf16 TPOT ms "
          f"by round: {bf16}")
    print(f"{'build':>32} {'TPOT ms by round':>28} {'median':>8} {'vs bf16':>8}")
    for row in rows:
        med = f"{row['median_ms']:.3f}" if row["median_ms"] is not None else "-"
        ratio = f"{row['vs_bf16']:.4f}x" if row["vs_bf16"] is not None else "-"
        print(f"{row['build']:>32} {str(row['tpot_ms']):>28} {med:>8} {ratio:>8}")
    print("\nprefill of the batch, s, and its steps' seconds by run (chunks of max_num_batched_"
          "tokens in turn; decodes of finished requests ride along)")
    for row in raw:
        res = row["result"] or {}
        steps = (res.get("prefill_steps") or {}).get("step_s")
        print(f"{row['build']:>32} {row['config']:>5} round {row['round']}: "
              f"{res.get('prefill_s', '-')} s  steps {steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
