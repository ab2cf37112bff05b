"""The decode op's time by page size (GPU, one call).

    PYTHONPATH=. python perf/tune_pages.py [--rounds 3] [--pages 32,64,128,256]

Not a benchmark of record (perf/gpu_check.py is).  The vLLM backend runs 128-token pages (a
multiple of the flush interval, tq_vllm.backend.get_preferred_block_size) while gpu_check's
table runs 64; this times the op as the backend calls it (built-in codebooks declared, the
table's split count) at each page size, the same tokens written by write_cache from the same
random K/V (common.decode_case draws the page order apart), in interleaved rounds in one
process.  Shapes: vLLM's (8, 32k) bench (a
33,024-position block table, sequences of 32,896 compressed positions, 64 raw tokens each)
and the issue's (1, 128k) and (32, 16k).  Pages of 64 tokens and more share the 64-token
tile, so their outputs must agree bit for bit (same splits, same sums).  Since session 20
32-token pages take 64-token tiles of two pages (page_tile), the same arithmetic, so they
should agree bit for bit too (not yet run; before, 16-token tiles agreed to fp32 rounding).

Session 11 (perf/NOTES.md): pages of 128 and 256 timed 6-10% slower than 64 here, but the
vLLM backend laid out as 64-token pages was no faster inside vLLM (TPOT 9.681 against 9.656 ms
with 128-token pages, one sitting).  Those launches took no register cap, so they timed other
decoders than the op's (session 31).  Session 34, the op's own kernel (H200, two rounds):
page 128 within 0.5-1.1% of page 64 at all three shapes, page 32 (two-page tiles) 8.5%
slower, the same output bytes at every page; page-64 times within 1.5% of gpu_check's in
the same session.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

# (batch, block-table capacity, compressed length, raw tokens per sequence)
SHAPES = [(8, 33024, 32896, 64), (1, 131072, 131072, 0), (32, 16384, 16384, 0)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pages", type=str, default="32,64,128,256")
    ap.add_argument("--out", type=str, default=os.environ.get("OUT"))
    a = ap.parse_args()

    import common as C
    from tq_ops.ops.paged_decode_attention import launch
    from tq_ops.triton.decode import decode_config, num_splits, page_tile

    pages = [int(p) for p in a.pages.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = decode_config("sm90", C.HEAD_DIM, 2)
    recs = []
    for batch, ctx, length, raw in SHAPES:
        fns, outs = {}, {}
        for page in pages:
            case = C.decode_case(batch, ctx, block_size=page, raw_tokens=raw)
            if length != ctx:
                case.args = (*case.args[:3], torch.full((batch,), length, dtype=torch.int32,
                                                        device="cuda"), *case.args[4:])
            fns[page] = (lambda case=case: launch(*case.args, raw=True, builtin_codebooks=True))
            outs[page] = fns[page]().float()
        ref = outs[64 if 64 in outs else pages[0]]
        torch.cuda.synchronize()
        times = {p: [] for p in pages}
        for _ in range(a.rounds):
            for p in pages:
                times[p].append(C.gpu_ms(fns[p], rep=100))
        base = statistics.median(times[64 if 64 in times else pages[0]])
        for p in pages:
            ms = statistics.median(times[p])
            rec = dict(batch=batch, ctx=ctx, length=length, raw=raw, page=p,
                       tile=page_tile(p, cfg, C.HEAD_DIM),
                       splits=num_splits(batch, C.HKV, ctx, sms, cfg), ms=round(ms, 4),
                       ms_rounds=[round(x, 4) for x in times[p]], vs_page64=round(ms / base, 4),
                       same_as_page64=bool(torch.equal(outs[p], ref)),
                       rel_err=float((outs[p] - ref).abs().max() / ref.abs().max()),
                       clock=C.sm_clock())
            recs.append(rec)
            print("PAGES " + json.dumps(rec), flush=True)
        del fns, outs, ref
        torch.cuda.empty_cache()
    C.save_jsonl(a.out, "tune_pages.jsonl", recs)
    print()
    print(f"card: {torch.cuda.get_device_name()}; command: PYTHONPATH=. python perf/tune_pages.py "
          f"--rounds {a.rounds} --pages {a.pages}")
    print(f"{'shape':>22} {'page':>5} {'tile':>5} {'splits':>6} {'ms':>8} {'vs 64':>7} {'same':>5}")
    for r in recs:
        shape = (f"({r['batch']},{r['length']}{'+' + str(r['raw']) if r['raw'] else ''})")
        print(f"{shape:>22} {r['page']:>5} {r['tile']:>5} {r['splits']:>6} {r['ms']:>8.4f} "
              f"{r['vs_page64']:>6.3f}x {str(r['same_as_page64']):>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
