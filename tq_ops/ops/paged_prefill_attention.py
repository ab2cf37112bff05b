"""turboquant::paged_prefill_attention: a varlen chunk of queries over its own raw K/V (causal), the
compressed prefix in the paged cache and the raw pool tokens, in one softmax."""
from __future__ import annotations

import math

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from tq_ops import _checks, layout, reference
from tq_ops.codec import qjl_scale
from tq_ops.ops.write_cache import check_paged_query, check_raw_pool
from tq_ops.triton.decode import LOG2E, query_prep_kernel
from tq_ops.triton.prefill import BLOCK_N, HOIST_MAX_HEAD_DIM, prefill_config, prefill_kernel
from tq_ops.triton.unpack import asm_tables, group_width


def launch(query: Tensor, key: Tensor, value: Tensor, cu_seqlens_q: Tensor, cache: Tensor,
           block_table: Tensor, prefix_lens: Tensor, raw_key: Tensor, raw_value: Tensor,
           raw_index: Tensor, raw_lens: Tensor, rotation: Tensor, projection: Tensor,
           key_centroids: Tensor, value_centroids: Tensor, key_bits: int, qjl: bool,
           value_bits: int, scale: float, kv_start: int,
           decoded_key: Tensor | None = None, decoded_value: Tensor | None = None,
           decoded_start: Tensor | None = None, prior_out: Tensor | None = None,
           prior_lse: Tensor | None = None, partial: bool = False, raw: bool = False,
           block_q: int | None = None, num_warps: int | None = None,
           block_n: int | None = None, num_stages: int | None = None):
    """The Triton body: query prep (q_rot, u), then tq_ops.triton.prefill.prefill_kernel; with
    decoded K/V no prep, and the kernel's decoded variant.  prior_out / prior_lse: the kernel's
    prior variant.  partial: phase 1 alone, returns (out fp32, lse fp32) (paged_prefill_prefix;
    key, value and the raw pool are not read).  raw=True launches the bare kernels (interpreter
    tests on CPU tensors); block_q / num_warps / block_n (the flash loops' key tile) /
    num_stages replace the fixed launch config (perf/gpu_check.py and perf/tune_decode.py
    explore them; the op never does)."""
    t, hq, d = query.shape
    b = block_table.shape[0]
    # these become tl.constexpr values: concrete ints (a guard under dynamic shapes)
    hq, d, hkv = int(hq), int(d), int(cache.shape[1])
    g = hq // hkv
    lay = layout.SlotLayout(d, key_bits, qjl, value_bits)
    bs = int(cache.shape[2]) // lay.slot_bytes
    decoded = decoded_key is not None
    default_q, default_w = prefill_config(d, decoded, g)
    block_q, num_warps = block_q or default_q, num_warps or default_w
    q = query.contiguous()
    k = key.contiguous()
    v = value.contiguous()
    rk = raw_key if raw_key.stride(-1) == 1 else raw_key.contiguous()
    rv = raw_value if raw_value.stride(-1) == 1 else raw_value.contiguous()
    dp = max(32, triton.next_power_of_2(d))
    if decoded:  # no rotated queries: the kernel's decoded variant does not read them
        qr = u = q
    else:
        qr = torch.empty((t * hq, d), dtype=torch.float32, device=q.device)
        u = torch.empty((t * hq, d), dtype=torch.float32, device=q.device) if qjl else qr
    out = torch.empty((t, hq, d), dtype=torch.float32 if partial else query.dtype,
                      device=q.device)
    lse = torch.empty((t, hq), dtype=torch.float32, device=q.device) if partial else out
    prior = prior_out is not None
    po = prior_out.contiguous() if prior else out
    pl = prior_lse.contiguous() if prior else out
    kt, vt = asm_tables(d, key_bits), asm_tables(d, value_bits)
    use_fast = q.device.type == "cuda" and kt[0] == 1 and vt[0] == 1
    prep = query_prep_kernel if raw else wrap_triton(query_prep_kernel)
    kernel = prefill_kernel if raw else wrap_triton(prefill_kernel)
    if decoded:
        dk, dv, dstart = decoded_key, decoded_value, decoded_start
    else:
        dk, dv, dstart = k, v, prefix_lens  # not read by the kernel's compressed variant
    if t * hq > 0 and not decoded:
        # no plane operands (the prefill kernel's decoders use qr, u): qr stands in for them
        prep[(triton.cdiv(t * hq, 16),)](q, rotation, projection, qr, u, qr, qr, t * hq,
                                         scale * LOG2E, qjl_scale(d), D=d, DP=dp, RB=16, JB=32,
                                         QJL=qjl, PLANES=False, KT0=0, KT1=0, q8_ptr=qr,
                                         INT8_KEYS=False, G=1, GP=1)
    kernel[(t // block_q + b, hkv)](
        q, qr, u, k, v, cu_seqlens_q, cache, block_table, prefix_lens, rk, rv, raw_index,
        raw_lens, rotation, key_centroids, value_centroids, out, dk, dv, dstart, po, pl, lse,
        kv_start, block_table.stride(0), cache.stride(0), scale * LOG2E,
        rk.stride(0), rk.stride(1), rk.stride(2), rv.stride(0), rv.stride(1), rv.stride(2),
        b, HKV=hkv, G=g,
        GP=triton.next_power_of_2(g), D=d, DP=dp, DG=group_width(d), BS=bs, BQ=block_q,
        BN=block_n or BLOCK_N, CBN=math.gcd(bs, BLOCK_N), KB=key_bits, QJL=qjl, VB=value_bits,
        OFF_KC=lay.slot_offset("k_codes"), OFF_KS=lay.slot_offset("k_signs") if qjl else 0,
        OFF_KN=lay.slot_offset("k_norm"), OFF_KG=lay.slot_offset("k_gamma") if qjl else 0,
        OFF_VC=lay.slot_offset("v_codes"), OFF_VN=lay.slot_offset("v_norm"),
        SLOT=lay.slot_bytes, USE_FAST=use_fast, KT0=kt[1], KT1=kt[2], VT0=vt[1], VT1=vt[2],
        HOIST_Q=d <= HOIST_MAX_HEAD_DIM, DECODED=decoded, PRIOR=prior, PARTIAL=partial,
        num_warps=num_warps, **({"num_stages": num_stages} if num_stages else {}))
    return (out, lse) if partial else out


def check_prefill_args(query, key, value, cu_seqlens_q, cache, block_table, prefix_lens, raw_key,
                       raw_value, raw_index, raw_lens, rotation, key_centroids, value_centroids,
                       key_bits, qjl, value_bits, kv_start, decoded_key=None,
                       decoded_value=None, decoded_start=None, prior_out=None,
                       prior_lse=None) -> int:
    """Static checks of paged_prefill_attention's arguments; returns head_dim."""
    d = check_prefix_args(query, cu_seqlens_q, cache, block_table, prefix_lens, rotation,
                          key_centroids, value_centroids, key_bits, qjl, value_bits,
                          decoded_key, decoded_value, decoded_start, prior_out, prior_lse)
    hkv = cache.shape[1]
    for name, t in (("key", key), ("value", value)):
        _checks.floats(name, t, rank=3)
        if tuple(t.shape) != (query.shape[0], hkv, d):
            _checks.fail(f"{name} must be (T={query.shape[0]}, {hkv}, {d}), got {tuple(t.shape)}")
    _checks.ints("raw_index", raw_index, rank=1)
    _checks.ints("raw_lens", raw_lens, rank=1)
    b = block_table.shape[0]
    if raw_index.shape[0] != b or raw_lens.shape[0] != b:
        _checks.fail(f"raw_index and raw_lens need {b} rows (one per sequence)")
    check_raw_pool(raw_key, raw_value, hkv, d, kv_start)
    _checks.same_device(query=query, key=key, value=value, raw_key=raw_key, raw_value=raw_value,
                        raw_index=raw_index, raw_lens=raw_lens)
    return d


def check_prefix_args(query, cu_seqlens_q, cache, block_table, prefix_lens, rotation,
                      key_centroids, value_centroids, key_bits, qjl, value_bits,
                      decoded_key=None, decoded_value=None, decoded_start=None, prior_out=None,
                      prior_lse=None) -> int:
    """The checks paged_prefill_attention and paged_prefill_prefix share: the queries, the
    segments, the compressed prefix (pages or decoded rows) and the prior; returns head_dim."""
    d, hkv = check_paged_query(query, cache, rotation, key_centroids, value_centroids, key_bits,
                               qjl, value_bits)
    _checks.ints("cu_seqlens_q", cu_seqlens_q, rank=1)
    _checks.ints("block_table", block_table, rank=2)
    _checks.ints("prefix_lens", prefix_lens, rank=1)
    b = block_table.shape[0]
    if cu_seqlens_q.shape[0] != b + 1:
        _checks.fail(f"cu_seqlens_q needs B+1 = {b + 1} entries, got {cu_seqlens_q.shape[0]}")
    if prefix_lens.shape[0] != b:
        _checks.fail(f"prefix_lens needs {b} rows (one per sequence), got {prefix_lens.shape[0]}")
    _checks.same_device(query=query, cu_seqlens_q=cu_seqlens_q, cache=cache,
                        block_table=block_table, prefix_lens=prefix_lens, rotation=rotation,
                        key_centroids=key_centroids, value_centroids=value_centroids)
    given = [x is not None for x in (decoded_key, decoded_value, decoded_start)]
    if any(given) and not all(given):
        _checks.fail("decoded_key, decoded_value and decoded_start go together: give all three "
                     "or none")
    if all(given):
        for name, x in (("decoded_key", decoded_key), ("decoded_value", decoded_value)):
            _checks.floats(name, x, rank=3)
            if x.shape[1:] != (hkv, d) or x.shape != decoded_key.shape:
                _checks.fail(f"{name} must be (N, {hkv}, {d}) like decoded_key, got "
                             f"{tuple(x.shape)}")
            if not x.is_contiguous():
                _checks.fail(f"{name} must be contiguous (paged_dequantize's output is)")
        if decoded_value.dtype != decoded_key.dtype:
            _checks.fail(f"decoded_value is {decoded_value.dtype}, decoded_key "
                         f"{decoded_key.dtype}: one dtype")
        _checks.ints("decoded_start", decoded_start, rank=1)
        if decoded_start.shape[0] != b:
            _checks.fail(f"decoded_start needs {b} entries (one per sequence), got "
                         f"{decoded_start.shape[0]}")
        _checks.same_device(query=query, decoded_key=decoded_key, decoded_value=decoded_value,
                            decoded_start=decoded_start)
    if (prior_out is None) != (prior_lse is None):
        _checks.fail("prior_out and prior_lse go together: give both or neither")
    if prior_out is not None:
        t, hq = query.shape[0], query.shape[1]
        # prior_out in 16 bits too: FlashAttention's output over the decoded prefix (tq_vllm)
        # is merged as it comes, without an fp32 copy of (T, Hq, D)
        if (prior_out.dtype not in (torch.float32, torch.float16, torch.bfloat16)
                or tuple(prior_out.shape) != (t, hq, d)):
            _checks.fail(f"prior_out must be {(t, hq, d)} float32, float16 or bfloat16 "
                         f"(paged_prefill_prefix's output is float32), got "
                         f"{tuple(prior_out.shape)} {prior_out.dtype}")
        if prior_lse.dtype != torch.float32 or tuple(prior_lse.shape) != (t, hq):
            _checks.fail(f"prior_lse must be {(t, hq)} float32 (paged_prefill_prefix's output), "
                         f"got {tuple(prior_lse.shape)} {prior_lse.dtype}")
        _checks.same_device(query=query, prior_out=prior_out, prior_lse=prior_lse)
    return d


@triton_op("turboquant::paged_prefill_attention", mutates_args=())
def paged_prefill_attention(query: Tensor, key: Tensor, value: Tensor, cu_seqlens_q: Tensor,
                            cache: Tensor, block_table: Tensor, prefix_lens: Tensor,
                            raw_key: Tensor, raw_value: Tensor, raw_index: Tensor,
                            raw_lens: Tensor, rotation: Tensor, projection: Tensor,
                            key_centroids: Tensor, value_centroids: Tensor, key_bits: int,
                            qjl: bool, value_bits: int, scale: float, kv_start: int,
                            decoded_key: Tensor | None = None,
                            decoded_value: Tensor | None = None,
                            decoded_start: Tensor | None = None,
                            prior_out: Tensor | None = None,
                            prior_lse: Tensor | None = None) -> Tensor:
    """Chunked (varlen) prefill attention: exact causal attention inside each chunk, plus the
    sequence's compressed prefix and raw pool tokens, merged exactly in one softmax.

    Positions of sequence b, in order: compressed page positions kv_start .. prefix_lens[b]-1,
    then its raw pool tokens, then its chunk.  Every chunk query sees the whole prefix (compressed
    and raw) and the chunk tokens up to and including itself.  The chunk's own K/V are read exact
    from `key`/`value` (write them to the cache separately, with write_cache, if they should persist;
    prefix_lens must then not count them).

    Args:
        query: (T, Hq, D) fp16/bf16/fp32, the chunks of all sequences, concatenated.
        key, value: (T, Hkv, D) fp16/bf16/fp32, the same tokens' exact keys and values.
        cu_seqlens_q: (B+1,) int32, cumulative chunk lengths; cu_seqlens_q[0] == 0,
            cu_seqlens_q[B] == T, non-decreasing.
        cache: (num_blocks, Hkv, block_size * slot_bytes) uint8 (tq_ops.layout).
        block_table: (B, max_blocks) int32, page ids of each sequence.
        prefix_lens: (B,) int32; page positions kv_start .. prefix_lens[b]-1 are the compressed
            prefix of sequence b (0 for a fresh prompt).
        raw_key, raw_value: (N, R, Hkv, D), the pool of exact tokens (as in
            paged_decode_attention): sequence b owns row raw_index[b], first raw_lens[b] valid.
        raw_index, raw_lens: (B,) int32.
        rotation, projection: (D, D) fp32.  key_centroids, value_centroids: fp32 codebooks.
        key_bits, qjl, value_bits: the format.  scale: softmax scale.
        kv_start: first page position attended (e.g. the sink count when sinks are kept raw).
        decoded_key, decoded_value: optional (N, Hkv, D) fp16/bf16/fp32 (one dtype), contiguous,
            the compressed prefix already decoded by paged_dequantize (same kv_start).  Given,
            compressed position p of sequence b is read from row decoded_start[b] + p - kv_start
            of them instead of from the cache: the GPU body then runs a plain flash loop over
            them (no decoding per query block), and the prefix is rounded to their dtype.
            Sequences sharing a request (the flush groups of one chunk) share its rows, so the
            prefix is decoded once per request rather than once per query block.
        decoded_start: optional (B,) int32, with decoded_key / decoded_value.
        prior_out, prior_lse: optional, both or neither: a softmax partial of each query over
            further keys (paged_prefill_prefix's output, e.g. of compressed positions past
            prefix_lens decoded in another slab, or FlashAttention's over the decoded prefix),
            merged exactly.  prior_out (T, Hq, D) fp32/fp16/bf16, the normalised partial;
            prior_lse (T, Hq) fp32, its natural-log log-sum-exp of scale * q . k, finite or
            -inf (no keys: that row's prior_out is then ignored, whatever it holds).
    Returns:
        (T, Hq, D) in query.dtype.  Query head h reads KV head h // (Hq / Hkv).
    """
    d = check_prefill_args(query, key, value, cu_seqlens_q, cache, block_table, prefix_lens,
                           raw_key, raw_value, raw_index, raw_lens, rotation, key_centroids,
                           value_centroids, key_bits, qjl, value_bits, kv_start, decoded_key,
                           decoded_value, decoded_start, prior_out, prior_lse)
    _checks.projection(projection, d)
    _checks.same_device(query=query, projection=projection)
    if query.device.type == "cuda":
        return launch(query, key, value, cu_seqlens_q, cache, block_table, prefix_lens, raw_key,
                      raw_value, raw_index, raw_lens, rotation, projection, key_centroids,
                      value_centroids, key_bits, qjl, value_bits, scale, kv_start, decoded_key,
                      decoded_value, decoded_start, prior_out, prior_lse)
    return reference.paged_prefill_attention(
        query, key, value, cu_seqlens_q, cache, block_table, prefix_lens, raw_key, raw_value,
        raw_index, raw_lens, rotation, projection, key_centroids, value_centroids, key_bits, qjl,
        value_bits, scale, kv_start, decoded_key, decoded_value, decoded_start, prior_out,
        prior_lse)
