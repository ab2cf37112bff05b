"""Launch constants of a decode step's small, latency-bound launches (GPU, one call).

    PYTHONPATH=. python perf/tune_small_launches.py [--layers 24] [--only variants,write,side]
        [--rounds 3]

Not a benchmark of record (perf/gpu_check.py is).  Three parts:

1. Query prep and merge of paged_decode_attention: the op runs at (1, 4k) and at (8, 32k) with 64
   exact raw tokens per sequence (vLLM's flush buffer, average fill) under each variant of the
   launch constants of tq_ops.ops.paged_decode_attention (warps, tiles, rows per program).  For
   each: the op's time (CUDA-graph replay) and each kernel's time per call (torch.profiler,
   eager), and the largest difference from the first variant's output relative to its largest
   entry (launch constants change only the order of fp32 sums).
2. A decode step's cache write (8 tokens x 8 KV heads, bf16 slices of a fused qkv buffer, as
   vLLM passes them): one encode_pair_kernel launch against the two encode_kernel launches,
   into `--layers` caches of vLLM's size at 0.85 memory use on an H200 (32,652 blocks of 128
   tokens each) written in turn, so no write finds the previous one's pages in the TLB or L2.
   Then the pair again with cold matrices, as inside vLLM: one codec per layer (each attention
   layer builds its own, so its Pi and S' copies are its own) and a 256 MiB copy before each
   write standing in for the layer's GEMMs, which stream its weights through L2; the copy's own
   time, measured alone in the same run, is subtracted.
3. A vLLM layer's decode-step chain (the write, the raw-pool copy, the decode) at (1, 4k) and
   (8, 32k), with the write in sequence and on a side stream (tq_vllm.attend.SideStream), in
   interleaved rounds, and the decode op alone.

perf/NOTES.md has the readings.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common as C  # noqa: E402
import gpu_check  # noqa: E402

SHAPES = [(1, 4096, 0), (8, 32768, 64)]  # (batch, context, raw tokens per sequence)
VARIANTS = [
    {},
    dict(MERGE_WARPS=2), dict(MERGE_WARPS=8), dict(MERGE_STEPS=(16, 64, 128)),
    dict(RAW_TILE=64), dict(RAW_COLUMNS=64),
    dict(PREP_ROWS=8),
    {},  # the first again: how far the clock drifted over the sweep
]
VLLM_BLOCKS = 32652


def decode_variants() -> None:
    import tq_ops.ops.paged_decode_attention  # noqa: F401  (the module, not the op it exports)
    mod = sys.modules["tq_ops.ops.paged_decode_attention"]
    for batch, ctx, raw in SHAPES:
        case = C.decode_case(batch, ctx, block_size=64, raw_tokens=raw)
        first = None
        for v in VARIANTS:
            with mock.patch.multiple(mod, **v) if v else contextlib.nullcontext():
                out = case.run().float()
                if first is None:
                    first = out
                row = dict(batch=batch, ctx=ctx, raw_tokens=raw, variant=v,
                           op_ms=round(C.gpu_ms(case.run), 4),
                           kernels_us=gpu_check.kernel_breakdown(case.run),
                           rel_diff=float((out - first).abs().max() / first.abs().max()))
            print(json.dumps(row), flush=True)
        del case
        torch.cuda.empty_cache()


def decode_write(layers: int) -> None:
    import tq_ops.ops.write_cache  # noqa: F401
    from tq_ops import TQCodec, preset

    mod = sys.modules["tq_ops.ops.write_cache"]
    cfg = preset("seed", head_dim=C.HEAD_DIM)
    cg = TQCodec.build(cfg, "cuda")
    caches = [torch.empty(VLLM_BLOCKS, C.HKV, 128 * cfg.slot_bytes, dtype=torch.uint8,
                          device="cuda") for _ in range(layers)]
    qkv = torch.randn(8, C.HQ + 2 * C.HKV, C.HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = qkv[:, C.HQ:C.HQ + C.HKV], qkv[:, C.HQ + C.HKV:]
    slots = torch.randperm(VLLM_BLOCKS, device="cuda")[:8] * 128 + 5

    def write_all():
        for cache in caches:
            torch.ops.turboquant.write_cache(k, v, cache, slots, cg.rotation, cg.qjl_projection,
                                             cg.key_centroids, cg.value_centroids,
                                             cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits)
    row = dict(kind="decode_write", tokens=8, layers=layers)
    # LATENCY_ROWS 0 sends every write to the two encode_kernel launches
    for name, rows in (("pair_us", mod.LATENCY_ROWS), ("two_launches_us", 0)):
        with mock.patch.object(mod, "LATENCY_ROWS", rows):
            row[name] = round(C.gpu_ms(write_all, rep=100) * 1e3 / layers, 2)
    codecs = [TQCodec.build(cfg, "cuda") for _ in range(layers)]
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def copies():
        for _ in caches:
            dst.copy_(src)

    def cold_writes():
        for cache, c in zip(caches, codecs):
            dst.copy_(src)
            torch.ops.turboquant.write_cache(k, v, cache, slots, c.rotation, c.qjl_projection,
                                             c.key_centroids, c.value_centroids,
                                             cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits)
    copy_ms = C.gpu_ms(copies, rep=100)
    row["copy_us"] = round(copy_ms * 1e3 / layers, 2)
    row["pair_cold_us"] = round((C.gpu_ms(cold_writes, rep=100) - copy_ms) * 1e3 / layers, 2)
    print(json.dumps(row), flush=True)


def layer_chain(case: "C.DecodeCase", side: bool = False):
    """A vLLM layer's decode-step launches: write_cache and write_raw of the batch's new token
    (fp16 slices of a fused qkv buffer, slots in a page the decode does not read), then the
    decode.  side=True forks the write to a side stream as the backend does on CUDA
    (tq_vllm.attend.SideStream) and joins it after the decode."""
    from tq_ops import TQCodec, preset
    from tq_vllm.attend import SideStream

    cfg = preset("seed", head_dim=C.HEAD_DIM)
    cg = TQCodec.build(cfg, "cuda")
    b = case.args[0].shape[0]
    cache = case.args[1]
    qkv = torch.randn(b, C.HQ + 2 * C.HKV, C.HEAD_DIM, device="cuda", dtype=torch.float16)
    k, v = qkv[:, C.HQ:C.HQ + C.HKV], qkv[:, C.HQ + C.HKV:]
    slots = torch.arange(b, device="cuda")  # page 0: never in the case's block table
    raw_k = torch.zeros(b + 1, 4, C.HKV, C.HEAD_DIM, device="cuda", dtype=torch.float16)
    raw_v = torch.zeros_like(raw_k)
    rows = torch.arange(b, device="cuda")
    zero = torch.zeros(b, dtype=torch.int64, device="cuda")
    stream = SideStream()
    stream.prepare(torch.device("cuda"))

    def run():
        with stream.fork(torch.device("cuda")) if side else contextlib.nullcontext():
            torch.ops.turboquant.write_cache(k, v, cache, slots, cg.rotation, cg.qjl_projection,
                                             cg.key_centroids, cg.value_centroids,
                                             cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits)
        torch.ops.turboquant.write_raw(k, v, raw_k, raw_v, rows, zero, slots)
        out = case.run()
        stream.join()
        return out
    return run


def side_stream(rounds: int) -> None:
    """Part 3: the layer chain with the write in sequence and on a side stream, interleaved
    rounds; both must give the decode's output bit for bit."""
    for batch, ctx in ((1, 4096), (8, 32768)):
        case = C.decode_case(batch, ctx, block_size=64)
        chains = {"in_sequence": layer_chain(case), "side_stream": layer_chain(case, side=True)}
        outs = {name: fn().float() for name, fn in chains.items()}
        times = {name: [] for name in chains}
        for _ in range(rounds):
            for name, fn in chains.items():
                times[name].append(C.gpu_ms(fn))
        row = dict(kind="layer_chain", batch=batch, ctx=ctx, op_ms=round(C.gpu_ms(case.run), 4),
                   same_output=bool(torch.equal(outs["in_sequence"], outs["side_stream"])),
                   clock=C.sm_clock())
        for name, got in times.items():
            row[f"{name}_ms"] = round(sorted(got)[len(got) // 2], 4)
            row[f"{name}_rounds"] = [round(x, 4) for x in got]
        print(json.dumps(row), flush=True)
        del case, chains
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24,
                    help="vLLM-sized caches written in turn by the write timing")
    ap.add_argument("--only", type=str, default="variants,write,side",
                    help="comma-separated parts: variants, write, side")
    ap.add_argument("--rounds", type=int, default=3, help="side: interleaved rounds")
    a = ap.parse_args()
    parts = set(a.only.split(","))
    print(f"card: {torch.cuda.get_device_name()}", flush=True)
    if "variants" in parts:
        decode_variants()
    if "write" in parts:
        decode_write(a.layers)
    if "side" in parts:
        side_stream(a.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
