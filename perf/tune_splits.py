"""Split-count sweep for the paged decode op (GPU, one call): does the op's time follow the
split kernel's longest program, or the work per SM?

    PYTHONPATH=. python perf/tune_splits.py [--rounds 3] [--wide] [--page 128]
        [--shapes "1,131072;8,32768,64"] [--out DIR]

Not a benchmark of record (perf/gpu_check.py is).  At each shape (page 128, what the vLLM
backend runs; the built-in codebooks declared, as the backend calls the op) it times the op at
one wave's split count (`tq_ops.triton.decode.num_splits(..., waves=1)`) and at its neighbours
and two waves', and the op as it launches itself (one wave), in interleaved rounds, and
prints beside each the quantities the two models predict from: the longest program's tiles
(`ceil(tiles / splits)` rounded as `split_partial` rounds it) and the programs per resident
slot (`rows * splits / (resident * SMs)`).  The outputs of every split count are
compared with one wave's (they differ only in the order of the log-sum-exp merge).  Readings:
perf/NOTES.md, session 10; session 11 found that its cases (several large caches built in one
process) time the op 10-14% slower than gpu_check's table, and that the two waves it favoured
lost inside vLLM: rank split counts there (perf/vllm_ab.py) before adopting one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

PAGE = 128
# (batch, ctx, raw tokens): the decode shapes and vLLM's (8, 32k) with its flush buffer
SHAPES = [(8, 32768, 64), (8, 32768, 0), (1, 32768, 0), (1, 131072, 0), (32, 16384, 0),
          (64, 8192, 0), (8, 4096, 0)]
# vLLM's (8, 32k) bench: block tables for max_model_len 33,024 positions, compressed lengths
# 32,768..33,024 over its timed steps
VLLM_CAPACITY, VLLM_LENGTHS = 33024, (32768, 32896, 33024)


def longest_program_tiles(ctx: int, splits: int, block_n: int) -> int:
    """Tiles of the longest split program, as split_partial divides the positions."""
    per = math.ceil(math.ceil(ctx / splits) / block_n)
    return min(per, math.ceil(ctx / block_n))


def candidates(rows: int, ctx: int, slots: int, default: int, block_n: int,
               wide: bool) -> list[int]:
    one_wave = max(1, slots // rows)
    if not wide:
        return sorted({s for s in (default - 1, default, default + 1, 2 * one_wave)
                       if 1 <= s <= max(1, ctx // block_n)})
    near = range(max(1, default - 4), default + 6)
    two = range(max(1, 2 * one_wave - 3), 2 * one_wave + 3)
    cap = max(1, ctx // block_n)
    return sorted({s for s in (*near, *two, one_wave + 1) if 1 <= s <= cap})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--wide", action="store_true",
                    help="sweep ~16 counts around one wave's (session 10's first run)")
    ap.add_argument("--vllm-only", action="store_true",
                    help="only vLLM's (8, 32k) bench lengths at its block-table capacity")
    ap.add_argument("--page", type=int, default=PAGE,
                    help="block size (page 64 is gpu_check's table; 128 what vLLM runs)")
    ap.add_argument("--shapes", type=str, default=None,
                    help="'batch,ctx[,raw];...' instead of the issue's shapes (and vLLM's)")
    ap.add_argument("--out", type=str, default=os.environ.get("OUT"))
    a = ap.parse_args()

    import common as C
    from tq_ops.ops.paged_decode_attention import launch
    from tq_ops.triton.decode import decode_config, num_splits, page_tile

    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    cfg = decode_config("sm90", C.HEAD_DIM, 2)
    block_n = page_tile(a.page, cfg, C.HEAD_DIM)
    slots = cfg.resident_programs_per_sm * sms
    recs = []
    if a.shapes:
        picked = [tuple(int(v) for v in s.split(",")) for s in a.shapes.split(";")]
        shapes = [(s[0], s[1], s[2] if len(s) > 2 else 0, s[1]) for s in picked]
    else:
        shapes = [] if a.vllm_only else [(b, ctx, raw, ctx) for b, ctx, raw in SHAPES]
        shapes += [(8, VLLM_CAPACITY, 64, n) for n in VLLM_LENGTHS]
    for batch, ctx, raw, length in shapes:
        case = C.decode_case(batch, ctx, block_size=a.page, raw_tokens=raw)
        if length != ctx:
            case.args = (*case.args[:3], torch.full((batch,), length, dtype=torch.int32,
                                                    device="cuda"), *case.args[4:])
        rows = batch * C.HKV
        default = num_splits(batch, C.HKV, ctx, sms, cfg, waves=1)
        table = num_splits(batch, C.HKV, ctx, sms, cfg)
        cands = candidates(rows, ctx, slots, default, block_n, a.wide)
        fns = {}
        ref = launch(*case.args, raw=True, builtin_codebooks=True, splits=default).float()
        for s in cands:
            def fn(s=s):
                return launch(*case.args, raw=True, builtin_codebooks=True, splits=s)
            out = fn().float()
            err = float((out - ref).abs().max() / ref.abs().max())
            fns[s] = (fn, err)
        # the op's own launch (the table's rule)
        out = launch(*case.args, raw=True, builtin_codebooks=True).float()
        fns["table"] = (lambda: launch(*case.args, raw=True, builtin_codebooks=True),
                        float((out - ref).abs().max() / ref.abs().max()))
        cands = [*cands, "table"]
        torch.cuda.synchronize()
        times = {s: [] for s in cands}
        for _ in range(a.rounds):
            for s in cands:
                times[s].append(C.gpu_ms(fns[s][0], rep=50))
        base = statistics.median(times[default])
        for s in cands:
            ms = statistics.median(times[s])
            n = table if s == "table" else s
            rec = dict(batch=batch, ctx=ctx, length=length, raw=raw, splits=s, default=default,
                       table=table,
                       programs=rows * n, slot_fill=rows * n / slots,
                       longest_tiles=longest_program_tiles(length, n, block_n),
                       ms=ms, ms_rounds=times[s], vs_default=ms / base, rel_err=fns[s][1])
            recs.append(rec)
            print("SPLITS " + json.dumps(rec), flush=True)
        del case, fns
        torch.cuda.empty_cache()
    C.save_jsonl(a.out, "tune_splits.jsonl", recs)
    print()
    print(f"card: {torch.cuda.get_device_name()}; {sms} SMs, {slots} resident split programs; "
          f"page {a.page}, tile {block_n}; command: PYTHONPATH=. python perf/tune_splits.py "
          f"--rounds {a.rounds}{' --wide' if a.wide else ''} --page {a.page}"
          f"{' --shapes ' + repr(a.shapes) if a.shapes else ''}")
    print("splits: the count launched (* one wave's; 'op N': the op's own launch, N splits); "
          "tiles: the longest program's; vs: against one wave's count")
    print(f"{'shape':>28} {'splits':>6} {'fill':>5} {'tiles':>5} {'ms':>8} {'vs wave':>8}")
    for r in recs:
        mark = " *" if r["splits"] == r["default"] else ""
        if r["splits"] == "table":
            r = dict(r, splits=f"op {r['table']}")
        shape = (f"({r['batch']},{r['ctx'] // 1024}k{'+' + str(r['raw']) if r['raw'] else ''}"
                 f"{' len ' + str(r['length']) if r['length'] != r['ctx'] else ''})")
        print(f"{shape:>28} {r['splits']:>6} {r['slot_fill']:>5.2f} {r['longest_tiles']:>5} "
              f"{r['ms']:>8.4f} {r['vs_default']:>7.3f}x{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
