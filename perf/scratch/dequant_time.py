"""GPU time of turboquant::paged_dequantize at tq_vllm's prefill shape (one request, pages of
128, 8 KV heads, D 128, seed format), for source trees given on the command line (make_trees.sh),
in interleaved rounds; each tree's outputs are compared with the first tree's.

    PYTHONPATH=. python perf/scratch/dequant_time.py perf/scratch/trees/main . [--rounds 3]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys

CHILD = r'''
import json, sys, torch, triton
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[2])
from perf.common import prefill_case
import tq_ops  # noqa: F401
out = {}
for prefix in (16384, 32768):
    case = prefill_case(prefix, 128, 128)
    a = list(case.dequant_args)
    for dt in (torch.float16, torch.float32):
        a[-1] = dt
        fn = lambda: torch.ops.turboquant.paged_dequantize(*a)
        k, v = fn()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
        torch.save((k.cpu(), v.cpu()), f"/tmp/dq_{prefix}_{str(dt)[6:]}_{sys.argv[3]}.pt")
        out[f"{prefix}/{str(dt)[6:]}"] = ms
print(json.dumps(out))
'''


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    times: dict[str, dict[str, list[float]]] = {t: {} for t in a.trees}
    for rnd in range(a.rounds):
        for i, t in enumerate(a.trees):
            r = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(t), here, str(i)],
                               capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-3000:])
                return 1
            for key, ms in json.loads(r.stdout.strip().splitlines()[-1]).items():
                times[t].setdefault(key, []).append(ms)
    torch = importlib.import_module("torch")
    for i, t in enumerate(a.trees):
        for key, ms in times[t].items():
            prefix, dt = key.split("/")
            line = f"{t:32s} {key:14s} " + " ".join(f"{m * 1000:7.1f}" for m in ms) + " us"
            k0, v0 = torch.load(f"/tmp/dq_{prefix}_{dt}_0.pt")
            k1, v1 = torch.load(f"/tmp/dq_{prefix}_{dt}_{i}.pt")
            rel = max(float((k1.float() - k0.float()).abs().max() / k0.float().abs().max()),
                      float((v1.float() - v0.float()).abs().max() / v0.float().abs().max()))
            print(line + f"  vs tree 0: {rel:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
