"""GPU check and timing of tq_vllm's prefill over the decoded-prefix budget
(DECODED_PREFIX_BUDGET_BYTES): requests cut into groups that fit (request_groups), a request
over the budget on its own attended in decoded slabs merged through paged_prefill_prefix's
prior (slab_shape), and the page-reading path (no budget), each against one decoded call.

    PYTHONPATH=. python perf/request_groups_gpu.py

Not part of gpu_check (tq_vllm's host logic; gpu_check covers the ops).  Part 1: two requests,
fp16, 32/8 heads, D=128, every budget regime.  Part 2: one request's 16k chunk in 128-token
flush groups over a 160k prefix at the default budget, timed (CUDA events, after a warm-up)."""
import time

import torch

from tq_ops import TQCodec
from tq_ops.config import TQConfig
from tq_vllm import attend
from tq_vllm.window import Window, segments

DEV = "cuda"
HQ, HKV, D = 32, 8, 128


def build(done, new, flush, bs, seed=1, dtype=torch.float16, row_align=1):
    """A cache holding positions 0 .. done+new-1 of each request (random fp16 K/V), the chunk's
    queries and exact K/V in `dtype`, and the segment plan (its rows aligned to row_align)."""
    torch.manual_seed(seed)
    w = Window(flush, 4)
    cfg = TQConfig(head_dim=D, flush_interval=flush, sink_tokens=4)
    codec = TQCodec.build(cfg, DEV)
    nblk = [-(-(a + b) // bs) for a, b in zip(done, new)]
    cache = torch.zeros(sum(nblk) + 2, HKV, bs * cfg.slot_bytes, dtype=torch.uint8, device=DEV)
    perm = torch.randperm(sum(nblk) + 2, device=DEV).to(torch.int32)
    table = torch.zeros(len(done), max(nblk), dtype=torch.int32, device=DEV)
    at = 0
    for b, n in enumerate(nblk):
        table[b, :n] = perm[at:at + n]
        at += n
    for b in range(len(done)):
        n = done[b] + new[b]
        for t0 in range(0, n, 1 << 15):
            pos = torch.arange(t0, min(n, t0 + (1 << 15)), device=DEV)
            kv = [torch.randn(pos.numel(), HKV, D, device=DEV, dtype=torch.float16)
                  for _ in range(2)]
            torch.ops.turboquant.write_cache(
                *kv, cache, table[b, pos // bs].long() * bs + pos % bs, codec.rotation,
                codec.qjl_projection, codec.key_centroids, codec.value_centroids,
                cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits)
    raw_k = torch.randn(len(done) + 1, w.row_slots, HKV, D, device=DEV, dtype=dtype)
    raw_v = torch.randn_like(raw_k)
    t = sum(new)
    q, k, v = (torch.randn(t, h, D, device=DEV, dtype=dtype) for h in (HQ, HKV, HKV))
    segs, tok = [], 0
    for b in range(len(done)):
        segs += segments(w, b, tok, done[b], done[b] + new[b])
        tok += new[b]
    rows = torch.arange(len(done), dtype=torch.int32, device=DEV)
    plan = attend.segment_plan(segs, table, rows, q.device, w.sink_tokens, row_align)
    return codec, w, plan, q, k, v, cache, raw_k, raw_v


def run(case, budget):
    codec, w, plan, q, k, v, cache, raw_k, raw_v = case
    attend.DECODED_PREFIX_BUDGET_BYTES = budget
    out = torch.full((q.shape[0], HQ, D), float("nan"), device=DEV, dtype=torch.float16)
    attend.prefill_varlen(codec, w, plan, q, k, v, cache, raw_k, raw_v, D ** -0.5, out)
    return out


def main():
    default = attend.DECODED_PREFIX_BUDGET_BYTES
    row = HKV * D * 2 * 2  # fp16 decoded K and V per position
    case = build([400, 700], [350, 200], 16, 16)
    rows = case[2].req_rows
    ref = run(case, 1 << 40).float()
    print("part 1: two requests (decoded rows", rows, "), fp16, 32/8 heads, D=128")
    t0 = time.time()
    run(case, min(rows) * row)
    torch.cuda.synchronize()
    print(f"  first call with slabs (compiles the prior and partial variants): "
          f"{time.time() - t0:.2f} s")
    for name, budget in [("one call", 1 << 40), ("each request", max(rows) * row),
                         ("first decoded, second in slabs", min(rows) * row),
                         ("both in slabs", 300 * row), ("pages", 0)]:
        out = run(case, budget).float()
        torch.cuda.synchronize()
        err = float((out - ref).abs().max() / ref.abs().max())
        print(f"  {name:32s} groups {attend.request_groups(case[2], budget // row)}  "
              f"max rel diff vs one call {err:.2e}  nan {bool(out.isnan().any())}")
    del case
    torch.cuda.empty_cache()
    prefix, chunk = 163840, 16384
    case = build([prefix], [chunk], 128, 128)
    print(f"part 2: one request, {chunk}-token chunk in 128-token groups over {prefix} "
          f"positions (decoded rows {case[2].decoded_rows}, {case[2].decoded_rows * row >> 20}"
          f" MiB in fp16), default budget {default >> 20} MiB")
    group, slab = attend.slab_shape(chunk, HQ, D, HKV, torch.float16, default)
    print(f"  slab_shape at the default budget: {group} query tokens per group, {slab} rows "
          f"per slab")
    ref = None
    for name, budget in [("one decoded call (no budget)", 1 << 40),
                         ("slabs (default budget)", default), ("pages", 0)]:
        t0 = time.time()
        out = run(case, budget)  # warm-up (compiles what part 1 did not)
        torch.cuda.synchronize()
        first = time.time() - t0
        times = []
        for _ in range(3):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = run(case, budget)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        peak = torch.cuda.max_memory_allocated() >> 20
        o = out.float()
        ref = o if ref is None else ref
        err = float((o - ref).abs().max() / ref.abs().max())
        print(f"  {name:30s} {min(times):8.2f} ms (best of 3: "
              f"{', '.join(f'{x:.2f}' for x in times)})  rel diff vs one call {err:.2e}  "
              f"peak allocated {peak} MiB; first call {first:.2f} s")
        torch.cuda.reset_peak_memory_stats()
    attend.DECODED_PREFIX_BUDGET_BYTES = default


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s)")
