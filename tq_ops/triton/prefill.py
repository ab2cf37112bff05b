"""Chunked (varlen) prefill attention: a chunk of queries over its own raw K/V (causal, flash
style), the compressed prefix in the paged cache and the raw pool tokens, in one online softmax.

One program = one block of BLOCK_Q query tokens (prefill_config) of one sequence x all G query
heads of one KV head (M = BLOCK_Q * GP rows, row = token * GP + head).  The grid is
(T // BLOCK_Q + B, Hkv): a program finds its sequence by binary search over the block starts cu_seqlens_q[b] // BLOCK_Q + b
(vLLM's unified-attention trick), so the grid depends on shapes only.

Phases, sharing one (max, sum) per row:
1. compressed prefix (positions kv_start .. prefix_lens[b]-1): scores sum_q dot(q_rot_q, K_q^T)
   (+ gamma * sum_q dot(u_q, Z_q^T)) from codes unpacked in registers (tq_ops.triton.unpack),
   values accumulated in the rotated domain per coordinate group;
2. raw pool tokens (original domain);
3. the chunk itself, causal.
After phase 1 the rotated accumulators are un-rotated once (dot with Pi) into the output
accumulator that phases 2 and 3 continue (so both sets never hold registers at the same time;
heads wider than 128 un-rotate at the end instead); the rotated queries are loaded once per
program as fp16 MMA operands.

The decoded variant (DECODED, the op's decoded_key / decoded_value arguments) reads phase 1
from K/V that tq_ops.triton.dequant wrote in the original domain: the same flash loop as phases
2 and 3, no rotation, no decoders.  Phase 1 above decodes the whole prefix once per program, so
a chunk of C queries decodes it C / BLOCK_Q times; the decoded variant has it decoded once per
request and is what the vLLM backend runs when the scratch fits (perf/NOTES.md, session 16).
"""
from __future__ import annotations

import triton
import triton.language as tl

from tq_ops.triton.decode import LOG2E as _LOG2E
from tq_ops.triton.decode import NEG_BIG
from tq_ops.triton.unpack import (byte_tables, fast_sign, group_centroids, load_fast,
                                  slow_sign, table_matches, tile_rows, tuple_set)

BLOCK_N = 64    # keys per tile (chunk and raw phases); compressed tiles use gcd(64, block size)
HOIST_MAX_HEAD_DIM = 128  # widest head whose queries are kept across the prefix (see the kernel)
# the GQA group prefill_config's blocks were measured at: a program holds BLOCK_Q x GP rows
TUNED_GROUP = 4


