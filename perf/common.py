"""Benchmark cases and GPU timers shared by perf/gpu_check.py and the pytest-benchmark suites.

Every time reported is GPU time: CUDA-graph replays timed with CUDA events
(triton.testing.do_bench_cudagraph, median), so launch overhead is out of the numbers.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch
import triton

import tq_ops  # noqa: F401  (registers torch.ops.turboquant)
from tq_ops import TQCodec, preset

# Llama-3-8B attention geometry, the acceptance shapes of issue 3
HQ, HKV, HEAD_DIM = 32, 8, 128
DECODE_SHAPES = [(1, 4096), (1, 32768), (1, 131072), (8, 4096), (8, 32768), (32, 16384),
                 (64, 8192)]
BLOCK_SIZE = 16        # vLLM's default page size
ENCODE_TOKENS = 32768  # tokens per encode+write benchmark call (x 8 KV heads)


class CudaClock:
    """A pytest-benchmark timer reading GPU time: seconds between the first call's CUDA event
    and this call's (both synchronised), so a round's (t1 - t0) is the GPU time of its work."""

    def __init__(self) -> None:
        self.start = None

    def __call__(self) -> float:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        ev.synchronize()
        if self.start is None:
            self.start = ev
            return 0.0
        return self.start.elapsed_time(ev) * 1e-3


_CLOCK = CudaClock()


def cuda_timer() -> float:
    """--benchmark-timer=perf.common.cuda_timer (pytest-benchmark wants a named function)."""
    return _CLOCK()


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def sm_clock() -> dict | None:
    """SM clock (MHz), power draw (W) and active clock-limit reasons (a hex mask; 0x4 is the
    software power cap) of the first GPU nvidia-smi lists (the device machines have one card
    per run), read now; None without nvidia-smi.
    The decode kernel is compute-bound, so its time follows this clock, which falls under
    sustained load (perf/NOTES.md, session 7); SDPA over fp16 is memory-bound and does not."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        mhz, watts, reasons = (x.strip() for x in out.stdout.strip().splitlines()[0].split(","))
        return dict(sm_mhz=int(float(mhz)), watts=float(watts), reasons=reasons)
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def keep_busy(fn: Callable[[], object], seconds: float) -> None:
    """Run fn back to back for about `seconds`, so that a timing after it sees the clocks of a
    card under sustained load (a serving GPU) rather than a cool card's boost clock."""
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()


