"""Paged decode attention over the packed cache: one query token per sequence.

Launches, all with grids that depend only on shapes (CUDA-graph safe):

1. `query_prep_kernel` (rows = B*Hq): q_rot = Pi q and u = S' q_rot in fp32 (tf32x3 dots), with the
   softmax scale * log2(e) folded in (and sqrt(pi/2)/D into u); for the bit-plane key decoders
   also their fp16 operands and per-query offsets (store_query_planes), once per query row.
2. `decode_split_kernel`, grid (B*Hkv, NUM_SPLITS + 1): program (b, h, s < NUM_SPLITS) walks
   its share of the compressed positions kv_start..kv_lens[b]-1 in tiles of BLOCK_N tokens.
   All G query heads of the KV head are the N side of the MMAs, so each cache byte is read
   once: codes are unpacked to fp16 in registers per coordinate group (tq_ops.triton.unpack),
   scores are sum_r dot(centroids_r, q_rot_r^T) + gamma * sum_r dot(signs_r, u_r^T) on tensor
   cores, and the values are accumulated in the rotated domain with dot(P^T, values_r).
   Nothing dequantized is written to memory.  Each writes a partial (max, sum, accumulator).
   Program (b, h, NUM_SPLITS) attends the exact raw-pool tokens instead (raw_partial, original
   domain), a short program that runs beside the splits.  On CUDA the decoders are inline asm
   with the built-in codebooks baked in; a program whose codebooks differ does nothing.
3. `decode_merge_kernel`, grid (B*Hq,), one program per query row: log-sum-exp merges the
   compressed partials of its KV head, un-rotates them once (Pi^T times a vector), adds the
   raw-pool partial and divides by the softmax sum.  With few splits (many sequences) a
   program takes 16 query rows instead and un-rotates them with one tensor-core product
   (merge_tile; paged_decode_attention.merge_tiles).  (The raw tokens were attended here until
   session 12; the merge's dependent chain was twice as long for it.)  Unless the caller
   declared the built-in codebooks, `decode_merge_fallback_kernel` takes its place on CUDA:
   the same merge after a codebook check, with the compressed tokens attended by decoders
   that read any codebook when the check fails.

NUM_SPLITS (a run-time argument) is a function of (batch, kv heads, block-table width, tile, SM
count) only: at most one whole wave of resident programs, in equal shares of tiles (num_splits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import triton
import triton.language as tl

from tq_ops.triton.unpack import (byte_tables, fast_sign, fast_values3_word_pair,
                                  group_centroids, key_plane, key_plane_gamma_sum,
                                  fold_group_dims, groups_folded, key_plane_folded,
                                  key_plane_offset, key_plane_scale, load_fast,
                                  load_group_words, sign_plane_folded,
                                  load_scalars, planes_apply, prefetch_l2, sign_plane,
                                  sign_plane_offset, sign_plane_scale, slow_sign, table_matches,
                                  tile_rows, tile_rows_paged, tuple_set, value_words)

LOG2E = 1.4426950408889634
NEG_BIG = tl.constexpr(-1.0e30)  # running-max start: finite, so a tile of masked tokens gives exp2(-inf) = 0
# fp32 values per query row in the prep launch's offsets buffer: off_s, off_z, the scale of the
# int8 key operands, one spare
QO = tl.constexpr(4)
# the int8 key operands' fixed-point range: an integer of magnitude at most INT8_KEY_RANGE is
# q_hi * 256 + q_lo with both parts in [-128, 127] (q_hi = (q + 128) >> 8)
INT8_KEY_RANGE = tl.constexpr(32639)


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int       # tokens per tile
    num_warps: int
    num_stages: int
    # split programs resident per SM at once: the register count of the fast split kernel sets
    # it (ptxas sizes it for an occupancy step: 168 registers, 12 one-warp programs, at
    # head_dims 128 and 64 with the caps below).  The split count fills whole waves of these:
    # a partial last wave left SMs idle (Nsight Compute, (8, 32k): 1.33 waves, 45% issue-slot
    # use).
    resident_programs_per_sm: int
    min_tokens_per_split: int
    max_splits: int
    # ptxas register cap per thread (Triton's maxnreg launch option); 0 = the compiler's choice.
    # Eager launches only (tq_ops.triton.launch.register_cap says why).
    max_registers: int = 0
    # bit-plane key decoders (tq_ops.triton.unpack) for 2-bit keys with a symmetric codebook;
    # False keeps the PRMT-table decoders (perf/tune_decode.py times both)
    key_planes: bool = True
    # 3-bit values decoded by the unary decoder over value_words (in the MMA operand layout,
    # two coordinate groups per call) when the table is baked; False keeps the decoder whose
    # fp16 result goes through shared memory (perf/tune_decode.py times both)
    value_words: bool = True
    # splits at least this many positions long, as long as that keeps at least `wave_fill` of
    # one wave's resident slots busy (num_splits says why)
    split_positions: int = 256
    wave_fill: float = 0.65
    # an L2 hint for the next page at the top of a tile (attend_pages says when and why)
    l2_prefetch: bool = True
    # with the bit-plane key decoders at head_dim 128: the 2-bit key planes as int8 MMA
    # operands against 16-bit fixed-point queries (attend_pages' INT8): one AND per 4 codes
    # and plane instead of a shift and an AND-OR per 2 (perf/NOTES.md, session 29)
    int8_keys: bool = False


# (arch, head_dim, key_bits) -> config.  Rows absent from the table use DEFAULT_DECODE.
# One warp per program: the value MMAs are (DG x GP) per coordinate group, too small to split
# over several warps without recomputing the decode in each; many 1-warp programs fill the SMs
# (perf/NOTES.md: 2 and 4 warps measured 1.3-2.7x slower).
DEFAULT_DECODE = DecodeConfig(block_n=64, num_warps=1, num_stages=2, resident_programs_per_sm=12,
                              min_tokens_per_split=64, max_splits=256)
# head_dims 128 and 64: bit-plane keys and value words, capped at 168 registers (12 resident;
# ptxas takes the kernel to 226-251 registers on its own).  Sessions 6 and 7 compared them with
# the table decoders through perf/tune_decode.py, whose launches took no register cap (session
# 6: these decoders uncapped; from session 7 on: the table decoders in their place), so those
# "within 1-2%" timings are not of this row (perf/NOTES.md, session 31).  The spread between
# runs (up to 15%) follows the SM clock, which falls at the power cap under sustained load.
# head_dim 64 kept the table decoders until session 31, when perf/scratch/ab_hd64.py timed
# both with the session-30 decoders (H200, page 64, 32/8 heads): 20-31% less time from
# (1, 32k) up ((8, 32k) 0.1837 -> 0.1263 ms), +0.3 us at (1, 4k); the 168 cap beat 144 with
# 14 resident (spills) at every shape.
DECODE_CONFIGS: dict[tuple[str, int, int], DecodeConfig] = {
    ("sm90", 128, 2): DecodeConfig(64, 1, 2, 12, 64, 256, max_registers=168, int8_keys=True),
    ("sm90", 64, 2): DecodeConfig(64, 1, 2, 12, 64, 256, max_registers=168),
}


def decode_config(arch: str, head_dim: int, key_bits: int) -> DecodeConfig:
    return DECODE_CONFIGS.get((arch, head_dim, key_bits), DEFAULT_DECODE)


def page_tile(block_size: int, cfg: DecodeConfig, head_dim: int) -> int:
    """Tokens per tile of the split kernel.  Pages smaller than cfg.block_n that divide it: a
    tile of several whole pages (attend_pages' MULTI_PAGE; offline sm_90 at page 16, 31.7
    instructions per token-head against 36.1 for 16-token tiles and 30.8 for 64-token tiles at
    page 64, perf/NOTES.md, session 20).  Otherwise the largest divisor of both the page and
    cfg.block_n (a tile inside one page), except 32 at head_dim 128, which becomes 16.
    There Triton routes the decoded operands of a 32-token tile through shared memory (offline
    sm_90 compile, perf/sass_report.py --block-size 32 --block-n 32: 391-519 shared stores per
    tile, 58-68 instructions per token-head for the seed format with any of its decoders and 53
    for k3v3, against 36.5 and 42 with 16-token tiles in the same 32-token page, 31 with
    64-token tiles); head_dims 64, 96 and 256 compile 32-token tiles well.  Offline counts
    only: not yet timed on a GPU."""
    if block_size < cfg.block_n and cfg.block_n % block_size == 0:
        return cfg.block_n
    tile = math.gcd(block_size, cfg.block_n)
    return 16 if tile == 32 and head_dim == 128 else tile


def num_splits(batch: int, num_kv_heads: int, max_positions: int, sms: int,
               cfg: DecodeConfig, waves: int = 1, tile: int | None = None) -> int:
    """Split count from shapes only (the block table's capacity, not the lengths).

    1. At most as many splits as fill `waves` whole waves of resident programs (a partial last
       wave left SMs idle), none shorter than min_tokens_per_split positions, at most
       max_splits.
    2. Within that, splits of at least cfg.split_positions positions, unless fewer splits
       would leave more than 1 - cfg.wave_fill of one wave's slots idle.
    3. The fewest splits that keep the longest program's tile count (`tile` tokens per tile,
       default cfg.block_n), so every split gets an equal share and none is empty.
    The op launches one wave.

    Why 2 and 3 (H200, session 14, op-level sweeps at page 64 in three interleaved rounds,
    perf/NOTES.md): a program's fixed cost (query operands, codebook check, partial store) is
    worth several tiles, and the merge's time grows with the partials per row (at batch 1:
    3.8 us for 64, 5.9 for 128, 9.2 for 198).  At
    (1, 32k) one wave is 198 splits of 166 positions (3 tiles, 27 splits empty): 0.0441 ms,
    against 0.0381 with 128 splits of 4 tiles (split kernel 28.3 -> 26.0 us, merge 9.2 -> 5.9
    us).  At (8, 4k), 24 splits (3 tiles, 2 empty) 0.0389 ms against 16 splits 0.0372.  But at
    (1, 4k), where every split of one tile still fills only a third of a wave, 64 splits
    (0.0197 ms) beat 16 (0.0253): there parallelism wins, hence the wave_fill exception.  At
    (1, 128k), (8, 32k), (32, 16k) and (64, 8k) the rule keeps one wave, whose counts timed best
    or within 1% among their neighbours.

    Two waves (perf/tune_splits.py explores them) timed 2-6% faster at (8, 32k), (32, 16k) and
    (64, 8k) in session 10's op-level sweeps, but inside vLLM 0.26 on an H200 (session 11, one
    sitting) a decode step took 9.764 ms with two waves and 9.681 with one.  The kernel
    profiles (two sittings that day) had the split kernel at 4.38 ms per step with two waves and
    4.39 with one, and the merge, reading 49 partials per row in two passes instead of 24 in
    one, at 310 us per step instead of 245.  The sweeps timed the op 10-14% slower than
    gpu_check's table at the same shapes, so they did not time it as vLLM runs it (perf/NOTES.md,
    session 11)."""
    rows = max(1, batch * num_kv_heads)
    slots = cfg.resident_programs_per_sm * sms
    cap = max(1, max_positions // cfg.min_tokens_per_split)
    most = max(1, min(max(1, waves * slots // rows), cap, cfg.max_splits))
    long_enough = -(-max_positions // cfg.split_positions)
    busy_enough = -(-int(cfg.wave_fill * slots) // rows)
    ns = min(most, max(long_enough, busy_enough))
    tiles = max(1, -(-max_positions // (tile or cfg.block_n)))
    per = -(-tiles // ns)
    return -(-tiles // per)


@triton.jit
def store_query_planes(qr, u, r, rmask, d, dmask, qp_ptr, qo_ptr, D: tl.constexpr,
                       QJL: tl.constexpr, KT0: tl.constexpr, KT1: tl.constexpr,
                       INT8: tl.constexpr = False, q8_ptr=None, G: tl.constexpr = 1,
                       GP: tl.constexpr = 1, KEY_PART: tl.constexpr = True,
                       SIGN_PART: tl.constexpr = True):
    """The split kernel's plane operands of (RB, DP) fp32 rows qr, u (tq_ops.triton.unpack,
    "bit planes"): qp (rows, 3, D) fp16 = q' of the high and low key plane and u' of the sign
    plane, coordinate d scaled by its group's (d % 8) constants; qo (rows, QO) fp32 = the
    offsets off_s, off_z (the a-part summed over the fp16-rounded operands, so it cancels
    exactly).  INT8: the key planes go to q8 instead (store_int8_key_operands; qp's first two
    planes are not written) and off_s is c3 sum q, the int8 planes having no a-part.
    KEY_PART / SIGN_PART: write the key-plane operands and off_s (from qr) / the sign plane's
    and off_z (from u); the prep's two programs per row write one each."""
    grp = d % 8
    # the sign plane's group (unpack.sign_plane_group): at folded widths the split kernel
    # decodes the signs of groups 4-7 at the positions of groups 0-3
    if groups_folded(D):
        grp_u = d % 4
    else:
        grp_u = grp
    s_hi = tl.zeros([d.shape[0]], tl.float32)
    s_lo = s_hi
    a_hi = s_hi
    a_lo = s_hi
    s_u = s_hi
    a_u = s_hi
    for g in tl.static_range(8):
        on = grp == g
        s_hi = tl.where(on, key_plane_scale(KT0, KT1, g, 1), s_hi)
        s_lo = tl.where(on, key_plane_scale(KT0, KT1, g, 0), s_lo)
        a_hi = tl.where(on, key_plane_offset(g, 1), a_hi)
        a_lo = tl.where(on, key_plane_offset(g, 0), a_lo)
        s_u = tl.where(grp_u == g, sign_plane_scale(g), s_u)
        a_u = tl.where(grp_u == g, sign_plane_offset(g), a_u)
    omask = rmask[:, None] & dmask[None, :]
    base = qp_ptr + r[:, None] * (3 * D) + d[None, :]
    if KEY_PART:
        if INT8:
            store_int8_key_operands(qr, r, rmask, q8_ptr, qo_ptr, D, G, GP, KT0, KT1)
            off_s = key_plane_gamma_sum(KT0, KT1) * tl.sum(qr, 1)
        else:
            hi = (qr * s_hi[None, :]).to(tl.float16)
            lo = (qr * s_lo[None, :]).to(tl.float16)
            tl.store(base, hi, mask=omask)
            tl.store(base + D, lo, mask=omask)
            off_s = (tl.sum(hi.to(tl.float32) * a_hi[None, :], 1)
                     + tl.sum(lo.to(tl.float32) * a_lo[None, :], 1)
                     + key_plane_gamma_sum(KT0, KT1) * tl.sum(qr, 1))
        tl.store(qo_ptr + QO * r, off_s, mask=rmask)
    if QJL and SIGN_PART:
        us = (u * s_u[None, :]).to(tl.float16)
        tl.store(base + 2 * D, us, mask=omask)
        off_z = tl.sum(us.to(tl.float32) * a_u[None, :], 1) + tl.sum(u, 1)
        tl.store(qo_ptr + QO * r + 1, off_z, mask=rmask)