def prefill_config(head_dim: int, decoded: bool = False, group: int = 4) -> tuple[int, int]:
    """(BLOCK_Q query tokens per program, num_warps) for GQA groups of `group` query heads.
    Each program decodes the whole compressed prefix once for its BLOCK_Q x GP rows, so larger
    blocks divide the decode work: on an H100, seed format, 32/8 heads, D=128, a 2048-token chunk
    over a 30k prefix took 23.6 / 20.5 / 15.7 / 11.5 ms at (16, 4) / (32, 4) / (32, 8) / (64, 8)
    (perf/tune_decode.py, 2026-11-28).  Heads wider than HOIST_MAX_HEAD_DIM keep the small
    block: its accumulators already fill the registers.  The decoded variant (no decoding, one
    (M, D) accumulator) takes the block of a flash kernel: M = BLOCK_Q x GP rows of 64 per
    warpgroup at D <= 128.

    The blocks were chosen at groups of 4; a wider group keeps their rows (BLOCK_Q x GP) with
    fewer query tokens.  With the same BLOCK_Q a group of 8 at D = 128 asked for 294,912 bytes
    of shared memory on an H200 (limit 232,448: gpu_check's gqa8 case, session 29) and 262,144
    offline at pages of 128; at BLOCK_Q 32 it compiles to the group of 4's 196,608 bytes, 2562
    instructions per compressed tile and warp against 2565 (perf/sass_report.py --kernel
    prefill --group 8).  Not yet run on a GPU at groups other than 4 and 1."""
    if decoded:
        block_q, warps = (32, 8) if head_dim <= HOIST_MAX_HEAD_DIM else (16, 4)
    else:
        block_q, warps = (64, 8) if head_dim <= HOIST_MAX_HEAD_DIM else (16, 4)
    rows = block_q * TUNED_GROUP
    return min(block_q, max(1, rows // triton.next_power_of_2(group))), warps
LOG2_MAX_SEQS = tl.constexpr(20)  # binary-search steps: batches up to 2^20 sequences
LOG2E = tl.constexpr(_LOG2E)  # natural-log lse <-> the kernel's log2 units


@triton.jit
def _softmax_step(s, valid, m_i, l_i):
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _decoded_tile(qd, dk_ptr, dv_ptr, drow0, r0, rows, h, d, m_i, l_i, acc,
                  HKV: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr,
                  MASKED: tl.constexpr):
    """One flash step over decoded rows drow0 + r0 .. + BN of (rows, HKV, D) K/V; MASKED: the
    rows at or past `rows` (and coordinates past D) are not read and take no weight."""
    n = tl.arange(0, BN)
    drow = (drow0 + r0 + n) * (HKV * D) + h * D
    if MASKED or DP != D:
        tv = r0 + n < rows
        km = tv[:, None] & (d < D)[None, :]
        k = tl.load(dk_ptr + drow[:, None] + d[None, :], mask=km, other=0.0)
        v = tl.load(dv_ptr + drow[:, None] + d[None, :], mask=km, other=0.0)
    else:
        k = tl.load(dk_ptr + drow[:, None] + d[None, :])
        v = tl.load(dv_ptr + drow[:, None] + d[None, :])
    s = tl.dot(qd, tl.trans(k))
    if MASKED:
        p, alpha, m_i, l_i = _softmax_step(s, tv[None, :], m_i, l_i)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        m_i = m_new
        l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(dk_ptr.dtype.element_ty), v, acc * alpha[:, None])
    return m_i, l_i, acc


@triton.jit
def group_rows(ptr, row, rmask, R: tl.constexpr, D: tl.constexpr, DG: tl.constexpr):
    """Coordinate group R of fp32 rows `row` (M,) of a (rows, D) buffer, as (M, DG) fp16."""
    m = tl.arange(0, DG)
    t = tl.load(ptr + row[:, None] * D + 8 * m[None, :] + R,
                mask=rmask[:, None] & (8 * m + R < D)[None, :], other=0.0)
    return t.to(tl.float16)


@triton.jit
def load_group_rows(ptr, row, rmask, D: tl.constexpr, DG: tl.constexpr):
    """All 8 coordinate groups (group_rows) as a tuple."""
    out = ()
    for r in tl.static_range(8):
        out = out + (group_rows(ptr, row, rmask, r, D, DG),)
    return out


@triton.jit
def _add_unrotated(acc, accs, scale, rot_ptr, D: tl.constexpr, DG: tl.constexpr,
                   DP: tl.constexpr):
    """acc (M, DP) + sum_r (accs[r] * scale[:, None]) Pi[8m+r, :]: the rotated-domain value
    accumulators (8 x (M, DG), coordinate groups) taken back to the original domain."""
    mm = tl.arange(0, DG)
    d = tl.arange(0, DP)
    for r in tl.static_range(8):
        w = tl.load(rot_ptr + (8 * mm + r)[:, None] * D + d[None, :],
                    mask=(8 * mm + r < D)[:, None] & (d < D)[None, :], other=0.0)
        acc = tl.dot(accs[r] * scale[:, None], w, acc, input_precision="tf32x3")
    return acc


@triton.jit
def _compressed_phase(cache_ptr, bt_ptr, bt_row, lo, hi, kv_start, head_off, page_stride,
                      kc_ptr, vc_ptr, qts, uts, ktabs, vtabs, m_i, l_i, accs,
                      D: tl.constexpr, DG: tl.constexpr, M: tl.constexpr, BS: tl.constexpr,
                      BN: tl.constexpr, KB: tl.constexpr, QJL: tl.constexpr, VB: tl.constexpr,
                      OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KN: tl.constexpr,
                      OFF_KG: tl.constexpr, OFF_VC: tl.constexpr, OFF_VN: tl.constexpr,
                      FAST: tl.constexpr, KT0: tl.constexpr, KT1: tl.constexpr,
                      VT0: tl.constexpr, VT1: tl.constexpr, HOIST_Q: tl.constexpr):
    m = tl.arange(0, DG)
    for start in tl.range(lo, hi, BN):
        pos = start + tl.arange(0, BN)
        valid = (pos < hi) & (pos >= kv_start)
        base, tin = tile_rows(bt_ptr, bt_row, start, page_stride, head_off, BS, BN)
        krow = base + BS * OFF_KC + tin * (D * KB // 8)
        srow = base + BS * OFF_KS + tin * (D // 8)
        vrow = base + BS * OFF_VC + tin * (D * VB // 8)
        if FAST:
            kw, kx = load_fast(cache_ptr, krow[None, :], m[:, None], D, DG, KB)
            if QJL:
                sx = tl.load(cache_ptr + srow[None, :] + m[:, None], mask=(m < D // 8)[:, None],
                             other=0)
        else:
            kw, kx = None, None
        if QJL:
            # gamma folded into the +-1 sign operand (exact in fp16), so the QJL products add
            # into the one score accumulator: a second (M, BN) fp32 accumulator spilled
            kg = tl.load((cache_ptr + base + BS * OFF_KG + tin * 2).to(
                tl.pointer_type(tl.float16)))
        s = tl.zeros([M, BN], tl.float32)
        for r in tl.static_range(8):
            if HOIST_Q:
                qt = qts[r]
            else:
                qt = group_rows(qts[0], qts[1], qts[2], r, D, DG)
            kv = group_centroids(kw, kx, cache_ptr, krow[None, :], m[:, None], r, D, KB, FAST,
                                 ktabs, KT0, KT1, kc_ptr)
            s = tl.dot(qt, kv, s)
            if QJL:
                if HOIST_Q:
                    ut = uts[r]
                else:
                    ut = group_rows(uts[0], uts[1], uts[2], r, D, DG)
                if FAST:
                    z = fast_sign(sx, r)
                else:
                    z = slow_sign(cache_ptr, srow[None, :], m[:, None], r, D).to(tl.float16)
                s = tl.dot(ut, z * kg[None, :], s)
        kn = tl.load((cache_ptr + base + BS * OFF_KN + tin * 2).to(tl.pointer_type(tl.float16)))
        s = s * kn.to(tl.float32)[None, :]
        p, alpha, m_i, l_i = _softmax_step(s, valid[None, :], m_i, l_i)
        vn = tl.load((cache_ptr + base + BS * OFF_VN + tin * 2).to(tl.pointer_type(tl.float16)))
        vn = tl.where(valid, vn.to(tl.float32), 0.0)  # page rows past hi may hold anything
        pw = (p * vn[None, :]).to(tl.float16)
        a = alpha[:, None]
        accs = (accs[0] * a, accs[1] * a, accs[2] * a, accs[3] * a, accs[4] * a, accs[5] * a,
                accs[6] * a, accs[7] * a)
        if FAST:
            vw, vx = load_fast(cache_ptr, vrow[:, None], m[None, :], D, DG, VB)
        else:
            vw, vx = None, None
        for r in tl.static_range(8):
            vv = group_centroids(vw, vx, cache_ptr, vrow[:, None], m[None, :], r, D, VB, FAST,
                                 vtabs, VT0, VT1, vc_ptr)
            accs = tuple_set(accs, r, tl.dot(pw, vv, accs[r]))
    return m_i, l_i, accs


@triton.jit(do_not_specialize=['kv_start', 'n_seqs'],
            do_not_specialize_on_alignment=['cu_ptr', 'bt_ptr', 'prefix_ptr', 'raw_idx_ptr',
                                            'raw_lens_ptr', 'dstart_ptr', 'po_ptr', 'pl_ptr',
                                            'lse_ptr'])
def prefill_kernel(
        q_ptr, qr_ptr, u_ptr, k_ptr, v_ptr, cu_ptr, cache_ptr, bt_ptr, prefix_ptr,
        raw_k_ptr, raw_v_ptr, raw_idx_ptr, raw_lens_ptr, rot_ptr, kc_ptr, vc_ptr, out_ptr,
        dk_ptr, dv_ptr, dstart_ptr, po_ptr, pl_ptr, lse_ptr,
        kv_start, bt_stride, page_stride, q_scale,
        rk_s0, rk_s1, rk_s2, rv_s0, rv_s1, rv_s2, n_seqs,
        HKV: tl.constexpr, G: tl.constexpr,
        GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DG: tl.constexpr, BS: tl.constexpr,
        BQ: tl.constexpr, BN: tl.constexpr, CBN: tl.constexpr, KB: tl.constexpr,
        QJL: tl.constexpr, VB: tl.constexpr,
        OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KN: tl.constexpr, OFF_KG: tl.constexpr,
        OFF_VC: tl.constexpr, OFF_VN: tl.constexpr, SLOT: tl.constexpr,
        USE_FAST: tl.constexpr, KT0: tl.constexpr, KT1: tl.constexpr, VT0: tl.constexpr,
        VT1: tl.constexpr, HOIST_Q: tl.constexpr, DECODED: tl.constexpr,
        PRIOR: tl.constexpr, PARTIAL: tl.constexpr):
    """See the module docstring.  Output (T, Hq, D) in out_ptr's dtype.  DECODED: phase 1 reads
    the compressed positions from dk_ptr / dv_ptr ((rows, HKV, D), the original domain, rows
    dstart[b] + position - kv_start: tq_ops.triton.dequant) with the raw phases' flash loop,
    and nothing is rotated (qr_ptr, u_ptr, the cache and the codebooks are not read).
    PRIOR: po_ptr (T, Hq, D) fp32/fp16/bf16 and pl_ptr (T, Hq) fp32 (natural log) are a
    softmax partial of each query over other keys, merged in.  PARTIAL: phase 1 only; out_ptr
    gets the normalised fp32 partial and lse_ptr (T, Hq) fp32 its log-sum-exp (-inf without
    keys)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    # largest b with cu[b] // BQ + b <= pid (those block starts strictly increase with b)
    lo = 0
    hi = n_seqs - 1
    for _ in tl.static_range(LOG2_MAX_SEQS + 1):
        mid = (lo + hi + 1) // 2
        below = tl.load(cu_ptr + mid) // BQ + mid <= pid
        active = lo < hi
        lo = tl.where(active & below, mid, lo)
        hi = tl.where(active & (below == 0), mid - 1, hi)
    b = lo
    seq_start = tl.load(cu_ptr + b)
    seq_end = tl.load(cu_ptr + b + 1)
    q0 = seq_start + (pid - (seq_start // BQ + b)) * BQ
    if q0 < seq_end:
        M: tl.constexpr = BQ * GP
        rho = tl.arange(0, M)
        tok = q0 + rho // GP
        g = rho % GP
        rmask = (tok < seq_end) & (g < G)
        qrow = tok.to(tl.int64) * (HKV * G) + h * G + g
        d = tl.arange(0, DP)
        dmask = d < D
        qs = tl.cast(q_scale, tl.float32)
        qmask = rmask[:, None] & dmask[None, :]
        m_i = tl.full([M], NEG_BIG, tl.float32)
        l_i = tl.zeros([M], tl.float32)
        if PRIOR:
            # the prior as the running state's start: max lse (log2 units), sum 1, its values
            # added below at the weight the phase-1 rescaling leaves it
            plse = tl.load(pl_ptr + qrow, mask=rmask, other=float("-inf")) * LOG2E
            has_prior = plse > NEG_BIG
            m_i = tl.where(has_prior, plse, NEG_BIG)
            l_i = tl.where(has_prior, 1.0, 0.0)
            m_prior = m_i
        z = tl.zeros([M, DG], tl.float32)
        accs = (z, z, z, z, z, z, z, z)
        acc = tl.zeros([M, DP], tl.float32)
        plen = tl.load(prefix_ptr + b)
        scale_rot = tl.full([M], 1.0, tl.float32)
        if DECODED:
            # 1. compressed prefix, decoded: the same flash loop as phases 2 and 3, with the
            # MMA operands in the decoded K/V's dtype (fp16 for bf16 models too: the tq_vllm
            # scratch, 8x finer than bf16 on the compressed part)
            dt = dk_ptr.dtype.element_ty
            qd = (tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=qmask, other=0.0).to(
                tl.float32) * qs).to(dt)
            drow0 = tl.load(dstart_ptr + b).to(tl.int64)
            rows = plen - kv_start
            full = rows // BN * BN
            # whole tiles without masks (no per-element select, unpredicated copies), then the
            # partial last tile.  rows < 0 (prefix_lens below kv_start): Triton's integer
            # division truncates, so full is 0 and neither runs
            for r0 in tl.range(0, full, BN):
                m_i, l_i, acc = _decoded_tile(qd, dk_ptr, dv_ptr, drow0, r0, rows, h, d, m_i,
                                              l_i, acc, HKV, D, DP, BN, False)
            if full < rows:
                m_i, l_i, acc = _decoded_tile(qd, dk_ptr, dv_ptr, drow0, full, rows, h, d, m_i,
                                              l_i, acc, HKV, D, DP, BN, True)
        else:
            # 1. compressed prefix
            head_off = h * (BS * SLOT)
            bt_row = b.to(tl.int64) * bt_stride
            ktabs = (0, 0, 0, 0)
            vtabs = (0, 0, 0, 0)
            fast = False
            if USE_FAST:
                fast = table_matches(kc_ptr, KB, KT0, KT1) & table_matches(vc_ptr, VB, VT0, VT1)
                if KB == 3:
                    ktabs = byte_tables(kc_ptr, KB)
                if VB == 3:
                    vtabs = byte_tables(vc_ptr, VB)
            c_lo = (kv_start // CBN) * CBN
            # the rotated queries are loaded once as fp16 MMA operands for the whole prefix
            # (Triton keeps loop-invariant operands in shared memory: at head_dim 256 with QJL
            # that overflows it, so wide heads reload them per tile)
            if HOIST_Q:
                qts = load_group_rows(qr_ptr, qrow, rmask, D, DG)
                if QJL:
                    uts = load_group_rows(u_ptr, qrow, rmask, D, DG)
                else:
                    uts = qts
            else:
                qts = (qr_ptr, qrow, rmask)
                uts = (u_ptr, qrow, rmask)
            if fast:
                m_i, l_i, accs = _compressed_phase(
                    cache_ptr, bt_ptr, bt_row, c_lo, plen, kv_start, head_off, page_stride,
                    kc_ptr, vc_ptr, qts, uts, ktabs, vtabs, m_i, l_i, accs, D, DG, M, BS,
                    CBN, KB, QJL, VB, OFF_KC, OFF_KS, OFF_KN, OFF_KG, OFF_VC, OFF_VN, True, KT0,
                    KT1, VT0, VT1, HOIST_Q)
            else:
                m_i, l_i, accs = _compressed_phase(
                    cache_ptr, bt_ptr, bt_row, c_lo, plen, kv_start, head_off, page_stride,
                    kc_ptr, vc_ptr, qts, uts, ktabs, vtabs, m_i, l_i, accs, D, DG, M, BS,
                    CBN, KB, QJL, VB, OFF_KC, OFF_KS, OFF_KN, OFF_KG, OFF_VC, OFF_VN, False, KT0,
                    KT1, VT0, VT1, HOIST_Q)
            # un-rotate the compressed part, acc = sum_r accs[r] Pi[8m+r, :]: now, so the
            # rotated accumulators are dead before the raw phases need registers for theirs; wide
            # heads do it at the end instead (here Triton's shared-memory plan for it exceeds the
            # SM's at D=256), carrying the later phases' rescaling in scale_rot
            if HOIST_Q:
                acc = _add_unrotated(acc, accs, scale_rot, rot_ptr, D, DG, DP)
        if PRIOR:
            po = tl.load(po_ptr + qrow[:, None] * D + d[None, :], mask=qmask, other=0.0)
            # a row without a prior ignores its values (tq_vllm's FlashAttention partial may
            # hold anything there)
            acc += tl.where(has_prior[:, None], po * tl.exp2(m_prior - m_i)[:, None], 0.0)
        if PARTIAL:
            if not HOIST_Q and not DECODED:
                acc = _add_unrotated(acc, accs, scale_rot, rot_ptr, D, DG, DP)
            seen = l_i > 0
            inv = tl.where(seen, 1.0 / l_i, 0.0)
            tl.store(out_ptr + qrow[:, None] * D + d[None, :], acc * inv[:, None], mask=qmask)
            lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / LOG2E,
                           float("-inf"))
            tl.store(lse_ptr + qrow, lse, mask=rmask)
        else:
            _exact_phases(q_ptr, k_ptr, v_ptr, raw_k_ptr, raw_v_ptr, raw_idx_ptr, raw_lens_ptr,
                          rot_ptr, out_ptr, qrow, qmask, rmask, tok, q0, b, h, seq_start,
                          seq_end, qs, m_i, l_i, acc, accs, scale_rot, rk_s0, rk_s1, rk_s2,
                          rv_s0, rv_s1, rv_s2, HKV, D, DP, DG, BQ, BN, HOIST_Q, DECODED)


@triton.jit
def _exact_phases(q_ptr, k_ptr, v_ptr, raw_k_ptr, raw_v_ptr, raw_idx_ptr, raw_lens_ptr, rot_ptr,
                  out_ptr, qrow, qmask, rmask, tok, q0, b, h, seq_start, seq_end, qs, m_i, l_i,
                  acc, accs, scale_rot, rk_s0, rk_s1, rk_s2, rv_s0, rv_s1, rv_s2,
                  HKV: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DG: tl.constexpr,
                  BQ: tl.constexpr, BN: tl.constexpr, HOIST_Q: tl.constexpr,
                  DECODED: tl.constexpr):
    """Phases 2 and 3 (raw pool, the chunk causally) after phase 1's state, and the output."""
    d = tl.arange(0, DP)
    dmask = d < D
    n = tl.arange(0, BN)
    # the queries of the exact phases, in the chunk K/V's dtype (loaded here, after phase 1,
    # so that they hold no registers during it)
    q = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=qmask, other=0.0)
    qn = (q.to(tl.float32) * qs).to(k_ptr.dtype.element_ty)
    # 2. raw pool tokens
    rl = tl.load(raw_lens_ptr + b)
    row = tl.load(raw_idx_ptr + b).to(tl.int64)
    for r0 in tl.range(0, rl, BN):
        tv = r0 + n < rl
        km = tv[:, None] & dmask[None, :]
        k = tl.load(raw_k_ptr + row * rk_s0 + (r0 + n)[:, None] * rk_s1 + h * rk_s2 + d[None, :],
                    mask=km, other=0.0).to(k_ptr.dtype.element_ty)
        s = tl.dot(qn, tl.trans(k))
        p, alpha, m_i, l_i = _softmax_step(s, tv[None, :], m_i, l_i)
        v = tl.load(raw_v_ptr + row * rv_s0 + (r0 + n)[:, None] * rv_s1 + h * rv_s2 + d[None, :],
                    mask=km, other=0.0).to(v_ptr.dtype.element_ty)
        acc = tl.dot(p.to(v_ptr.dtype.element_ty), v, acc * alpha[:, None])
        scale_rot = scale_rot * alpha
    # 3. the chunk, causal
    kv_hi = tl.minimum(q0 + BQ, seq_end)
    for k0 in tl.range(seq_start, kv_hi, BN):
        kt = k0 + n
        kvld = kt < kv_hi
        km = kvld[:, None] & dmask[None, :]
        krow = kt.to(tl.int64) * HKV + h
        k = tl.load(k_ptr + krow[:, None] * D + d[None, :], mask=km, other=0.0)
        s = tl.dot(qn, tl.trans(k))
        vis = kvld[None, :] & (kt[None, :] <= tok[:, None])
        p, alpha, m_i, l_i = _softmax_step(s, vis, m_i, l_i)
        v = tl.load(v_ptr + krow[:, None] * D + d[None, :], mask=km, other=0.0)
        acc = tl.dot(p.to(v_ptr.dtype.element_ty), v, acc * alpha[:, None])
        scale_rot = scale_rot * alpha
    if not HOIST_Q and not DECODED:
        acc = _add_unrotated(acc, accs, scale_rot, rot_ptr, D, DG, DP)
    inv = tl.where(l_i > 0, 1.0 / l_i, 0.0)
    out = acc * inv[:, None]
    tl.store(out_ptr + qrow[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