def save_jsonl(out_dir: str | None, name: str, records: list[dict]) -> None:
    """records as JSON lines in out_dir/name (nothing without an out_dir)."""
    if out_dir:
        with open(os.path.join(out_dir, name), "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


def gpu_ms(fn: Callable[[], object], rep: int = 200) -> float:
    """Median GPU time of fn in ms, graph-captured (no launch overhead)."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


@dataclass
class DecodeCase:
    run: Callable[[], torch.Tensor]
    bytes_read: int         # compressed cache bytes the kernel must read
    fp16_bytes: int         # the same context as fp16 K+V
    args: tuple = ()        # paged_decode_attention's arguments (for launch-config exploration)


def decode_case(batch: int, ctx: int, block_size: int = BLOCK_SIZE, fmt: str = "seed",
                seed: int = 0, raw_tokens: int = 0,
                heads: tuple[int, int, int] = (HQ, HKV, HEAD_DIM)) -> DecodeCase:
    """A packed paged cache holding `ctx` tokens per sequence (written by write_cache from random
    K/V, pages in shuffled order) and one fp16 query per sequence; raw_tokens exact tokens per
    sequence in the raw pool besides them (vLLM's flush buffer holds 1..128).  heads: (query
    heads, KV heads, head_dim), the issue's Llama-3-8B geometry by default."""
    hq, hkv, head_dim = heads
    cfg = preset(fmt, head_dim=head_dim)
    codec = TQCodec.build(cfg, "cuda")
    lay = cfg.layout
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pages_per_seq = math.ceil(ctx / block_size)
    nblocks = batch * pages_per_seq + 1
    cache = torch.empty((nblocks, hkv, block_size * lay.slot_bytes), dtype=torch.uint8,
                        device="cuda")
    # the page order from its own generator: the same K/V/q at every page size
    perm_gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    perm = torch.randperm(nblocks - 1, generator=perm_gen, device="cuda") + 1
    block_table = perm.reshape(batch, pages_per_seq).to(torch.int32)
    chunk = 1 << 16
    for b in range(batch):
        for t0 in range(0, ctx, chunk):
            n = min(chunk, ctx - t0)
            pos = torch.arange(t0, t0 + n, device="cuda")
            slots = block_table[b, pos // block_size].long() * block_size + pos % block_size
            k = torch.randn((n, hkv, head_dim), generator=gen, device="cuda", dtype=torch.float16)
            v = torch.randn((n, hkv, head_dim), generator=gen, device="cuda", dtype=torch.float16)
            torch.ops.turboquant.write_cache(k, v, cache, slots, codec.rotation,
                                             codec.qjl_projection, codec.key_centroids,
                                             codec.value_centroids, cfg.key_mse_bits,
                                             cfg.use_qjl, cfg.value_bits)
    q = torch.randn((batch, hq, head_dim), generator=gen, device="cuda", dtype=torch.float16)
    kv_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    rows = max(1, raw_tokens)
    raw_k = torch.randn((batch, rows, hkv, head_dim), generator=gen, device="cuda",
                        dtype=torch.float16)
    raw_v = torch.randn((batch, rows, hkv, head_dim), generator=gen, device="cuda",
                        dtype=torch.float16)
    raw_index = torch.arange(batch, dtype=torch.int32, device="cuda")
    raw_lens = torch.full((batch,), raw_tokens, dtype=torch.int32, device="cuda")
    args = (q, cache, block_table, kv_lens, raw_k, raw_v, raw_index, raw_lens, codec.rotation,
            codec.qjl_projection, codec.key_centroids, codec.value_centroids, cfg.key_mse_bits,
            cfg.use_qjl, cfg.value_bits, head_dim ** -0.5, 0)

    def run():
        return torch.ops.turboquant.paged_decode_attention(*args)

    raw_bytes = batch * raw_tokens * hkv * head_dim * 4
    return DecodeCase(run, batch * ctx * hkv * lay.slot_bytes + raw_bytes,
                      batch * (ctx + raw_tokens) * hkv * head_dim * 4, args)


def sdpa_case(batch: int, ctx: int, seed: int = 0,
              heads: tuple[int, int, int] = (HQ, HKV, HEAD_DIM)
              ) -> tuple[Callable[[], torch.Tensor], str]:
    """torch SDPA, flash backend, fp16 K/V (B, Hkv, ctx, D) contiguous, one query token; heads as
    decode_case's.

    GQA: enable_gqa=True when the flash backend takes it; otherwise the G query heads of a KV
    head are passed as G query positions (non-causal), which reads each K/V byte once as well.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    hq, hkv, head_dim = heads
    gen = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn((batch, hkv, ctx, head_dim), generator=gen, device="cuda", dtype=torch.float16)
    v = torch.randn((batch, hkv, ctx, head_dim), generator=gen, device="cuda", dtype=torch.float16)
    q = torch.randn((batch, hq, 1, head_dim), generator=gen, device="cuda", dtype=torch.float16)

    def gqa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v, enable_gqa=True)

    def grouped():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q.reshape(batch, hkv, hq // hkv, head_dim), k, v)

    try:
        gqa()
        torch.cuda.synchronize()
        return gqa, "sdpa flash, enable_gqa=True"
    except RuntimeError:
        grouped()
        return grouped, "sdpa flash, GQA group as query positions"


def encode_case(tokens: int = ENCODE_TOKENS, fmt: str = "seed", seed: int = 0,
                declared: bool = False) -> tuple[Callable[[], None], int]:
    """write_cache of `tokens` tokens x 8 KV heads of fp16 K and V; returns (run, input bytes).
    declared: the op with exact16_matrices=True, as the vLLM backend calls it for TQCodec's
    matrices (the default is the op's default, False)."""
    cfg = preset(fmt, head_dim=HEAD_DIM)
    codec = TQCodec.build(cfg, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    bs = BLOCK_SIZE
    nblocks = math.ceil(tokens / bs)
    cache = torch.empty((nblocks, HKV, bs * cfg.slot_bytes), dtype=torch.uint8, device="cuda")
    slots = torch.randperm(nblocks * bs, generator=gen, device="cuda")[:tokens].to(torch.int32)
    k = torch.randn((tokens, HKV, HEAD_DIM), generator=gen, device="cuda", dtype=torch.float16)
    v = torch.randn((tokens, HKV, HEAD_DIM), generator=gen, device="cuda", dtype=torch.float16)

    def run():
        torch.ops.turboquant.write_cache(k, v, cache, slots, codec.rotation, codec.qjl_projection,
                                         codec.key_centroids, codec.value_centroids,
                                         cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits, declared)

    return run, 2 * k.numel() * k.element_size()


@dataclass
class PrefillCase:
    args: tuple          # paged_prefill_attention's 20 positional arguments
    dequant_args: tuple  # paged_dequantize's arguments for the same prefix, one row range
    dstart: torch.Tensor  # (segments,) int32: each segment's first decoded row (all 0)


def prefill_case(prefix: int, chunk: int, segment: int, page: int = 128, fmt: str = "seed",
                 seed: int = 0) -> PrefillCase:
    """One request whose `chunk` new tokens follow `prefix` compressed ones, cut into segments of
    `segment` queries (tq_vllm's flush groups: segment i sees the compressed positions before its
    own start, prefix + i * segment, and its own tokens exact).  segment == chunk: one sequence
    over the prefix.  Random fp16 K/V written by write_cache for every position before the last
    segment, pages in shuffled order."""
    cfg = preset(fmt, head_dim=HEAD_DIM)
    codec = TQCodec.build(cfg, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = prefix + chunk
    pages = math.ceil(total / page)
    cache = torch.empty((pages + 1, HKV, page * cfg.slot_bytes), dtype=torch.uint8,
                        device="cuda")
    row = (torch.randperm(pages, generator=gen, device="cuda") + 1).to(torch.int32)
    n_seg = chunk // segment
    written = prefix + (n_seg - 1) * segment
    for t0 in range(0, written, 1 << 15):
        pos = torch.arange(t0, min(written, t0 + (1 << 15)), device="cuda")
        slots = row[pos // page].long() * page + pos % page
        k = torch.randn((pos.numel(), HKV, HEAD_DIM), generator=gen, device="cuda",
                        dtype=torch.float16)
        v = torch.randn((pos.numel(), HKV, HEAD_DIM), generator=gen, device="cuda",
                        dtype=torch.float16)
        torch.ops.turboquant.write_cache(k, v, cache, slots, codec.rotation,
                                         codec.qjl_projection, codec.key_centroids,
                                         codec.value_centroids, cfg.key_mse_bits, cfg.use_qjl,
                                         cfg.value_bits)
    q = torch.randn((chunk, HQ, HEAD_DIM), generator=gen, device="cuda", dtype=torch.float16)
    k = torch.randn((chunk, HKV, HEAD_DIM), generator=gen, device="cuda", dtype=torch.float16)
    v = torch.randn((chunk, HKV, HEAD_DIM), generator=gen, device="cuda", dtype=torch.float16)
    ints = lambda xs: torch.tensor(xs, dtype=torch.int32, device="cuda")  # noqa: E731
    cu = ints(list(range(0, chunk + 1, segment)))
    prefix_lens = ints([prefix + i * segment for i in range(n_seg)])
    bt = row[None, :].expand(n_seg, pages).contiguous()
    raw = torch.zeros((1, 1, HKV, HEAD_DIM), dtype=torch.float16, device="cuda")
    zeros = ints([0] * n_seg)
    fmt_args = (cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits)
    mats = (codec.rotation, codec.qjl_projection, codec.key_centroids, codec.value_centroids)
    args = (q, k, v, cu, cache, bt, prefix_lens, raw, raw, zeros, zeros, *mats, *fmt_args,
            HEAD_DIM ** -0.5, 0)
    dequant_args = (cache, row[None, :].contiguous(), ints([written]), ints([0]), written, *mats,
                    *fmt_args, 0, torch.float16)
    return PrefillCase(args, dequant_args, zeros)


def sdpa_prefill_case(prefix: int, chunk: int, seed: int = 0) -> Callable[[], object]:
    """What the exact model's chunked prefill of the same request costs: flash SDPA (fp16) of
    the chunk's queries over the prefix (no mask) and over the chunk itself (causal)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn((1, HQ, chunk, HEAD_DIM), generator=gen, device="cuda", dtype=torch.float16)
    kp = torch.randn((1, HKV, prefix, HEAD_DIM), generator=gen, device="cuda",
                     dtype=torch.float16)
    kc = torch.randn((1, HKV, chunk, HEAD_DIM), generator=gen, device="cuda",
                     dtype=torch.float16)

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            a = sdpa(q, kp, kp, enable_gqa=True)
            b = sdpa(q, kc, kc, is_causal=True, enable_gqa=True)
        return a, b
    return run