@triton.jit
def store_int8_key_operands(qr, r, rmask, q8_ptr, qo_ptr, D: tl.constexpr, G: tl.constexpr,
                            GP: tl.constexpr, KT0: tl.constexpr, KT1: tl.constexpr):
    """The int8 key operands of (RB, D) fp32 rows qr (D == DP), for rows r of the query
    buffer (GQA group G, padded to GP).

    A symmetric 2-bit code is c = alpha s1 + beta s0 (s = 2 b - 1), so q . k_mse = sum_k
    (2 alpha q_k b1_k + 2 beta q_k b0_k) - c3 sum q.  The split kernel reads the code bytes as
    8 int8 planes (int8_key_plane: plane p keeps one bit per byte, worth v = 16, 32, 64 or
    -128); the coefficient of a bit is 2 gamma q_k / v.  Per row they are 16-bit fixed-point
    numbers of one scale (the largest coefficient over INT8_KEY_RANGE), rounded to nearest and
    split into a high and a low int8 part (q_hi * 256 + q_lo), so the kernel's two int8 MMAs
    rebuild each product to within half a step times v (test_kernels_interpret's prep-int8
    bound).  The bound is absolute, 2^-16 of the row's largest coefficient, where the fp16
    planes' rounding is relative (2^-11 of each coefficient); the bits kept at 4-7
    (int8_key_plane) hold the coefficients of one coordinate within a factor of ~4.3 of each
    other at the seed codebook (v from 16 to 128, alpha / beta ~ 1.86).  With parts of at most
    128 and 8 planes of D/4 = 32 bytes, 256 * acc_hi + acc_lo stays below 2^31.

    Stored as q8 (rows / G, [high parts of planes 0..7, low parts of planes 0..7], D/4, GP)
    int8: the G rows of a KV head side by side, the MMA's N contiguous, so the split kernel
    reads each (D/4, GP) operand with ldmatrix (N-strided, Triton moved them into place with
    lane shuffles every tile); columns G..GP-1 are not written (the kernel masks them).  The
    scale goes to qo[QO * row + 2]."""
    # coordinate k is field c = k % 4 of code byte j = k // 4: its low bit sits in plane
    # (4 if c < 2 else 0) + 2 (c % 2) (int8_key_plane), its high bit in the next plane
    tl.static_assert(qr.shape[1] == D, "int8 key operands need rows of exactly D coordinates")
    k = tl.arange(0, D)
    c = k % 4
    plane = tl.where(c < 2, 4, 0) + 2 * (c % 2)
    two_beta: tl.constexpr = int8_key_weight(KT0, KT1, 0)
    two_alpha: tl.constexpr = int8_key_weight(KT0, KT1, 1)
    coef_lo = qr * tl.where(c % 2 == 0, two_beta / 16, two_beta / 64)[None, :]
    coef_hi = qr * tl.where(c % 2 == 0, two_alpha / 32, -two_alpha / 128)[None, :]
    amax = tl.maximum(tl.max(tl.abs(coef_lo), 1), tl.max(tl.abs(coef_hi), 1))
    delta = tl.where(amax > 0, amax / INT8_KEY_RANGE, 1.0)
    dst = (q8_ptr + (r // G)[:, None] * (16 * (D // 4) * GP) + (r % G)[:, None]
           + (plane * (D // 4) + k // 4)[None, :] * GP)
    for bit in tl.static_range(2):
        coef = coef_hi if bit else coef_lo
        qf = tl.floor(coef / delta[:, None] + 0.5).to(tl.int32)
        q_hi = (qf + 128) >> 8
        q_lo = qf - q_hi * 256
        at = dst + bit * ((D // 4) * GP)
        tl.store(at, q_hi.to(tl.int8), mask=rmask[:, None])
        tl.store(at + 8 * ((D // 4) * GP), q_lo.to(tl.int8), mask=rmask[:, None])
    tl.store(qo_ptr + QO * r + 2, delta, mask=rmask)


@triton.jit
def int8_key_plane(kb, P: tl.constexpr):
    """(N, D/4) uint8 2-bit-plane code bytes -> int8 operand of plane P: one bit of each byte
    left in place (planes 0-3: bits 4-7, planes 4-7: bits 0-3 moved up to 4-7), worth 16, 32,
    64 or -128; store_int8_key_operands divides that out of the query side.  Byte j holds
    coordinates 4 j .. 4 j + 3 (tq_ops.layout), so plane P weights coordinate 4 j + f with
    f = 2 + P // 2 (P < 4) or (P - 4) // 2, its low bit in even planes, its high bit in odd.
    The bits stay at 4-7 so that the coefficients of one row span a factor of 8 in v, not 128:
    they share one fixed-point scale."""
    if P < 4:
        x = kb & (16 << P)
    else:
        # the shift on whole 32-bit registers of 4 code bytes (an 8-bit shift per element
        # compiles to a byte extract, shift and repack each); the mask drops what crossed bytes
        x = tl.inline_asm_elementwise("shl.b32 $0, $1, 4;", "=r,r", [kb], dtype=tl.uint8,
                                      is_pure=True, pack=4) & (16 << (P - 4))
    return x.to(tl.int8, bitcast=True)


@triton.constexpr_function
def int8_key_weight(t0, t1, hi):
    """2 alpha (hi) or 2 beta of the symmetric 2-bit codebook in t0, t1 (as key_plane_scale):
    the weight of a code's high or low bit (c = alpha s1 + beta s0, s = 2 b - 1)."""
    from tq_ops.triton import unpack as U
    c2, c3 = U._f16_value(t1), U._f16_value(t1 >> 16)
    return c3 + c2 if hi else c3 - c2


@triton.jit
def load_int8_key_operands(q8_ptr, qo_ptr, bh, qrow, gmask, D: tl.constexpr):
    """store_int8_key_operands' operands of KV head row bh as (D/4, GP) int8 per plane (a
    tuple of the 8 high parts, one of the 8 low parts) and the (GP,) fp32 scales."""
    j = tl.arange(0, D // 4)
    GP: tl.constexpr = qrow.shape[0]
    src = q8_ptr + bh * (16 * (D // 4) * GP) + j[:, None] * GP + tl.arange(0, GP)[None, :]
    q_hi = ()
    q_lo = ()
    for p in tl.static_range(8):
        q_hi = q_hi + (tl.load(src + p * (D // 4 * GP), mask=gmask[None, :], other=0),)
        q_lo = q_lo + (tl.load(src + (8 + p) * (D // 4 * GP), mask=gmask[None, :], other=0),)
    delta = tl.load(qo_ptr + QO * qrow + 2, mask=gmask, other=0.0)
    return q_hi, q_lo, delta


@triton.jit
def _whole_matrix(ptr, d, dmask, D: tl.constexpr):
    """The (D, D) fp32 matrix at ptr, padded to (DP, DP) with zeros (d = arange(DP))."""
    return tl.load(ptr + d[:, None] * D + d[None, :], mask=dmask[:, None] & dmask[None, :],
                   other=0.0)


@triton.jit(do_not_specialize=['rows'])
def query_prep_kernel(q_ptr, rot_ptr, proj_ptr, qr_ptr, u_ptr, qp_ptr, qo_ptr, rows, q_scale,
                      u_scale, D: tl.constexpr, DP: tl.constexpr, RB: tl.constexpr,
                      JB: tl.constexpr, QJL: tl.constexpr, PLANES: tl.constexpr,
                      KT0: tl.constexpr, KT1: tl.constexpr, q8_ptr, INT8_KEYS: tl.constexpr,
                      G: tl.constexpr, GP: tl.constexpr):
    """qr = (q Pi^T) * q_scale and u = (qr S'^T) * u_scale, fp32, for RB rows of (rows, D);
    with PLANES also the split kernel's plane operands and offsets (store_query_planes), once
    per query row rather than in every split program.

    RB == 1 (small batches, DP <= JB): one program per row (with QJL and a grid of (rows, 2),
    two: the key operands from qr, the sign operands from u), the products as fp32
    multiply-and-sum on CUDA cores; more programs, each with a shorter dependent chain than
    the tf32x3 tensor-core products below (paged_decode_attention.PREP_ROWWISE_MAX_ROWS,
    prep_parts).

    A latency-bound launch (a few programs): for DP <= JB both matrices are loaded whole before
    the first store, since a load after a store (which may alias it) is not hoisted and each
    such load is a memory round trip on the critical path.  Wider heads go in JB-column blocks
    with qr read back between the two products."""
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    rmask = r < rows
    d = tl.arange(0, DP)
    j = tl.arange(0, JB)
    dmask = d < D
    if RB == 1 and DP <= JB:
        # one row: two fp32 matrix-vector products as multiply-and-sum on CUDA cores, the second
        # over the first's result in the layout the first leaves it in (no conversion).
        # With QJL and a grid of (rows, 2) (prep_parts): program 0 stores qr and the key
        # operands, program 1 computes qr too and stores u and the sign operands, so the row's
        # dependent chain is the longer of the two, not their sum (a latency-bound launch).
        # The grid, not a constexpr, picks it: the batch size moves a launch across the rule
        # from one serving step to the next, and a new variant would compile then
        row = tl.program_id(0)
        mask2 = dmask[:, None] & dmask[None, :]
        if QJL:
            two_parts = tl.num_programs(1) > 1
            do_keys = (tl.program_id(1) == 0) | (not two_parts)
            do_signs = (tl.program_id(1) == 1) | (not two_parts)
        else:
            do_keys = True
        # pi[j, i] = Pi[j, i]; st[j, i] = S'[i, j], both loaded before any store (a load after
        # a store is not hoisted above it); S' only where u is computed
        pi = _whole_matrix(rot_ptr, d, dmask, D)
        if QJL:
            st = tl.load(proj_ptr + d[None, :] * D + d[:, None], mask=mask2 & do_signs,
                         other=0.0)
        qv = tl.load(q_ptr + row * D + d, mask=dmask, other=0.0).to(tl.float32) * tl.cast(
            q_scale, tl.float32)
        qr1 = tl.sum(pi * qv[None, :], 1)                       # indexed by j (dim 0)
        q2 = tl.reshape(qr1, (1, DP))
        if QJL:
            # u before the key operands, so S' is dead while they are built (128 registers at
            # D = 128 offline sm_90, two 8-warp programs per SM; 152 the other way round)
            if do_signs:
                u1 = tl.sum(st * qr1[:, None], 0) * tl.cast(u_scale, tl.float32)  # by i (dim 1)
                tl.store(u_ptr + row * D + d, u1, mask=dmask)
                if PLANES:
                    store_query_planes(q2, tl.reshape(u1, (1, DP)), r, rmask, d, dmask, qp_ptr,
                                       qo_ptr, D, QJL, KT0, KT1, INT8_KEYS, q8_ptr, G, GP,
                                       KEY_PART=False, SIGN_PART=True)
        if do_keys:
            tl.store(qr_ptr + row * D + d, qr1, mask=dmask)
            if PLANES:
                store_query_planes(q2, q2, r, rmask, d, dmask, qp_ptr, qo_ptr, D, QJL, KT0, KT1,
                                   INT8_KEYS, q8_ptr, G, GP, KEY_PART=True, SIGN_PART=False)
    else:
        q = tl.load(q_ptr + r[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32) * tl.cast(q_scale, tl.float32)
        if DP <= JB:
            mask2 = dmask[:, None] & dmask[None, :]
            # PiT[i, j] = Pi[j, i], S'T[i, j] = S'[j, i]
            pit = tl.load(rot_ptr + d[None, :] * D + d[:, None], mask=mask2, other=0.0)
            if QJL:
                st = tl.load(proj_ptr + d[None, :] * D + d[:, None], mask=mask2, other=0.0)
            qr = tl.dot(q, pit, input_precision="tf32x3")
            omask = rmask[:, None] & dmask[None, :]
            tl.store(qr_ptr + r[:, None] * D + d[None, :], qr, mask=omask)
            if QJL:
                u = tl.dot(qr, st, input_precision="tf32x3") * tl.cast(u_scale, tl.float32)
                tl.store(u_ptr + r[:, None] * D + d[None, :], u, mask=omask)
            else:
                u = qr
            if PLANES:
                store_query_planes(qr, u, r, rmask, d, dmask, qp_ptr, qo_ptr, D, QJL, KT0, KT1,
                                   INT8_KEYS, q8_ptr, G, GP)
        else:
            for j0 in tl.static_range(0, DP, JB):
                jj = j0 + j
                pit = tl.load(rot_ptr + jj[None, :] * D + d[:, None],
                              mask=dmask[:, None] & (jj < D)[None, :], other=0.0)
                blk = tl.dot(q, pit, input_precision="tf32x3")
                tl.store(qr_ptr + r[:, None] * D + jj[None, :], blk,
                         mask=rmask[:, None] & (jj < D)[None, :])
            if QJL:
                tl.debug_barrier()  # the rows written above are read back whole by other threads
                qr = tl.load(qr_ptr + r[:, None] * D + d[None, :],
                             mask=rmask[:, None] & dmask[None, :], other=0.0)
                for j0 in tl.static_range(0, DP, JB):
                    jj = j0 + j
                    st = tl.load(proj_ptr + jj[None, :] * D + d[:, None],
                                 mask=dmask[:, None] & (jj < D)[None, :], other=0.0)
                    blk = tl.dot(qr, st, input_precision="tf32x3") * tl.cast(u_scale, tl.float32)
                    tl.store(u_ptr + r[:, None] * D + jj[None, :], blk,
                             mask=rmask[:, None] & (jj < D)[None, :])
            if PLANES:
                tl.debug_barrier()  # qr and u are read back whole by other threads
                qr = tl.load(qr_ptr + r[:, None] * D + d[None, :],
                             mask=rmask[:, None] & dmask[None, :], other=0.0)
                if QJL:
                    u = tl.load(u_ptr + r[:, None] * D + d[None, :],
                                mask=rmask[:, None] & dmask[None, :], other=0.0)
                else:
                    u = qr
                store_query_planes(qr, u, r, rmask, d, dmask, qp_ptr, qo_ptr, D, QJL, KT0, KT1,
                                   INT8_KEYS, q8_ptr, G, GP)


@triton.jit
def load_queries(ptr, qrow, gmask, D: tl.constexpr, DG: tl.constexpr):
    """The 8 coordinate groups of fp32 rows `qrow` of a (rows, D) buffer, as (DG, GP) fp16."""
    m = tl.arange(0, DG)
    out = ()
    for r in tl.static_range(8):
        t = tl.load(ptr + qrow[None, :] * D + 8 * m[:, None] + r,
                    mask=(8 * m + r < D)[:, None] & gmask[None, :], other=0.0)
        out = out + (t.to(tl.float16),)
    return out


@triton.jit
def load_query_planes(qp_ptr, qo_ptr, qrow, gmask, D: tl.constexpr, DG: tl.constexpr,
                      QJL: tl.constexpr, INT8: tl.constexpr = False,
                      FOLD: tl.constexpr = False):
    """The plane operands of store_query_planes in the 8 coordinate groups: per group r,
    (DG, GP) fp16 q'_r of the high and low key plane and u'_r of the sign plane, and the (GP,)
    fp32 offsets: q . k_mse = acc_s - off_s, u . signs = acc_z - off_z.  INT8: zeros in place of
    the key planes (load_int8_key_operands reads those).  FOLD (the folded key and sign planes
    at head_dim 64): operand r < 4 holds group r in rows 0-7 and group r + 4 in rows 8-15;
    entries 4-7 repeat those (unused)."""
    m = tl.arange(0, DG)
    qhi = ()
    qlo = ()
    us = ()
    for r in tl.static_range(8):
        if FOLD:
            coord = 8 * (m % (D // 8)) + r % 4 + 4 * (m >= D // 8).to(tl.int32)
        else:
            coord = 8 * m + r
        msk = (coord < D)[:, None] & gmask[None, :]
        at = qp_ptr + qrow[None, :] * (3 * D) + coord[:, None]
        if INT8:
            # the key operands are int8 (load_int8_key_operands)
            hi = tl.zeros([DG, qrow.shape[0]], tl.float16)
            lo = hi
        else:
            hi = tl.load(at, mask=msk, other=0.0)
            lo = tl.load(at + D, mask=msk, other=0.0)
        qhi = qhi + (hi,)
        qlo = qlo + (lo,)
        if QJL:
            us = us + (tl.load(at + 2 * D, mask=msk, other=0.0),)
        else:
            us = us + (hi,)
    off_s = tl.load(qo_ptr + QO * qrow, mask=gmask, other=0.0)
    if QJL:
        off_z = tl.load(qo_ptr + QO * qrow + 1, mask=gmask, other=0.0)
    else:
        off_z = off_s * 0.0
    return qhi, qlo, us, off_s, off_z


@triton.constexpr_function
def folded_keys(planes, int8, d):
    """The bit-plane key and sign decoders folded (key_plane_folded, sign_plane_folded): head
    widths whose 8 group indices fill exactly half of a 16-column MMA operand (head_dim 64)."""
    from tq_ops.triton import unpack as U
    return bool(planes) and not int8 and U.folded_width(d)


@triton.constexpr_function
def folded_values(words, d, dg):
    """The word-pair value decoder folded (fast_values3_word_pair FOLD): head widths whose 8
    group indices fill exactly half of the DG rows of an MMA operand (head_dim 64)."""
    return bool(words) and 2 * (d // 8) == dg


@triton.jit
def attend_pages(cache_ptr, bt_ptr, bt_row, lo, hi, kv_start, head_off, page_stride, kc_ptr, vc_ptr,
                 qts, qlos, uts, off_s, off_z, ktabs, vtabs, m_i, l_i, accs,
                 D: tl.constexpr, DG: tl.constexpr, GP: tl.constexpr, BS: tl.constexpr,
                 BLOCK_N: tl.constexpr, KB: tl.constexpr, QJL: tl.constexpr, VB: tl.constexpr,
                 OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KN: tl.constexpr,
                 OFF_KG: tl.constexpr, OFF_VC: tl.constexpr, OFF_VN: tl.constexpr,
                 AL_K: tl.constexpr, AL_S: tl.constexpr, AL_V: tl.constexpr, AL_N: tl.constexpr,
                 FAST: tl.constexpr, PLANES: tl.constexpr, WORDS: tl.constexpr,
                 KT0: tl.constexpr, KT1: tl.constexpr, VT0: tl.constexpr, VT1: tl.constexpr,
                 PREFETCH: tl.constexpr = 0, INT8: tl.constexpr = False, qdelta=None):
    """Online softmax over compressed positions max(lo, kv_start)..hi-1 of one sequence and KV
    head; lo is a multiple of BLOCK_N.

    PREFETCH (sm_90 and later, tiles inside one page; 0 = off): the bytes of one page's
    region of a KV head (BS * SLOT, a multiple of 16).  Each tile that precedes a new page
    first asks L2 for that page's region.  Triton 3.6 single-buffers this loop's async
    copies, so a tile's loads are issued after the previous tile's compute and waited for at
    the top of the next: without the hint every tile waits out a DRAM round trip (Nsight
    Compute, H200, (8, 32k), page 64: 12% of the warps' stall samples on that wait).
    Measured (perf/NOTES.md, session 25): 1.4-1.9% faster at page 64 from (8, 32k) up; with
    multi-page tiles (page 16) one hint per page cost more than it saved (1.5-2% slower), so
    those tiles take none.

    Scores are (BLOCK_N, GP) = sum_r dot(keys_r (BLOCK_N, DG), q_r (DG, GP)); the value
    accumulators are 8 (DG, GP) tiles, accs[r] += dot(values_r^T (DG, BLOCK_N), p (BLOCK_N, GP)),
    in the rotated domain.  FAST selects the inline-asm decoders (tq_ops.triton.unpack); PLANES
    (FAST, 2-bit keys, symmetric codebook) the bit-plane key decoders, with qts / qlos / uts
    the plane operands and off_s / off_z the offsets of load_query_planes; WORDS (FAST, 3-bit
    values, baked table) the value decoder over value_words, in the MMA operand layout, groups
    k and k + 4 from one selector word (fast_values3_word_pair); at head_dim 64 (8 group
    indices in a 16-row operand) folded: two calls over tiles holding each word twice, the
    accumulators 0..3 in fold_group_dims' order.
    INT8 (PLANES at head_dim 128): the two key planes are int8 MMAs instead, over the code bytes
    as loaded (int8_key_plane: one AND per 4 codes and plane, a shift per 4 codes for half of
    them) against qts / qlos = the high and low int8 parts of store_int8_key_operands, int32
    accumulators scaled by qdelta; the sign plane stays fp16.  Offline sm_90: 1864 instructions
    per 64-token tile against 1992, LOP3 390 against 523 (perf/sass_report.py --fp16-keys).
    """
    m = tl.arange(0, DG)
    FOLD: tl.constexpr = folded_values(WORDS, D, DG)
    FOLD_KEYS: tl.constexpr = folded_keys(PLANES, INT8, D)
    # a tile of several whole pages (page_tile)
    MULTI_PAGE: tl.constexpr = BS < BLOCK_N
    if MULTI_PAGE:
        tl.static_assert(BLOCK_N % BS == 0, "a multi-page tile holds whole pages")
        tl.static_assert(PREFETCH == 0, "the L2 hint covers tiles inside one page")
    for start in tl.range(lo, hi, BLOCK_N):
        if PREFETCH > 0:
            # the next page's whole region, when the next tile opens it
            nxt = start + BLOCK_N
            ok = (nxt < hi) & (nxt % BS == 0)
            pn = tl.load(bt_ptr + bt_row + nxt // BS, mask=ok, other=0)
            prefetch_l2(cache_ptr + pn.to(tl.int64) * page_stride + head_off, ok, PREFETCH)
        pos = start + tl.arange(0, BLOCK_N)
        valid = (pos < hi) & (pos >= kv_start)
        if MULTI_PAGE:
            base, tin = tile_rows_paged(bt_ptr, bt_row, start, hi, page_stride, head_off, BS,
                                        BLOCK_N)
        else:
            base, tin = tile_rows(bt_ptr, bt_row, start, page_stride, head_off, BS, BLOCK_N)
        krow = tl.multiple_of(base + BS * OFF_KC + tin * (D * KB // 8), AL_K)
        srow = tl.multiple_of(base + BS * OFF_KS + tin * (D // 8), AL_S)
        vrow = tl.multiple_of(base + BS * OFF_VC + tin * (D * VB // 8), AL_V)
        if INT8:
            kb8 = tl.load(cache_ptr + krow[:, None] + tl.arange(0, D // 4)[None, :])
        elif FAST:
            kw, kx = load_fast(cache_ptr, krow[:, None], m[None, :], D, DG, KB, FOLD_KEYS)
        else:
            kw, kx = None, None  # the portable decoders read the codes themselves
        if FAST:
            if QJL:
                sx = load_group_words(cache_ptr + srow[:, None], m[None, :], D, DG, FOLD_KEYS)
        # the plane offsets (zero otherwise) start the accumulators: no subtraction per tile
        acc_s = tl.zeros([BLOCK_N, GP], tl.float32) - off_s[None, :]
        acc_z = tl.zeros([BLOCK_N, GP], tl.float32) - off_z[None, :]
        if INT8:
            # qts / qlos: the high and low int8 parts of the query operands
            a_hi = tl.zeros([BLOCK_N, GP], tl.int32)
            a_lo = tl.zeros([BLOCK_N, GP], tl.int32)
            for p in tl.static_range(8):
                x8 = int8_key_plane(kb8, p)
                a_hi = tl.dot(x8, qts[p], a_hi, out_dtype=tl.int32)
                a_lo = tl.dot(x8, qlos[p], a_lo, out_dtype=tl.int32)
            acc_s = acc_s + (a_hi * 256 + a_lo).to(tl.float32) * qdelta[None, :]
        if FOLD_KEYS:
            # groups r and r + 4 side by side in one 16-column operand (key_plane_folded)
            for r in tl.static_range(4):
                acc_s = tl.dot(key_plane_folded(kw, r, 1), qts[r], acc_s)
                acc_s = tl.dot(key_plane_folded(kw, r, 0), qlos[r], acc_s)
                if QJL:
                    acc_z = tl.dot(sign_plane_folded(sx, r), uts[r], acc_z)
        else:
            for r in tl.static_range(8):
                if PLANES:
                    if not INT8:
                        acc_s = tl.dot(key_plane(kw, r, 1), qts[r], acc_s)
                        acc_s = tl.dot(key_plane(kw, r, 0), qlos[r], acc_s)
                    if QJL:
                        acc_z = tl.dot(sign_plane(sx, r), uts[r], acc_z)
                else:
                    kv = group_centroids(kw, kx, cache_ptr, krow[:, None], m[None, :], r, D,
                                         KB, FAST, ktabs, KT0, KT1, kc_ptr)
                    acc_s = tl.dot(kv, qts[r], acc_s)
                    if QJL:
                        if FAST:
                            z = fast_sign(sx, r)
                        else:
                            z = slow_sign(cache_ptr, srow[:, None], m[None, :], r,
                                          D).to(tl.float16)
                        acc_z = tl.dot(z, uts[r], acc_z)
        kn = load_scalars(cache_ptr, base, tin, start, OFF_KN, BS, BLOCK_N, AL_N)
        if QJL:
            kg = load_scalars(cache_ptr, base, tin, start, OFF_KG, BS, BLOCK_N, AL_N).to(
                tl.float32)
            acc_s = acc_s + kg[:, None] * acc_z
        logits = tl.where(valid[:, None], acc_s * kn.to(tl.float32)[:, None], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(logits - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
        vn = load_scalars(cache_ptr, base, tin, start, OFF_VN, BS, BLOCK_N, AL_N)
        # page 0 backs the rows past `hi`: its norms may be anything, inf included
        vn = tl.where(valid, vn.to(tl.float32), 0.0)
        pw = (p * vn[:, None]).to(tl.float16)
        a = alpha[None, :]
        if FOLD:
            accs = (accs[0] * a, accs[1] * a, accs[2] * a, accs[3] * a, accs[4], accs[5],
                    accs[6], accs[7])
        else:
            accs = (accs[0] * a, accs[1] * a, accs[2] * a, accs[3] * a, accs[4] * a,
                    accs[5] * a, accs[6] * a, accs[7] * a)
        if FAST:
            vw, vx = load_fast(cache_ptr, vrow[None, :], m[:, None], D, DG, VB, FOLD)
            if WORDS:
                vwords = value_words(vw, vx)
        else:
            vw, vx = None, None
        if FOLD:
            for k in tl.static_range(2):
                va, vb = fast_values3_word_pair(vwords, k, VT0, VT1, True)
                accs = tuple_set(accs, k, tl.dot(va, pw, accs[k]))
                accs = tuple_set(accs, k + 2, tl.dot(vb, pw, accs[k + 2]))
        elif FAST and WORDS:
            # groups k and k + 4 share one selector word (fast_values3_word_pair)
            for k in tl.static_range(4):
                va, vb = fast_values3_word_pair(vwords, k, VT0, VT1)
                accs = tuple_set(accs, k, tl.dot(va, pw, accs[k]))
                accs = tuple_set(accs, k + 4, tl.dot(vb, pw, accs[k + 4]))
        else:
            for r in tl.static_range(8):
                vv = group_centroids(vw, vx, cache_ptr, vrow[None, :], m[:, None], r, D, VB,
                                     FAST, vtabs, VT0, VT1, vc_ptr)
                accs = tuple_set(accs, r, tl.dot(vv, pw, accs[r]))
    return m_i, l_i, accs


@triton.jit(do_not_specialize=['kv_start', 'num_splits'],
            do_not_specialize_on_alignment=['bt_ptr', 'kv_lens_ptr', 'raw_idx_ptr',
                                            'raw_lens_ptr'])
def decode_split_kernel(
        qr_ptr, u_ptr, qp_ptr, qo_ptr, cache_ptr, bt_ptr, kv_lens_ptr, kc_ptr, vc_ptr, o_ptr,
        m_ptr, l_ptr, kv_start, bt_stride, page_stride, num_splits,
        q_ptr, raw_k_ptr, raw_v_ptr, raw_idx_ptr, raw_lens_ptr, q_scale,
        rk_s0, rk_s1, rk_s2, rv_s0, rv_s1, rv_s2,
        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
        DP: tl.constexpr, DG: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
        KB: tl.constexpr, QJL: tl.constexpr, VB: tl.constexpr,
        OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KN: tl.constexpr, OFF_KG: tl.constexpr,
        OFF_VC: tl.constexpr, OFF_VN: tl.constexpr, SLOT: tl.constexpr,
        AL_K: tl.constexpr, AL_S: tl.constexpr, AL_V: tl.constexpr, AL_N: tl.constexpr,
        FAST: tl.constexpr, PAIRED: tl.constexpr, KT0: tl.constexpr, KT1: tl.constexpr,
        VT0: tl.constexpr, VT1: tl.constexpr, RAW_N: tl.constexpr, RAW_DC: tl.constexpr,
        KEY_PLANES: tl.constexpr, VALUE_WORDS: tl.constexpr,
        ALONE: tl.constexpr, PREFETCH: tl.constexpr, q8_ptr,
        INT8_KEYS: tl.constexpr):
    """One (sequence, KV head, split) partial of the compressed positions (module docstring),
    or, for split == num_splits (a program past the last split), the raw-pool partial of that
    (sequence, KV head) (raw_partial).

    FAST selects the decoders (tq_ops.triton.unpack).  With PAIRED (on CUDA, FAST) each program
    first checks that the codebooks equal its baked tables and does nothing otherwise: then
    decode_merge_fallback_kernel attends the compressed tokens with the decoders that read any
    codebook.  (Those decoders are a kernel of their own because a kernel holding both paths is
    sized for the heavier: its fast loop ran at 255 registers, 8 one-warp programs per SM; alone
    it needs 168.)  Without PAIRED, or with FAST off, the decoders that read any codebook run
    here (off CUDA; perf/sass_report.py --slow).  ALONE (with PAIRED): the caller declared the
    built-in codebooks and the plain merge follows, so a program that finds other codebooks
    writes a NaN partial rather than leave it unwritten.  The raw-pool programs need no
    codebook and run whatever the codebooks."""
    if tl.program_id(1) == num_splits:
        raw_partial(q_ptr, raw_k_ptr, raw_v_ptr, raw_idx_ptr, raw_lens_ptr, q_scale, rk_s0,
                    rk_s1, rk_s2, rv_s0, rv_s1, rv_s2, o_ptr, m_ptr, l_ptr, tl.program_id(0),
                    num_splits, HKV, G, GP, D, DP, RAW_N, RAW_DC)
    else:
        if PAIRED and FAST:
            run = table_matches(kc_ptr, KB, KT0, KT1) & table_matches(vc_ptr, VB, VT0, VT1)
        else:
            run = True
        if run:
            split_partial(qr_ptr, u_ptr, qp_ptr, qo_ptr, cache_ptr, bt_ptr, kv_lens_ptr,
                          kc_ptr, vc_ptr, o_ptr, m_ptr, l_ptr, kv_start, bt_stride,
                          page_stride, num_splits, tl.program_id(0), tl.program_id(1), HKV, G,
                          GP, D, DP, DG, BS, BLOCK_N, KB, QJL, VB, OFF_KC, OFF_KS, OFF_KN,
                          OFF_KG, OFF_VC, OFF_VN, SLOT, AL_K, AL_S, AL_V, AL_N, FAST,
                          KEY_PLANES, VALUE_WORDS, KT0, KT1, VT0, VT1, PREFETCH=PREFETCH,
                          q8_ptr=q8_ptr, INT8_KEYS=INT8_KEYS)
        else:
            if ALONE:
                nan_partial(o_ptr, m_ptr, l_ptr, tl.program_id(0), tl.program_id(1), num_splits,
                            GP, DP)


@triton.jit
def exact_dot(a, b, acc):
    """acc + a @ b on tensor cores to about fp32 accuracy.  Two 16-bit operands of one type go
    in as they are (their products are exact in fp32); an fp32 operand beside a 16-bit one is
    split into hi + lo parts of that type (two MMAs: ~2^-17 relative for bf16, 2^-22 for fp16);
    anything else (fp32 pools, mixed 16-bit types) is converted to fp32 and multiplied in
    tf32x3."""
    if a.dtype == b.dtype and a.dtype != tl.float32:
        out = tl.dot(a, b, acc)
    elif a.dtype == tl.float32 and (b.dtype == tl.float16 or b.dtype == tl.bfloat16):
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        out = tl.dot(lo, b, tl.dot(hi, b, acc))
    elif b.dtype == tl.float32 and (a.dtype == tl.float16 or a.dtype == tl.bfloat16):
        hi = b.to(a.dtype)
        lo = (b - hi.to(tl.float32)).to(a.dtype)
        out = tl.dot(a, lo, tl.dot(a, hi, acc))
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    return out


@triton.jit
def raw_partial(q_ptr, raw_k_ptr, raw_v_ptr, raw_idx_ptr, raw_lens_ptr, q_scale,
                rk_s0, rk_s1, rk_s2, rv_s0, rv_s1, rv_s2, o_ptr, m_ptr, l_ptr, bh, num_splits,
                HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                DP: tl.constexpr, RAW_N: tl.constexpr, DC: tl.constexpr):
    """Partial slot num_splits of row bh = b * HKV + h: the G query rows of KV head h against
    the raw_lens[b] exact tokens of raw-pool row raw_idx[b], in the original domain (max, sum,
    unnormalised accumulator in coordinate order); the merge adds it after un-rotating the
    compressed partials.

    Here rather than in the merge, where the raw tokens made the merge's dependent chain about
    twice as long at (8, 32k) with 64 of them per sequence: the split launch runs these
    B * HKV short programs beside the splits.  Scores are (RAW_N, GP) = sum over DC-column
    chunks of K (RAW_N, DC) @ q^T (DC, GP), with the model's query as it comes (scaled
    afterwards); the accumulator is ceil(D / DC) chunks (DC, GP) += V^T (DC, RAW_N) @ p
    (RAW_N, GP).
    exact_dot keeps both at about fp32 accuracy."""
    b = bh // HKV
    h = bh % HKV
    g = tl.arange(0, GP)
    gmask = g < G
    qrow = b * (HKV * G) + h * G + g
    orow = (bh * (num_splits + 1) + num_splits) * GP + g
    rl = tl.load(raw_lens_ptr + b)
    row = tl.load(raw_idx_ptr + b).to(tl.int64)
    dc = tl.arange(0, DC)
    t = tl.arange(0, RAW_N)
    qts = ()
    accs = ()
    for c in tl.static_range((D + DC - 1) // DC):
        d = c * DC + dc
        qts = qts + (tl.load(q_ptr + qrow[None, :] * D + d[:, None],
                             mask=(d < D)[:, None] & gmask[None, :], other=0.0),)
        accs = accs + (tl.zeros([DC, GP], tl.float32),)
    m_i = tl.full([GP], NEG_BIG, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    # not software-pipelined: its stage buffers would count in the whole kernel's shared memory
    # (34 KB against 10 KB at head_dim 128) and cut the split programs resident per SM
    for r0 in tl.range(0, rl, RAW_N, num_stages=1):
        tv = r0 + t < rl
        s = tl.zeros([RAW_N, GP], tl.float32)
        for c in tl.static_range((D + DC - 1) // DC):
            d = c * DC + dc
            k = tl.load(raw_k_ptr + row * rk_s0 + (r0 + t)[:, None] * rk_s1 + h * rk_s2
                        + d[None, :], mask=tv[:, None] & (d < D)[None, :], other=0.0)
            s = exact_dot(k, qts[c], s)
        s = tl.where(tv[:, None], s * tl.cast(q_scale, tl.float32), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
        new = ()
        for c in tl.static_range((D + DC - 1) // DC):
            d = c * DC + dc
            vt = tl.load(raw_v_ptr + row * rv_s0 + (r0 + t)[None, :] * rv_s1 + h * rv_s2
                         + d[:, None], mask=(d < D)[:, None] & tv[None, :], other=0.0)
            new = new + (exact_dot(vt, p, accs[c] * alpha[None, :]),)
        accs = new
    for c in tl.static_range((D + DC - 1) // DC):
        d = c * DC + dc
        tl.store(o_ptr + orow[None, :] * DP + d[:, None], accs[c],
                 mask=(d < D)[:, None] & gmask[None, :])
    tl.store(m_ptr + orow, m_i, mask=gmask)
    tl.store(l_ptr + orow, l_i, mask=gmask)


@triton.jit
def nan_partial(o_ptr, m_ptr, l_ptr, bh, split, num_splits, GP: tl.constexpr, DP: tl.constexpr):
    """Partial `split` of row bh as (max 0, sum NaN, accumulator NaN): the merge makes every
    output of the row NaN."""
    orow = (bh * (num_splits + 1) + split) * GP + tl.arange(0, GP)
    d = tl.arange(0, DP)
    tl.store(o_ptr + orow[:, None] * DP + d[None, :], tl.full([GP, DP], float("nan"), tl.float32))
    tl.store(m_ptr + orow, tl.zeros([GP], tl.float32))
    tl.store(l_ptr + orow, tl.full([GP], float("nan"), tl.float32))


@triton.jit
def split_partial(
        qr_ptr, u_ptr, qp_ptr, qo_ptr, cache_ptr, bt_ptr, kv_lens_ptr, kc_ptr, vc_ptr, o_ptr,
        m_ptr, l_ptr, kv_start, bt_stride, page_stride, num_splits, bh, split,
        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
        DP: tl.constexpr, DG: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
        KB: tl.constexpr, QJL: tl.constexpr, VB: tl.constexpr,
        OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KN: tl.constexpr, OFF_KG: tl.constexpr,
        OFF_VC: tl.constexpr, OFF_VN: tl.constexpr, SLOT: tl.constexpr,
        AL_K: tl.constexpr, AL_S: tl.constexpr, AL_V: tl.constexpr, AL_N: tl.constexpr,
        FAST: tl.constexpr, KEY_PLANES: tl.constexpr, VALUE_WORDS: tl.constexpr,
        KT0: tl.constexpr, KT1: tl.constexpr, VT0: tl.constexpr, VT1: tl.constexpr,
        WHOLE: tl.constexpr = False, col=0, PREFETCH: tl.constexpr = 0, q8_ptr=None,
        INT8_KEYS: tl.constexpr = False):
    """The partial (max, sum, rotated accumulators) of split `split` of row bh = b * HKV + h.
    WHOLE (the merge's fallback): the one range 0..kv_len-1 into slot `split`, only query
    column `col` stored (the G programs of the KV head each store their own), or every column
    for col < 0."""
    b = bh // HKV
    h = bh % HKV
    g = tl.arange(0, GP)
    gmask = g < G
    if WHOLE:
        # col < 0: all G columns (the fallback merge's tiles)
        smask = (g == col) | ((col < 0) & gmask)
    else:
        smask = gmask
    qrow = b * (HKV * G) + h * G + g
    part = bh * (num_splits + 1) + split
    orow = part * GP + g
    kv_len = tl.load(kv_lens_ptr + b)
    # splits cover positions 0..kv_len-1 in whole tiles (a tile is inside one page or holds
    # whole pages); positions below kv_start are masked
    if WHOLE:
        lo = kv_len * 0
        hi = kv_len
    else:
        per = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
        lo = split * per
        hi = tl.minimum(lo + per, kv_len)
    PLANES: tl.constexpr = FAST and KEY_PLANES and KB == 2 and planes_apply(KT0, KT1)
    WORDS: tl.constexpr = FAST and VALUE_WORDS and VB == 3 and (VT0 != 0 or VT1 != 0)
    INT8: tl.constexpr = PLANES and INT8_KEYS
    qdelta = None
    if PLANES:
        qts, qlos, uts, off_s, off_z = load_query_planes(qp_ptr, qo_ptr, qrow, gmask, D, DG,
                                                         QJL, INT8, folded_keys(PLANES, INT8, D))
        if INT8:
            qts, qlos, qdelta = load_int8_key_operands(q8_ptr, qo_ptr, bh, qrow, gmask, D)
    else:
        qts = load_queries(qr_ptr, qrow, gmask, D, DG)
        if QJL:
            uts = load_queries(u_ptr, qrow, gmask, D, DG)
        else:
            uts = qts
        qlos = qts
        off_s = tl.zeros([GP], tl.float32)
        off_z = off_s
    m_i = tl.full([GP], NEG_BIG, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    z = tl.zeros([DG, GP], tl.float32)
    accs = (z, z, z, z, z, z, z, z)
    ktabs = (0, 0, 0, 0)
    vtabs = (0, 0, 0, 0)
    if FAST:
        if KB == 3:
            ktabs = byte_tables(kc_ptr, KB)
        if VB == 3 and not WORDS:
            vtabs = byte_tables(vc_ptr, VB)
    m_i, l_i, accs = attend_pages(
        cache_ptr, bt_ptr, b.to(tl.int64) * bt_stride, lo, hi, kv_start, h * (BS * SLOT),
        page_stride, kc_ptr, vc_ptr, qts, qlos, uts, off_s, off_z, ktabs, vtabs, m_i, l_i, accs,
        D, DG, GP, BS, BLOCK_N, KB, QJL, VB, OFF_KC, OFF_KS, OFF_KN, OFF_KG, OFF_VC, OFF_VN,
        AL_K, AL_S, AL_V, AL_N, FAST, PLANES, WORDS, KT0, KT1, VT0, VT1, PREFETCH, INT8, qdelta)
    m = tl.arange(0, DG)
    if folded_values(WORDS, D, DG):
        for a in tl.static_range(4):
            tl.store(o_ptr + orow[None, :] * DP + fold_group_dims(m, a, D)[:, None], accs[a],
                     mask=smask[None, :])
    else:
        for r in tl.static_range(8):
            tl.store(o_ptr + orow[None, :] * DP + 8 * m[:, None] + r, accs[r],
                     mask=smask[None, :] & (8 * m + r < D)[:, None])
    tl.store(m_ptr + orow, m_i, mask=smask)
    tl.store(l_ptr + orow, l_i, mask=smask)


@triton.jit(do_not_specialize=['num_splits', 'rows'])
def decode_merge_kernel(o_ptr, m_ptr, l_ptr, rot_ptr, out_ptr, num_splits,
                        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                        DP: tl.constexpr, JB: tl.constexpr, SC: tl.constexpr,
                        PI_FIRST: tl.constexpr, rows, TILE: tl.constexpr):
    """One program per query row (sequence b, query head): merge the compressed partials of its
    KV head (slots 0 .. num_splits-1, rotated domain) and combine them with its raw-pool partial
    (slot num_splits, original domain, written by the split launch's raw_partial programs):
    out = (Pi^T sum_s w_s o_s + w_raw o_raw) / (sum_s w_s l_s + w_raw l_raw), w = exp2(m - max).

    A latency-bound launch, so the work of a (sequence, KV head) is spread over its G query
    rows: a program holding all G rows ran ~2100 dependent instructions per warp at ~22 cycles
    each (Nsight Compute, 15-22 us per launch), and R rows of a KV head per program (sharing
    Pi's loads) were slower at R = 2 and 4 (perf/NOTES.md, session 12).  The un-rotation is an
    fp32 matrix-vector product done as multiply-and-sum on CUDA cores (exact fp32).  Up to
    DP = JB, Pi is loaded whole at the start, before any dependent load; wider heads un-rotate
    in JB-column blocks at the end.  PI_FIRST=False loads it after the loop instead: with SC = 128
    partials per step, Pi (128 registers per thread at D = 128, 4 warps) held across the loop
    spilled (offline sm_90: 255 registers and 128 bytes of spills, against 168 and none).

    TILE > 0 (few splits, many rows: paged_decode_attention.merge_tiles): one program per TILE
    query rows of `rows` instead (merge_tile, SC splits per step, JB-column blocks of Pi)."""
    pid = tl.program_id(0)          # query row b * (HKV * G) + h * G + gi, or (TILE) rows' tile
    if TILE > 0:
        merge_tile(o_ptr, m_ptr, l_ptr, rot_ptr, out_ptr, num_splits, num_splits, pid, rows,
                   HKV, G, GP, D, DP, JB, TILE, SC)
    else:
        merge_row(o_ptr, m_ptr, l_ptr, rot_ptr, out_ptr, num_splits, num_splits, pid, HKV, G, GP,
                  D, DP, JB, SC, PI_FIRST)


@triton.jit(do_not_specialize=['kv_start', 'num_splits', 'rows'],
            do_not_specialize_on_alignment=['bt_ptr', 'kv_lens_ptr'])
def decode_merge_fallback_kernel(
        o_ptr, m_ptr, l_ptr, rot_ptr, out_ptr, num_splits,
        qr_ptr, u_ptr, cache_ptr, bt_ptr, kv_lens_ptr, kc_ptr, vc_ptr, kv_start, bt_stride,
        page_stride,
        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
        DP: tl.constexpr, JB: tl.constexpr, SC: tl.constexpr, PI_FIRST: tl.constexpr,
        DG: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
        KB: tl.constexpr, QJL: tl.constexpr, VB: tl.constexpr,
        OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KN: tl.constexpr, OFF_KG: tl.constexpr,
        OFF_VC: tl.constexpr, OFF_VN: tl.constexpr, SLOT: tl.constexpr,
        AL_K: tl.constexpr, AL_S: tl.constexpr, AL_V: tl.constexpr, AL_N: tl.constexpr,
        KT0: tl.constexpr, KT1: tl.constexpr, VT0: tl.constexpr, VT1: tl.constexpr,
        rows, TILE: tl.constexpr):
    """decode_merge_kernel for a caller that did not declare the built-in codebooks: the split
    launch then ran the fast decoders alone, whose programs do nothing when the codebooks are
    not the ones baked into them.  Each program checks the codebooks; on a mismatch it attends
    its KV head's whole compressed range with the decoders that read any codebook (every G
    program of the KV head computes the G columns and stores its own, in split slot 0) and
    merges that one partial with the raw-pool one.  TILE (decode_merge_kernel's): a program
    merges TILE rows; on a mismatch it attends each KV head its rows belong to in turn and
    stores all G columns (a KV head across two tiles is attended by both programs, which
    store the same bytes).

    The check used to be a second split instance (one program per (sequence, KV head) returning
    at once with the built-in codebooks), a launch of its own: ~1.2 us per call on an H200
    ((1, 4k): 0.0167 against 0.0155 ms declared, perf/NOTES.md, session 20).  Here it is a few
    loads beside the merge's own.  The fallback is slow (one program walks a whole sequence)
    but only other codebooks take it."""
    pid = tl.program_id(0)          # query row b * (HKV * G) + h * G + gi, or (TILE) rows' tile
    matches = table_matches(kc_ptr, KB, KT0, KT1) & table_matches(vc_ptr, VB, VT0, VT1)
    n_used = num_splits
    if matches == 0:
        if TILE > 0:
            # query row r belongs to KV head row r // G (rows are ordered b, h, gi)
            first = pid * TILE
            last = tl.minimum(first + TILE, rows) - 1
            for bh in range(first // G, last // G + 1):
                _whole_partial(qr_ptr, u_ptr, cache_ptr, bt_ptr, kv_lens_ptr, kc_ptr, vc_ptr,
                               o_ptr, m_ptr, l_ptr, kv_start, bt_stride, page_stride, num_splits,
                               bh, -1, HKV, G, GP, D, DP, DG, BS, BLOCK_N, KB, QJL, VB, OFF_KC,
                               OFF_KS, OFF_KN, OFF_KG, OFF_VC, OFF_VN, SLOT, AL_K, AL_S, AL_V,
                               AL_N, KT0, KT1, VT0, VT1)
        else:
            bh = (pid // (HKV * G)) * HKV + (pid % (HKV * G)) // G
            _whole_partial(qr_ptr, u_ptr, cache_ptr, bt_ptr, kv_lens_ptr, kc_ptr, vc_ptr, o_ptr,
                           m_ptr, l_ptr, kv_start, bt_stride, page_stride, num_splits, bh,
                           pid % G, HKV, G, GP, D, DP, DG, BS, BLOCK_N, KB, QJL, VB, OFF_KC,
                           OFF_KS, OFF_KN, OFF_KG, OFF_VC, OFF_VN, SLOT, AL_K, AL_S, AL_V, AL_N,
                           KT0, KT1, VT0, VT1)
        # the stores above are read back by other threads of this program
        tl.debug_barrier()
        n_used = num_splits * 0 + 1
    if TILE > 0:
        merge_tile(o_ptr, m_ptr, l_ptr, rot_ptr, out_ptr, num_splits, n_used, pid, rows, HKV, G,
                   GP, D, DP, JB, TILE, SC)
    else:
        merge_row(o_ptr, m_ptr, l_ptr, rot_ptr, out_ptr, num_splits, n_used, pid, HKV, G, GP, D,
                  DP, JB, SC, PI_FIRST)


@triton.jit(noinline=True)
def _whole_partial(qr_ptr, u_ptr, cache_ptr, bt_ptr, kv_lens_ptr, kc_ptr, vc_ptr, o_ptr, m_ptr,
                   l_ptr, kv_start, bt_stride, page_stride, num_splits, bh, col,
                   HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                   DP: tl.constexpr, DG: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                   KB: tl.constexpr, QJL: tl.constexpr, VB: tl.constexpr,
                   OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KN: tl.constexpr,
                   OFF_KG: tl.constexpr, OFF_VC: tl.constexpr, OFF_VN: tl.constexpr,
                   SLOT: tl.constexpr, AL_K: tl.constexpr, AL_S: tl.constexpr,
                   AL_V: tl.constexpr, AL_N: tl.constexpr, KT0: tl.constexpr, KT1: tl.constexpr,
                   VT0: tl.constexpr, VT1: tl.constexpr):
    """The fallback merge's partial (split_partial with WHOLE, the portable decoders), as a
    call of its own: inlined, its code (the multi-page tiles at small pages) shaped the merge's
    registers, and the fallback merge ran 0.6 us slower than the plain one at page 16 with the
    built-in codebooks (H200, 3.82 against 3.24 us); as a call, within 0.1 us at pages 16
    and 64 (perf/NOTES.md, session 21)."""
    split_partial(qr_ptr, u_ptr, qr_ptr, qr_ptr, cache_ptr, bt_ptr, kv_lens_ptr, kc_ptr, vc_ptr,
                  o_ptr, m_ptr, l_ptr, kv_start, bt_stride, page_stride, num_splits, bh, 0, HKV,
                  G, GP, D, DP, DG, BS, BLOCK_N, KB, QJL, VB, OFF_KC, OFF_KS, OFF_KN, OFF_KG,
                  OFF_VC, OFF_VN, SLOT, AL_K, AL_S, AL_V, AL_N, False, False, False, KT0, KT1,
                  VT0, VT1, True, col)


@triton.jit
def combine_weights(m_c, l_c, m_r, l_r):
    """The factors of the compressed sum (max m_c, sum l_c) and the raw-pool one (m_r, l_r) in
    the merged output: w / (w_c l_c + w_r l_r) each, w = exp2(m - max).  Both maxima are
    finite (NEG_BIG for an empty side, whose zero sums give it weight 0)."""
    big = tl.maximum(m_c, m_r)
    w_c = tl.exp2(m_c - big)
    w_r = tl.exp2(m_r - big)
    tot = w_c * l_c + w_r * l_r
    inv = tl.where(tot > 0, 1.0 / tot, 0.0)
    return w_c * inv, w_r * inv


@triton.jit
def merge_row(o_ptr, m_ptr, l_ptr, rot_ptr, out_ptr, num_splits, n_used, pid,
              HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
              DP: tl.constexpr, JB: tl.constexpr, SC: tl.constexpr, PI_FIRST: tl.constexpr):
    """decode_merge_kernel's body for query row pid, over compressed partial slots
    0 .. n_used-1 of a layout of num_splits + 1 slots per (sequence, KV head)."""
    b = pid // (HKV * G)
    h = (pid % (HKV * G)) // G
    gi = pid % G
    bh = b * HKV + h
    d = tl.arange(0, DP)
    dmask = d < D
    base = bh * (num_splits + 1)
    if DP <= JB and PI_FIRST:
        pi_all = _whole_matrix(rot_ptr, d, dmask, D)
    # the raw-pool partial: independent of the loop below, so its loads go first
    raw = (base + num_splits) * GP + gi + tl.zeros([1], tl.int32)
    m_r = tl.load(m_ptr + raw)
    l_r = tl.load(l_ptr + raw)
    acc_raw = tl.load(o_ptr + ((base + num_splits) * GP + gi) * DP + d, mask=dmask, other=0.0)
    # -- compressed partials: one pass, online max
    sc = tl.arange(0, SC)
    m_c = tl.full([1], NEG_BIG, tl.float32)
    l_c = tl.zeros([1], tl.float32)
    acc = tl.zeros([DP], tl.float32)
    for s0 in tl.range(0, n_used, SC):
        sm = (s0 + sc) < n_used
        part = (base + s0 + sc) * GP + gi
        mv = tl.load(m_ptr + part, mask=sm, other=NEG_BIG)
        lv = tl.load(l_ptr + part, mask=sm, other=0.0)
        ov = tl.load(o_ptr + part[:, None] * DP + d[None, :], mask=sm[:, None] & dmask[None, :],
                     other=0.0)
        m_new = tl.maximum(m_c, tl.max(mv, 0))
        alpha = tl.exp2(m_c - m_new)
        w = tl.where(sm, tl.exp2(mv - m_new), 0.0)
        l_c = l_c * alpha + tl.sum(w * lv, 0)
        acc = acc * alpha + tl.sum(w[:, None] * ov, 0)
        m_c = m_new
    c_w, r_w = combine_weights(m_c, l_c, m_r, l_r)
    acc = acc * c_w
    acc_raw = acc_raw * r_w
    if DP <= JB:
        if not PI_FIRST:
            pi_all = _whole_matrix(rot_ptr, d, dmask, D)
        o = tl.sum(pi_all * acc[:, None], 0) + acc_raw
        tl.store(out_ptr + pid * D + d, o.to(out_ptr.dtype.element_ty), mask=dmask)
    else:
        j = tl.arange(0, JB)
        for j0 in tl.static_range(0, DP, JB):
            jj = j0 + j
            jm = jj < D
            pi = tl.load(rot_ptr + d[:, None] * D + jj[None, :],
                         mask=dmask[:, None] & jm[None, :], other=0.0)
            o = tl.sum(pi * acc[:, None], 0)
            # acc_raw's columns jj: a masked select-and-sum keeps it in registers
            o += tl.sum(tl.where(d[:, None] == jj[None, :], acc_raw[:, None], 0.0), 0)
            tl.store(out_ptr + pid * D + jj, o.to(out_ptr.dtype.element_ty), mask=jm)


@triton.jit
def merge_tile(o_ptr, m_ptr, l_ptr, rot_ptr, out_ptr, num_splits, n_used, tile, rows,
               HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
               DP: tl.constexpr, JC: tl.constexpr, RT: tl.constexpr, SS: tl.constexpr):
    """The merge (decode_merge_kernel's formula) of query rows tile * RT .. tile * RT + RT - 1
    (of `rows`; row r belongs to KV head row r // G), over compressed partial slots
    0 .. n_used-1 of a layout of num_splits + 1 slots per (sequence, KV head).

    The rows' partials are merged side by side, SS splits per step (their loads issued
    together, then (RT, DP) elementwise updates: each row's sums stay its own), and the
    un-rotation is one tensor-core product for the tile, acc (RT, DP) @ Pi at about fp32
    accuracy (tf32x3), in blocks of JC output columns (a whole Pi operand spilled, offline
    sm_90): Pi is read once per RT rows instead of once per row."""
    r = tile * RT + tl.arange(0, RT)
    rmask = r < rows
    bh = r // G
    g = r % G
    d = tl.arange(0, DP)
    dmask = d < D
    base = bh * (num_splits + 1)
    raw = (base + num_splits) * GP + g
    m_r = tl.load(m_ptr + raw, mask=rmask, other=NEG_BIG)
    l_r = tl.load(l_ptr + raw, mask=rmask, other=0.0)
    m_c = tl.full([RT], NEG_BIG, tl.float32)
    l_c = tl.zeros([RT], tl.float32)
    acc = tl.zeros([RT, DP], tl.float32)
    for s0 in tl.range(0, n_used, SS):
        # SS splits' loads first (one round trip per step), then their updates
        mvs = ()
        lvs = ()
        ovs = ()
        for k in tl.static_range(SS):
            ok = rmask & (s0 + k < n_used)
            part = (base + s0 + k) * GP + g
            mvs = mvs + (tl.load(m_ptr + part, mask=ok, other=NEG_BIG),)
            lvs = lvs + (tl.load(l_ptr + part, mask=ok, other=0.0),)
            ovs = ovs + (tl.load(o_ptr + part[:, None] * DP + d[None, :],
                                 mask=ok[:, None] & dmask[None, :], other=0.0),)
        m_new = m_c
        for k in tl.static_range(SS):
            m_new = tl.maximum(m_new, mvs[k])
        alpha = tl.exp2(m_c - m_new)
        l_c = l_c * alpha
        acc = acc * alpha[:, None]
        for k in tl.static_range(SS):
            w = tl.exp2(mvs[k] - m_new)
            l_c += w * lvs[k]
            acc += w[:, None] * ovs[k]
        m_c = m_new
    c_w, r_w = combine_weights(m_c, l_c, m_r, l_r)
    acc = acc * c_w[:, None]
    j = tl.arange(0, JC)
    for j0 in tl.static_range(0, DP, JC):
        jj = j0 + j
        jm = jj < D
        pi = tl.load(rot_ptr + d[:, None] * D + jj[None, :], mask=dmask[:, None] & jm[None, :],
                     other=0.0)
        o = tl.dot(acc, pi, input_precision="tf32x3")
        o += tl.load(o_ptr + raw[:, None] * DP + jj[None, :], mask=rmask[:, None] & jm[None, :],
                     other=0.0) * r_w[:, None]
        tl.store(out_ptr + r[:, None] * D + jj[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & jm[None, :])
