"""Copies of exact tokens into the raw pool (the sinks and flush buffer beside the paged cache).

One program per token moves its K and V rows (all KV heads) to their (row, slot) of the pool,
converting to the pool's dtype.  It replaces two index_put launches plus the index arithmetic
around them in every layer of a decode step: such a write is a few kilobytes, so launches, not
bytes, are its cost.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=['n_tokens'],
            do_not_specialize_on_alignment=['rows_ptr', 'slots_ptr', 'valid_ptr'])
def write_raw_kernel(k_ptr, v_ptr, k_st, k_sh, v_st, v_sh, rk_ptr, rv_ptr, rows_ptr, slots_ptr,
                     valid_ptr, n_tokens, row_stride, slot_stride,
                     H: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr):
    """Token t = program_id(0) < n_tokens with valid_ptr[t] >= 0 goes to
    rk/rv[rows_ptr[t] * row_stride + slots_ptr[t] * slot_stride + h * D + d] (a contiguous
    (N, R, H, D) pool: row_stride = R*H*D, slot_stride = H*D).  k/v element (t, h, d) is at
    t * st + h * sh + d."""
    t = tl.program_id(0)
    if tl.load(valid_ptr + t) >= 0:
        row = tl.load(rows_ptr + t).to(tl.int64)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        h = tl.arange(0, HP)
        d = tl.arange(0, DP)
        mask = (h < H)[:, None] & (d < D)[None, :]
        dst = row * row_stride + slot * slot_stride + h[:, None] * D + d[None, :]
        src = t.to(tl.int64) * k_st + h[:, None] * k_sh + d[None, :]
        k = tl.load(k_ptr + src, mask=mask)
        tl.store(rk_ptr + dst, k.to(rk_ptr.dtype.element_ty), mask=mask)
        src = t.to(tl.int64) * v_st + h[:, None] * v_sh + d[None, :]
        v = tl.load(v_ptr + src, mask=mask)
        tl.store(rv_ptr + dst, v.to(rv_ptr.dtype.element_ty), mask=mask)
