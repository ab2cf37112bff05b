"""Paged cache -> exact-dtype K/V in the original domain (turboquant::paged_dequantize).

One program = one tile of BN page positions (BN divides the block size, so a tile lies in one
page) of one request x one KV head.  The grid is (R, cdiv(max_blocks * block_size, BN), Hkv): it
depends on shapes only, and a tile with no position in kv_start .. lens[r]-1 returns at once.

Per tile, with c the centroids of the codes (BN, D), z the +-1 QJL signs, n the norms and g the
residual norms (gamma):

    key   = n * (c @ Pi + qjl_scale * g * (z @ (S' Pi)))      (tq_ops.reference.decode_keys)
    value = n * (c_v @ Pi)

The products run over the coordinates in chunks of DG (the MMAs' K side), into one (BN, DP)
fp32 accumulator, keys first and then values.  A chunk is GPC whole coordinate groups of
tq_ops.layout's packing (coordinates 8 m + R for one group R and all m < D / 8): the code words of
a tile's rows are loaded once (a 32-, 16- or 8-bit word per m holds every group's code of
coordinates 8 m .. 8 m + 7), and each chunk takes its codes with one shift and mask per element;
the matrices' rows are taken in the same order.  Centroids are gathered from the codebook (any
codebook and bit width).  Pi and S' Pi arrive as fp16 halves (the launcher splits them once per
call), the operands are split in the kernel, and the three products above 2^-22 relative keep
fp32 accuracy (z is exact in fp16, so g z splits as g does).

Until session 38 the kernel decoded the whole (BN, D) tile in fp32 first, byte by byte with a
select chain per coordinate (255 registers with spills, one 8-warp program per SM: 357 us for
16k positions x 8 KV heads at D = 128 on an H200, perf/NOTES.md, session 37).
"""
from __future__ import annotations

import triton
import triton.language as tl

from tq_ops.triton.unpack import tile_rows

BLOCK_N = 64   # positions per tile (the launcher takes gcd with the block size)


