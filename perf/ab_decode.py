"""Builds of the decode op against each other at the op level, in one call (GPU).

A build is a copy of the code (tq_ops and perf) in a folder of its own, made on the development
machine and carried to the GPU machine as untracked files, as for perf/vllm_ab.py:

    mkdir -p perf/scratch/old
    git archive REV tq_ops perf | tar -x -C perf/scratch/old

Then on the GPU machine:

    PYTHONPATH=. python perf/ab_decode.py . perf/scratch/old [--rounds 2] [--pages 64,16]
        [--default-args] [--heads 32,8,64]

Each round times every build in its own process (its own code first on sys.path), the order
reversed every other round, so that the card's drift shows in the spread between rounds.  A
process times torch SDPA (flash, fp16 K/V) once per shape and the op as the vLLM backend calls it
(built-in codebooks declared; with --default-args, with the op's defaults, as gpu_check's "ours"
column) at the issue's decode shapes and the given page sizes, CUDA-graph
replays (common.gpu_ms), and hashes each output.  Prints, last, the medians per build, the
ratio of each build to the first, the speedup against SDPA, and whether every build and round
gave the same output bytes (they do where the two builds launch the same arithmetic; a changed
split count changes the fp16 rounding of the softmax weights).

Builds run as separate processes because patching a module constant inside one process is
easy to get wrong: `import tq_ops.ops.paged_decode_attention as P` binds the op the package
exports, not the module (perf/NOTES.md, session 14).  The first version of this script ran on
an H200 in session 14 (perf/results/NVIDIA_H200/session14_2026-11-29.txt, items 1 and 4), this
one in session 15 (session15_2026-11-29.txt, items 1 and 7).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(1, 4096), (1, 32768), (1, 131072), (8, 4096), (8, 32768), (32, 16384), (64, 8192)]


def time_build(build: str, pages: list[int], declared: bool = True,
               heads: tuple[int, int, int] | None = None) -> dict:
    """Run in the child: time the op of `build` (its tq_ops and perf first on sys.path)."""
    sys.path[:0] = [build, os.path.join(build, "perf")]
    import torch

    import common as C
    if not os.path.abspath(C.__file__).startswith(os.path.abspath(build)):
        raise RuntimeError(f"{C.__file__} is not the build's own perf/common.py")
    out, sdpa = {}, {}
    geometry = {} if heads is None else {"heads": heads}
    for page in pages:
        for batch, ctx in SHAPES:
            if (batch, ctx) not in sdpa:
                sd, _ = C.sdpa_case(batch, ctx, **geometry)
                sdpa[(batch, ctx)] = C.gpu_ms(sd)
                del sd
            case = C.decode_case(batch, ctx, block_size=page, **geometry)

            def run():
                if declared:
                    return torch.ops.turboquant.paged_decode_attention(*case.args, True)
                return torch.ops.turboquant.paged_decode_attention(*case.args)

            o = run()
            torch.cuda.synchronize()
            digest = hashlib.sha256(o.float().cpu().numpy().tobytes()).hexdigest()[:16]
            out[key(batch, ctx, page)] = dict(ms=C.gpu_ms(run), sdpa_ms=sdpa[(batch, ctx)],
                                              sha=digest)
            del case, o
            torch.cuda.empty_cache()
    return out


def key(batch: int, ctx: int, page: int) -> str:
    return f"({batch}, {ctx // 1024}k) page {page}"


def summary(builds: list[str], results: dict[str, list[dict]]) -> list[str]:
    """Table lines: per shape, each build's median ms over its rounds, its ratio to the first
    build's, the speedup of each against SDPA's median over all runs, and whether all runs gave
    the same output bytes."""
    first = builds[0]
    lines = ["shape".ljust(20) + "".join(f"{b[-24:]:>26}" for b in builds)
             + "  " + "  ".join(f"{'vs first':>8}" for _ in builds[1:])
             + "  sdpa ms  " + " ".join(f"{'speedup':>8}" for _ in builds) + "  same output"]
    for k in results[first][0]:
        med = {b: statistics.median(r[k]["ms"] for r in results[b]) for b in builds}
        sd = statistics.median(r[k]["sdpa_ms"] for b in builds for r in results[b])
        same = len({r[k]["sha"] for b in builds for r in results[b]}) == 1
        lines.append(k.ljust(20) + "".join(f"{med[b]:>26.4f}" for b in builds) + "  "
                     + "  ".join(f"{med[b] / med[first]:>8.4f}" for b in builds[1:])
                     + f"  {sd:7.4f}  " + " ".join(f"{sd / med[b]:>7.2f}x" for b in builds)
                     + f"  {same}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("builds", nargs="+", help="folders holding tq_ops/ and perf/ of a build")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pages", default="64,16")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--default-args", action="store_true",
                    help="time the op with its defaults (builtin_codebooks=False)")
    ap.add_argument("--heads", default=None,
                    help="query heads, KV heads, head_dim (default: common.py's 32,8,128)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    pages = [int(p) for p in a.pages.split(",")]
    heads = None if a.heads is None else tuple(int(v) for v in a.heads.split(","))
    if a.child:
        print("RESULT " + json.dumps(time_build(a.builds[0], pages, not a.default_args,
                                                heads)), flush=True)
        return 0
    builds = [os.path.abspath(b) for b in a.builds]
    results: dict[str, list[dict]] = {b: [] for b in builds}
    for rnd in range(a.rounds):
        for build in builds if rnd % 2 == 0 else builds[::-1]:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), build, "--child",
                                "--pages", a.pages]
                               + (["--default-args"] if a.default_args else [])
                               + (["--heads", a.heads] if a.heads else []),
                               capture_output=True, text=True, cwd=build)
            got = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not got:
                print(f"{build} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
                return 1
            results[build].append(json.loads(got[0][7:]))
            print(f"round {rnd}: {build} done", flush=True)
            if a.out:  # after every build, so a call cut short keeps what it measured
                with open(os.path.join(a.out, "ab_decode.json"), "w") as f:
                    json.dump(results, f, indent=1)
    print()
    print("ms: median over rounds of CUDA-graph replays of the op "
          + ("with its default arguments" if a.default_args else "with built-in codebooks declared")
          + "; vs first: a build's median over the first build's; speedup: SDPA flash on fp16 "
          "K/V over the build" + (f"; heads {a.heads}" if a.heads else ""))
    for line in summary(builds, results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
