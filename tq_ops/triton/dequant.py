"""Paged cache -> exact-dtype K/V in the original domain (turboquant::paged_dequantize).

One program = one tile of BN page positions (BN divides the block size, so a tile lies in one
page) of one request x one KV head.  The grid is (R, cdiv(max_blocks * block_size, BN), Hkv): it
depends on shapes only, and a tile with no position in kv_start .. lens[r]-1 returns at once.

Per tile, with c the centroids of the codes (BN, D), z the +-1 QJL signs, n the norms and g the
residual norms (gamma):

    key   = n * (c @ Pi + qjl_scale * g * (z @ (S' Pi)))      (tq_ops.reference.decode_keys)
    value = n * (c_v @ Pi)

S' Pi is one (D, D) fp32 matrix prepared by the launcher, so the QJL term needs no rotated
intermediate.  The products run on fp16 tensor cores with fp32 operands split into fp16 halves
(three products, ~2^-22 relative; z is exact in fp16), in column blocks of JB.  tf32x3 products
of the fp32 tiles compiled to 32 registers and ~11 KB of local memory per thread (Triton 3.6,
sm_90): 13 ms for a 30k-token prefix on an H200.  The decoders read any codebook and bit width
(the cost is one pass over the pages; the reader of the result is what is repeated).
"""
from __future__ import annotations

import triton
import triton.language as tl

from tq_ops.triton.unpack import lookup, slow_code, slow_sign, tile_rows

BLOCK_N = 64   # positions per tile (the launcher takes gcd with the block size)
COLUMN_BLOCK = 64


@triton.jit
def _split(x):
    """fp32 x as fp16 hi + lo (hi + lo carries ~22 bits of x's mantissa)."""
    hi = x.to(tl.float16)
    return hi, (x - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _dot3(a_hi, a_lo, b_hi, b_lo):
    """a @ b in fp32 from fp16 halves: the three products above 2^-22 relative."""
    return tl.dot(a_lo, b_hi, tl.dot(a_hi, b_lo, tl.dot(a_hi, b_hi)))


@triton.jit
def _tile_scalar(ptr, base, tin, OFF: tl.constexpr, BS: tl.constexpr):
    """(BN,) fp32 of the fp16 scalar component at slot offset OFF for in-page rows tin."""
    return tl.load((ptr + base + BS * OFF + tin * 2).to(tl.pointer_type(tl.float16))).to(
        tl.float32)


@triton.jit(do_not_specialize=['kv_start'],
            do_not_specialize_on_alignment=['bt_ptr', 'lens_ptr', 'offsets_ptr'])
def dequantize_pages_kernel(
        cache_ptr, bt_ptr, lens_ptr, offsets_ptr, rot_ptr, sp_ptr, kc_ptr, vc_ptr, kout_ptr, vout_ptr,
        kv_start, bt_stride, page_stride, qjl_scale,
        HKV: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr,
        BN: tl.constexpr, JB: tl.constexpr, KB: tl.constexpr, QJL: tl.constexpr,
        VB: tl.constexpr, OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KN: tl.constexpr,
        OFF_KG: tl.constexpr, OFF_VC: tl.constexpr, OFF_VN: tl.constexpr, SLOT: tl.constexpr):
    """Positions kv_start .. lens[r]-1 of request r (block-table row r) to rows
    offsets[r] + position - kv_start of kout_ptr / vout_ptr, (rows, HKV, D) in their dtype."""
    r = tl.program_id(0)
    start = tl.program_id(1) * BN
    h = tl.program_id(2)
    n_pos = tl.load(lens_ptr + r)
    if (start < n_pos) & (start + BN > kv_start):
        base, tin = tile_rows(bt_ptr, r.to(tl.int64) * bt_stride, start, page_stride,
                              h * (BS * SLOT), BS, BN)
        pos = start + tl.arange(0, BN)
        valid = (pos >= kv_start) & (pos < n_pos)
        row = tl.load(offsets_ptr + r).to(tl.int64) + pos - kv_start
        d = tl.arange(0, DP)
        dmask = d < D
        # coordinate d is group d % 8, index d // 8 of tq_ops.layout's packing
        m2 = (d // 8)[None, :]
        r2 = (d % 8)[None, :]
        kc = lookup(slow_code(cache_ptr, (base + BS * OFF_KC + tin * (D * KB // 8))[:, None],
                              m2, r2, D, KB), kc_ptr, KB)
        kc = tl.where(dmask[None, :], kc, 0.0)
        kn = _tile_scalar(cache_ptr, base, tin, OFF_KN, BS)
        if QJL:
            z = tl.where(dmask[None, :], slow_sign(
                cache_ptr, (base + BS * OFF_KS + tin * (D // 8))[:, None], m2, r2, D), 0.0)
            kg = _tile_scalar(cache_ptr, base, tin, OFF_KG, BS) * qjl_scale
        vc = lookup(slow_code(cache_ptr, (base + BS * OFF_VC + tin * (D * VB // 8))[:, None],
                              m2, r2, D, VB), vc_ptr, VB)
        vc = tl.where(dmask[None, :], vc, 0.0)
        vn = _tile_scalar(cache_ptr, base, tin, OFF_VN, BS)
        kc_hi, kc_lo = _split(kc)
        vc_hi, vc_lo = _split(vc)
        if QJL:
            z16 = z.to(tl.float16)  # +-1 and 0: exact
        j = tl.arange(0, JB)
        for j0 in tl.static_range(0, DP, JB):
            jj = j0 + j
            mmask = dmask[:, None] & (jj < D)[None, :]
            pi_hi, pi_lo = _split(tl.load(rot_ptr + d[:, None] * D + jj[None, :], mask=mmask,
                                          other=0.0))
            kb = _dot3(kc_hi, kc_lo, pi_hi, pi_lo)
            if QJL:
                sp_hi, sp_lo = _split(tl.load(sp_ptr + d[:, None] * D + jj[None, :], mask=mmask,
                                              other=0.0))
                kb = kb + kg[:, None] * tl.dot(z16, sp_lo, tl.dot(z16, sp_hi))
            vb = _dot3(vc_hi, vc_lo, pi_hi, pi_lo)
            omask = valid[:, None] & (jj < D)[None, :]
            at = row[:, None] * (HKV * D) + h * D + jj[None, :]
            tl.store(kout_ptr + at, (kb * kn[:, None]).to(kout_ptr.dtype.element_ty), mask=omask)
            tl.store(vout_ptr + at, (vb * vn[:, None]).to(vout_ptr.dtype.element_ty), mask=omask)