@triton.constexpr_function
def chunk_shape(d):
    """(MDP, GPC): coordinate indices m per group, padded to a power of two, and whole groups
    per chunk, so that a chunk of MDP * GPC coordinates fills an MMA's K side (16 at least)."""
    mdp = triton.next_power_of_2(d // 8)
    return mdp, max(1, 16 // mdp)


@triton.jit
def _split(x):
    """fp32 x as fp16 hi + lo (hi + lo carries ~22 bits of x's mantissa)."""
    hi = x.to(tl.float16)
    return hi, (x - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _tile_scalar(ptr, base, tin, OFF: tl.constexpr, BS: tl.constexpr):
    """(BN,) fp32 of the fp16 scalar component at slot offset OFF for in-page rows tin."""
    return tl.load((ptr + base + BS * OFF + tin * 2).to(tl.pointer_type(tl.float16))).to(
        tl.float32)


@triton.jit
def _code_words(ptr, row, mk, real, D: tl.constexpr, BITS: tl.constexpr):
    """Per row and coordinate index m ((BN, DG) int32, unsigned): the code word of tq_ops.layout's
    low plane (4-bit: 32 bits, 2- and 3-bit: the 2-bit plane's 16 bits, 1-bit: 8 bits) and, for
    3 bits, the 1-bit plane's byte (the word again otherwise)."""
    if BITS == 4:
        w = tl.load((ptr + row[:, None] + 4 * mk[None, :]).to(tl.pointer_type(tl.int32)),
                    mask=real[None, :], other=0)
    elif BITS >= 2:
        w = tl.load((ptr + row[:, None] + 2 * mk[None, :]).to(tl.pointer_type(tl.int16)),
                    mask=real[None, :], other=0).to(tl.int32) & 0xFFFF
    else:
        w = tl.load(ptr + row[:, None] + mk[None, :], mask=real[None, :], other=0).to(tl.int32)
    h = w
    if BITS == 3:
        h = tl.load(ptr + row[:, None] + D // 4 + mk[None, :], mask=real[None, :],
                    other=0).to(tl.int32)
    return w, h


@triton.jit
def _codes(w, h, grp, BITS: tl.constexpr):
    """Codes of group grp ((1, DG) int32) from _code_words w and, for 3 bits, the 1-bit plane's
    bytes h."""
    if BITS == 4:
        c = (w >> (4 * grp)) & 15
    elif BITS >= 2:
        c = (w >> (2 * grp)) & 3
        if BITS == 3:
            c = c | (((h >> grp) & 1) << 2)
    else:
        c = (w >> grp) & 1
    return c


@triton.jit
def _matrix_rows(hi_ptr, lo_ptr, rows, real, jj, D: tl.constexpr):
    """(DG, DP) fp16 halves of matrix rows `rows` (padded rows and columns zero)."""
    at = rows[:, None] * D + jj[None, :]
    msk = real[:, None] & (jj < D)[None, :]
    return (tl.load(hi_ptr + at, mask=msk, other=0.0), tl.load(lo_ptr + at, mask=msk, other=0.0))


@triton.jit
def _dot3(a_hi, a_lo, b_hi, b_lo, acc):
    """acc + a @ b in fp32 from fp16 halves: the three products above 2^-22 relative."""
    return tl.dot(a_lo, b_hi, tl.dot(a_hi, b_lo, tl.dot(a_hi, b_hi, acc)))


@triton.jit
def _centroid_product(c_ptr, w, h, grp, real, rows, pih_ptr, pil_ptr, jj, acc,
                      D: tl.constexpr, BITS: tl.constexpr):
    """acc + c @ Pi[rows] for one chunk: c (BN, DG) the centroids of group grp's codes in the
    words w / h (_code_words), padded columns zero."""
    cen = tl.load(c_ptr + _codes(w, h, grp, BITS))
    c_hi, c_lo = _split(tl.where(real[None, :], cen, 0.0))
    p_hi, p_lo = _matrix_rows(pih_ptr, pil_ptr, rows, real, jj, D)
    return _dot3(c_hi, c_lo, p_hi, p_lo, acc)


@triton.jit(do_not_specialize=['kv_start'],
            do_not_specialize_on_alignment=['bt_ptr', 'lens_ptr', 'offsets_ptr'])
def dequantize_pages_kernel(
        cache_ptr, bt_ptr, lens_ptr, offsets_ptr, pih_ptr, pil_ptr, sph_ptr, spl_ptr, kc_ptr,
        vc_ptr, kout_ptr, vout_ptr, kv_start, bt_stride, page_stride, qjl_scale,
        HKV: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr,
        BN: tl.constexpr, KB: tl.constexpr, QJL: tl.constexpr,
        VB: tl.constexpr, OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KN: tl.constexpr,
        OFF_KG: tl.constexpr, OFF_VC: tl.constexpr, OFF_VN: tl.constexpr, SLOT: tl.constexpr):
    """Positions kv_start .. lens[r]-1 of request r (block-table row r) to rows
    offsets[r] + position - kv_start of kout_ptr / vout_ptr, (rows, HKV, D) in their dtype.
    pih / pil and sph / spl: Pi and S' Pi, (D, D) fp16 halves (hi + lo = the fp32 matrix)."""
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
        MDP: tl.constexpr = chunk_shape(D)[0]
        GPC: tl.constexpr = chunk_shape(D)[1]
        DG: tl.constexpr = MDP * GPC
        k = tl.arange(0, DG)
        mk = k % MDP                 # coordinate index m of each chunk column
        sub = (k // MDP)[None, :]    # its group within the chunk
        real = mk < D // 8
        jj = tl.arange(0, DP)
        omask = valid[:, None] & (jj < D)[None, :]
        at = row[:, None] * (HKV * D) + h * D + jj[None, :]
        # -- keys
        krow = base + BS * OFF_KC + tin * (D * KB // 8)
        kw, kh = _code_words(cache_ptr, krow, mk, real, D, KB)
        if QJL:
            sw = tl.load(cache_ptr + (base + BS * OFF_KS + tin * (D // 8))[:, None]
                         + mk[None, :], mask=real[None, :], other=0).to(tl.int32)
            g_hi, g_lo = _split(_tile_scalar(cache_ptr, base, tin, OFF_KG, BS) * qjl_scale)
        acc = tl.zeros([BN, DP], tl.float32)
        for ch in tl.static_range(8 // GPC):
            grp = ch * GPC + sub
            rows = 8 * mk + ch * GPC + k // MDP
            acc = _centroid_product(kc_ptr, kw, kh, grp, real, rows, pih_ptr, pil_ptr, jj, acc,
                                    D, KB)
            if QJL:
                pos_sign = (((sw >> grp) & 1) != 0) & real[None, :]
                neg = tl.where(real[None, :], -1.0, 0.0).to(tl.float16)
                z_hi = tl.where(pos_sign, g_hi[:, None], neg * g_hi[:, None])
                z_lo = tl.where(pos_sign, g_lo[:, None], neg * g_lo[:, None])
                s_hi, s_lo = _matrix_rows(sph_ptr, spl_ptr, rows, real, jj, D)
                acc = _dot3(z_hi, z_lo, s_hi, s_lo, acc)
        kn = _tile_scalar(cache_ptr, base, tin, OFF_KN, BS)
        tl.store(kout_ptr + at, (acc * kn[:, None]).to(kout_ptr.dtype.element_ty), mask=omask)
        # -- values
        vrow = base + BS * OFF_VC + tin * (D * VB // 8)
        vw, vh = _code_words(cache_ptr, vrow, mk, real, D, VB)
        acc = tl.zeros([BN, DP], tl.float32)
        for ch in tl.static_range(8 // GPC):
            rows = 8 * mk + ch * GPC + k // MDP
            acc = _centroid_product(vc_ptr, vw, vh, ch * GPC + sub, real, rows, pih_ptr,
                                    pil_ptr, jj, acc, D, VB)
        vn = _tile_scalar(cache_ptr, base, tin, OFF_VN, BS)
        tl.store(vout_ptr + at, (acc * vn[:, None]).to(vout_ptr.dtype.element_ty), mask=omask)
