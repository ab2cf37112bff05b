"""Triton bodies of the small codec ops: rotate / unrotate, the QJL sketch, MSE dequantize and
key scores.  None is on a decode hot path (attention and the cache write have fused kernels), so
they favour fp32 accuracy: every dot is tf32x3 (three tf32 MMAs, ~fp32 rounding).

Row tiles of RB rows; the D x D matrix is consumed in column blocks of JB so that D = 256 fits.
"""
from __future__ import annotations

import triton
import triton.language as tl

from tq_ops.triton.unpack import lookup, slow_code, slow_sign

ROWS = 16      # RB
COLS = 64      # JB
NUM_WARPS = 4


@triton.jit(do_not_specialize=['rows'])
def rotate_kernel(x_ptr, rot_ptr, out_ptr, rows, D: tl.constexpr, DP: tl.constexpr,
                  RB: tl.constexpr, JB: tl.constexpr, INVERSE: tl.constexpr):
    """out = x Pi^T (rotate) or x Pi (INVERSE), fp32; x (rows, D) any float dtype."""
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    rm = r < rows
    d = tl.arange(0, DP)
    x = tl.load(x_ptr + r.to(tl.int64)[:, None] * D + d[None, :],
                mask=rm[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
    j = tl.arange(0, JB)
    for j0 in tl.static_range(0, DP, JB):
        jj = j0 + j
        mk = (d < D)[:, None] & (jj < D)[None, :]
        if INVERSE:
            w = tl.load(rot_ptr + d[:, None] * D + jj[None, :], mask=mk, other=0.0)
        else:
            w = tl.load(rot_ptr + jj[None, :] * D + d[:, None], mask=mk, other=0.0)
        o = tl.dot(x, w, input_precision="tf32x3")
        tl.store(out_ptr + r.to(tl.int64)[:, None] * D + jj[None, :], o,
                 mask=rm[:, None] & (jj < D)[None, :])


@triton.jit(do_not_specialize=['rows'])
def qjl_sketch_kernel(r_ptr, proj_ptr, signs_ptr, gamma_ptr, rows, D: tl.constexpr,
                      DP: tl.constexpr, RB: tl.constexpr, JB: tl.constexpr):
    """signs (rows, D/8) uint8 of S' r (bit 1 = +1, i.e. >= 0), gamma (rows,) fp32 = ||r||."""
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    rm = r < rows
    d = tl.arange(0, DP)
    dm = d < D
    x = tl.load(r_ptr + r.to(tl.int64)[:, None] * D + d[None, :], mask=rm[:, None] & dm[None, :],
                other=0.0).to(tl.float32)
    tl.store(gamma_ptr + r, tl.sqrt(tl.sum(x * x, 1)), mask=rm)
    j = tl.arange(0, JB)
    k = tl.arange(0, JB // 8)
    for j0 in tl.static_range(0, DP, JB):
        jj = j0 + j
        # ST[i, j] = S'[j, i]
        st = tl.load(proj_ptr + jj[None, :] * D + d[:, None], mask=dm[:, None] & (jj < D)[None, :],
                     other=0.0)
        p = tl.dot(x, st, input_precision="tf32x3")
        b = tl.reshape((p >= 0).to(tl.int32), (RB, JB // 8, 8))
        byte = tl.sum(b << tl.arange(0, 8)[None, None, :], 2).to(tl.uint8)
        kk = j0 // 8 + k
        tl.store(signs_ptr + r.to(tl.int64)[:, None] * (D // 8) + kk[None, :], byte,
                 mask=rm[:, None] & (kk < D // 8)[None, :])


@triton.jit(do_not_specialize=['rows'])
def mse_dequantize_kernel(codes_ptr, norms_ptr, rot_ptr, c_ptr, out_ptr, rows,
                          D: tl.constexpr, DG: tl.constexpr, DP: tl.constexpr, RB: tl.constexpr,
                          JB: tl.constexpr, BITS: tl.constexpr):
    """out (rows, D) fp32 = n Pi^T c[code]: group q of the codes (coordinates 8m+q) meets rows
    8m+q of Pi, so out = n * sum_q c[code_q] Pi[8m+q, :]."""
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    rm = r < rows
    m = tl.arange(0, DG)
    j = tl.arange(0, JB)
    rowoff = r.to(tl.int64) * (D * BITS // 8)
    n = tl.load(norms_ptr + r, mask=rm, other=0.0).to(tl.float32)
    for j0 in tl.static_range(0, DP, JB):
        jj = j0 + j
        acc = tl.zeros([RB, JB], tl.float32)
        for q in tl.static_range(8):
            y = lookup(slow_code(codes_ptr, rowoff[:, None], m[None, :], q, D, BITS), c_ptr, BITS)
            y = tl.where((m < D // 8)[None, :], y, 0.0)
            w = tl.load(rot_ptr + (8 * m + q)[:, None] * D + jj[None, :],
                        mask=(m < D // 8)[:, None] & (jj < D)[None, :], other=0.0)
            acc = tl.dot(y, w, acc, input_precision="tf32x3")
        tl.store(out_ptr + r.to(tl.int64)[:, None] * D + jj[None, :], acc * n[:, None],
                 mask=rm[:, None] & (jj < D)[None, :])


@triton.jit(do_not_specialize=['tq', 'tk'])
def key_scores_kernel(qr_ptr, u_ptr, rec_ptr, c_ptr, out_ptr, tq, tk,
                      D: tl.constexpr, DG: tl.constexpr, TQB: tl.constexpr, TKB: tl.constexpr,
                      BITS: tl.constexpr, QJL: tl.constexpr, KEY_BYTES: tl.constexpr,
                      OFF_S: tl.constexpr, OFF_N: tl.constexpr, OFF_G: tl.constexpr):
    """out[b, i, k] = n_k (<q_rot_i, c[code_k]> + gamma_k <u_i, z_k>), fp32, for one (batch,
    query tile, key tile).  qr/u: (B*Tq, D) fp32 from decode.query_prep_kernel (u already holds
    sqrt(pi/2)/D); records (B, Tk, KEY_BYTES)."""
    b = tl.program_id(0)
    i = tl.program_id(1) * TQB + tl.arange(0, TQB)
    k = tl.program_id(2) * TKB + tl.arange(0, TKB)
    im = i < tq
    km = k < tk
    m = tl.arange(0, DG)
    qrow = (b * tq + i).to(tl.int64)
    krow = (b.to(tl.int64) * tk + k) * KEY_BYTES
    acc = tl.zeros([TQB, TKB], tl.float32)
    accz = tl.zeros([TQB, TKB], tl.float32)
    for q in tl.static_range(8):
        qm = im[:, None] & (8 * m + q < D)[None, :]
        qt = tl.load(qr_ptr + qrow[:, None] * D + 8 * m[None, :] + q, mask=qm, other=0.0)
        kv = lookup(slow_code(rec_ptr, krow[None, :], m[:, None], q, D, BITS), c_ptr, BITS)
        acc = tl.dot(qt, kv, acc, input_precision="tf32x3")
        if QJL:
            ut = tl.load(u_ptr + qrow[:, None] * D + 8 * m[None, :] + q, mask=qm, other=0.0)
            z = slow_sign(rec_ptr, krow[None, :] + OFF_S, m[:, None], q, D)
            accz = tl.dot(ut, z, accz, input_precision="tf32x3")
    kn = tl.load((rec_ptr + krow + OFF_N).to(tl.pointer_type(tl.float16)), mask=km,
                 other=0.0).to(tl.float32)
    if QJL:
        kg = tl.load((rec_ptr + krow + OFF_G).to(tl.pointer_type(tl.float16)), mask=km,
                     other=0.0).to(tl.float32)
        acc += accz * kg[None, :]
    out = acc * kn[None, :]
    tl.store(out_ptr + (b.to(tl.int64) * tq + i)[:, None] * tk + k[None, :], out,
             mask=im[:, None] & km[None, :])
