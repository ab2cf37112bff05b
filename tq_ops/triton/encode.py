"""Fused encode: norm, rotate, quantize, pack and the QJL residual sketch, into records or straight
into the paged cache by slot mapping.

Exactness.  Codes must match the fp32 reference apart from ties at cell boundaries, so the
rotation runs on tensor cores in split precision: the input row is scaled by a power of two so
that its largest entry lies in [2^14, 2^15) (exact for fp16 and bf16 inputs, which then convert to
fp16 exactly), and Pi^T is split into fp16 hi + lo parts; y = x (Pi_hi^T + Pi_lo^T) / (n s) with
fp32 accumulation is within ~2^-21 relative of the fp32 product.  The QJL projection S' r uses the
same split on both operands (r scaled by 2^8 first, so its low part stays normal); a sign can only
differ from the reference's where |S' r| is at that rounding level.  fp32 inputs are split into
hi + lo as well (one more MMA).

EXACT16 (declared by the caller: tq_ops.codec.exact16_matrices) skips both splits: D^1.5 Pi^T is
an integer matrix within 2048 and S' has fp16 entries, so one fp16 operand holds each exactly
and y = x (D^1.5 Pi^T) / (n s D^1.5) is as close to the fp32 product as the split one.  Two
fewer MMAs per key tile, and a 64-row key program's shared memory drops from 176 KB to 112 KB at
head_dim 128 (two programs per SM instead of one).

Quantizer.  Every built-in codebook is antisymmetric (c[2^B - 1 - k] == -c[k] in fp32); each
program checks the one it is given, and for such a codebook compares |y| with the 2^(B-1) - 1
positive midpoints and takes the sign of y as the top bit (_quantize_antisymmetric: the same
codes, up to ties, with half the thresholds); any other codebook counts all 2^B - 1 midpoints.

A persistent program prepares Pi^T and S'^T once, then encodes tiles of TB rows (row = token * H +
head).  MMA output columns come in grouped order (column q*DG + m is coordinate 8m + q, the groups
of tq_ops.triton.unpack), so each bit-plane word is a sum of shifted codes over q.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from tq_ops.codec import EXACT16_MAX_INT, EXACT16_RTOL


@dataclass(frozen=True)
class EncodeConfig:
    rows: int       # TB, rows per tile (the M of every MMA)
    num_warps: int
    programs_per_sm: int  # persistent grid: the matrices are prepared once per program


DEFAULT_ENCODE = EncodeConfig(rows=64, num_warps=4, programs_per_sm=2)
# (arch, head_dim, bits, exact16) -> config for bulk writes (prefill); absent keys use
# DEFAULT_ENCODE.  perf/tune_encode.py, H200, 32768 tokens x 8 heads, seed format: split keys
# (128, 8, 1) 0.456 TB/s of fp16 input against 0.400 for (64, 4, 2) (a split key program takes
# 176 KB of shared memory at (64, 4), 224 KB at (128, 8): one program per SM either way, and
# 8 warps hide more latency than 4); values (64, 4, 2) beat (128, 8, 1).  EXACT16 keys (112 KB
# at (64, 4), two per SM): (64, 4, 2) 126 us against 149 for (128, 8, 1) and 174 for split
# (128, 8, 1) (perf/scratch/exact16_encode.py, session 22); with session 23's quantizer and sign
# packing, EXACT16 (64, 4, 2) 112.6 us, split (128, 8, 1) 171.8 (perf/scratch/ab_launches.py);
# with session 24's antisymmetric quantizer 112.2 and 150.1, values (64, 4, 2) 100.2 split and
# 94.7 EXACT16; with session 25's vectorised stores and fp16 operands 81.1 and 116.6, values
# 58.4 and 55.1 (values at (64, 4, 3) under a 168-register cap: 55.0, not kept); with session
# 26's 16-byte loads of S' on the split path, split keys 117.8 -> 109.8.
ENCODE_CONFIGS: dict[tuple[str, int, int, bool], EncodeConfig] = {
    ("sm90", 128, 2, False): EncodeConfig(128, 8, 1),
    ("sm90", 128, 3, False): EncodeConfig(64, 4, 2),
    ("sm90", 128, 2, True): EncodeConfig(64, 4, 2),
}
# Writes of at most this many rows (tokens x heads: a decode step's write) are one program in
# any config, and there the smaller tile has the lower latency (H200, 8 tokens x 8 heads:
# 16.6 us for DEFAULT_ENCODE in both launches against 18.8 us with (128, 8, 1) keys).
LATENCY_ROWS = 128


# The exact16_matrices declaration is used by bulk writes of at least this many rows only:
# below, the EXACT16 (64, 4, 2) key launch loses to the split (128, 8, 1) one.  H200, seed
# format, write_cache op, us per call with the declaration against without (perf/NOTES.md,
# session 24): 2048 tokens x 8 heads 29.5 against 25.7, 4096 x 8 42.4 against 41.2, 8192 x 8
# 68.7 against 71.0, 32768 x 8 211 against 246 (session 25's kernels: 139 against 176; the
# smaller sizes were not timed again).
EXACT16_MIN_ROWS = 65536


# fp32 input adds its low part as one more MMA operand in shared memory: 160-224 KB per 64-row
# program at head_dim 128 (sm_90 compiles as launched, tests/test_launch_configs.py), one
# program per SM
FP32_ENCODE = EncodeConfig(rows=64, num_warps=4, programs_per_sm=1)


def encode_config(arch: str, head_dim: int, bits: int, rows: int,
                  fp32_input: bool = False, exact16: bool = False) -> EncodeConfig:
    """The launch config of a write of `rows` (token, head) rows.  ENCODE_CONFIGS holds for
    fp16/bf16 input; fp32 input takes FP32_ENCODE (the 128-row key tile cannot hold its extra
    operand: 320 KB against an SM's 227 KB).  exact16: encode_kernel's EXACT16."""
    if rows <= LATENCY_ROWS:
        return DEFAULT_ENCODE
    if fp32_input:
        return FP32_ENCODE
    return ENCODE_CONFIGS.get((arch, head_dim, bits, exact16), DEFAULT_ENCODE)


def pair_configs(arch: str, head_dim: int, key_bits: int, value_bits: int, rows: int,
                 sms: int, key_fp32: bool = False, value_fp32: bool = False,
                 exact16: bool = False) -> tuple[EncodeConfig, EncodeConfig]:
    """(key config, value config) of a cache write of `rows` (token, head) rows on a GPU of
    `sms` SMs: encode_config of each, except that a bulk write of at most `sms` DEFAULT_ENCODE
    tiles of 16-bit input takes DEFAULT_ENCODE for both.  Such a write is latency-bound: with one
    config it is one launch of one tile per program (encode_pair_kernel's ONE_TILE), and the
    64-row tile makes more, shorter programs than the bulk table's 128-row keys.  H200, seed
    format, 8 heads, fp16, us per write, two launches at the bulk configs against one at
    DEFAULT_ENCODE (perf/scratch/ab_small_writes.py, session 28): 17 tokens 16.3 -> 8.5, 256
    tokens 16.7 -> 9.05, 1024 tokens 17.7 -> 15.1; 4096 tokens (past the limit, round robin)
    29.6 -> 40.9, hence the limit.  fp32 input keeps FP32_ENCODE (its shared memory)."""
    key_cfg = encode_config(arch, head_dim, key_bits, rows, key_fp32, exact16)
    value_cfg = encode_config(arch, head_dim, value_bits, rows, value_fp32, exact16)
    small_bulk = LATENCY_ROWS < rows <= DEFAULT_ENCODE.rows * sms
    if small_bulk and not (key_fp32 or value_fp32):
        return DEFAULT_ENCODE, DEFAULT_ENCODE
    return key_cfg, value_cfg


# EXACT16's check uses tq_ops.codec.exact16_matrices' bounds
EXACT_RTOL = tl.constexpr(EXACT16_RTOL)
EXACT_MAX_INT = tl.constexpr(float(EXACT16_MAX_INT))

MODE_CACHE = 0    # rows go to slot_mapping[token] of a paged cache
MODE_RECORDS = 1  # row r goes to bytes r*record_bytes.. of a flat record tensor


@triton.jit
def _projection_rows(proj_ptr, coord, cmask, D: tl.constexpr, DG: tl.constexpr):
    """(8DG, 8, DG) fp32 rows of S' in grouped order, [c, q, m] = S'[coord(c), 8m + q], where q
    runs over 8 adjacent entries of a row (16-byte loads).  Gathering ST directly is one 4-byte
    load per entry, each from another sector; read this way, the split-precision key launch at
    (128, 8, 1) ran 117.8 -> 109.8 us (H200, 32768 tokens x 8 heads, session 26)."""
    q = tl.arange(0, 8)
    m = tl.arange(0, DG)
    ptr = proj_ptr + (coord * D)[:, None, None] + q[None, :, None] + (8 * m)[None, None, :]
    return tl.load(ptr, mask=cmask[:, None, None] & (m < D // 8)[None, None, :], other=0.0)


@triton.jit
def _regroup(rows, DG: tl.constexpr):
    """ST (8DG, 8DG), ST[c', c] = S'[coord(c), coord(c')], from _projection_rows' layout (any
    dtype: regrouped after the split, the fp16 halves move half the bytes)."""
    return tl.trans(tl.reshape(rows, (8 * DG, 8 * DG)))


@triton.jit
def _split16(v):
    hi = v.to(tl.float16)
    return hi, (v - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _nonnegative_bits(v, TB: tl.constexpr, DG: tl.constexpr):
    """(TB, DG) uint32 with bit q = (v[:, q*DG + m] >= 0), v fp32 (TB, 8*DG) in grouped columns.

    Each group's sign bit is shifted in from the top (one funnel shift per element, against a
    compare, a select and an add); -0 reads as negative, a tie at the sign's boundary."""
    b = tl.permute(tl.reshape(v.to(tl.uint32, bitcast=True), (TB, 2, 2, 2, DG)), (0, 4, 1, 2, 3))
    even, odd = tl.split(b)  # (TB, DG, 2, 2), q = 4a + 2b + e
    q04, q26 = tl.split(even)
    q15, q37 = tl.split(odd)
    q0, q4 = tl.split(q04)
    q2, q6 = tl.split(q26)
    q1, q5 = tl.split(q15)
    q3, q7 = tl.split(q37)
    w = q7 >> 31
    w = (w << 1) | (q6 >> 31)
    w = (w << 1) | (q5 >> 31)
    w = (w << 1) | (q4 >> 31)
    w = (w << 1) | (q3 >> 31)
    w = (w << 1) | (q2 >> 31)
    w = (w << 1) | (q1 >> 31)
    w = (w << 1) | (q0 >> 31)
    return w ^ 0xFF


@triton.jit(do_not_specialize=['n_rows'],
            do_not_specialize_on_alignment=['slot_ptr'])
def encode_kernel(x_ptr, n_rows, x_st, x_sh, out_ptr, slot_ptr, page_stride, head_stride,
                  norm_ptr, rot_ptr, proj_ptr, c_ptr,
                  H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DG: tl.constexpr,
                  TB: tl.constexpr, BITS: tl.constexpr, QJL: tl.constexpr, BS: tl.constexpr,
                  OFF_C: tl.constexpr, OFF_S: tl.constexpr, OFF_N: tl.constexpr,
                  OFF_G: tl.constexpr, MODE: tl.constexpr, NORM_F32: tl.constexpr,
                  X_F32: tl.constexpr, EXACT16: tl.constexpr):
    """Encode rows pid*TB .. of x (T, H, D) (element strides x_st, x_sh; last dim contiguous).

    MODE_CACHE: token t goes to slot s = slot_ptr[t] (s < 0: skipped) of a paged cache,
    byte base (s // BS) * page_stride + head * head_stride.  MODE_RECORDS: row r's record starts
    at byte r * page_stride (BS = 1).  Component c of the token starts at base + BS * OFF_c +
    (s % BS) * size(c).  NORM_F32: the norm goes to norm_ptr as fp32 instead of the record.

    Coordinates are handled in the 8 groups of tq_ops.triton.unpack (group q = coordinates
    8m + q), so every bit-plane word is an OR of shifted group codes: no reshapes.

    EXACT16: rot_ptr and proj_ptr are declared tq_ops.codec.exact16_matrices (module docstring);
    each program checks the matrices it loads and, if they do not qualify, stores NaN norms.
    """
    _encode_rows(x_ptr, n_rows, x_st, x_sh, out_ptr, slot_ptr, page_stride, head_stride,
                 norm_ptr, rot_ptr, proj_ptr, c_ptr, tl.program_id(0), tl.num_programs(0),
                 H, D, DP, DG, TB, BITS, QJL, BS, OFF_C, OFF_S, OFF_N, OFF_G, MODE, NORM_F32,
                 X_F32, EXACT16)


@triton.jit(do_not_specialize=['n_rows'],
            do_not_specialize_on_alignment=['slot_ptr'])
def encode_pair_kernel(k_ptr, v_ptr, n_rows, k_st, k_sh, v_st, v_sh, out_ptr, slot_ptr,
                       page_stride, head_stride, rot_ptr, proj_ptr, kc_ptr, vc_ptr,
                       H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DG: tl.constexpr,
                       TB: tl.constexpr, K_BITS: tl.constexpr, QJL: tl.constexpr,
                       V_BITS: tl.constexpr, BS: tl.constexpr, K_OFF_C: tl.constexpr,
                       K_OFF_S: tl.constexpr, K_OFF_N: tl.constexpr, K_OFF_G: tl.constexpr,
                       V_OFF_C: tl.constexpr, V_OFF_N: tl.constexpr, K_F32: tl.constexpr,
                       V_F32: tl.constexpr, EXACT16: tl.constexpr,
                       JOINT: tl.constexpr, ONE_TILE: tl.constexpr):
    """A cache write's keys and values (each as encode_kernel's MODE_CACHE does) in one launch.

    JOINT=False, a small write (a decode step's tokens), two programs: program 0 encodes the
    keys, program 1 the values (without EXACT16, which measured slower here:
    tq_ops.ops.write_cache.launch_write_cache).  Such a write is latency-bound (one program per
    launch either way), so two launches cost about twice one.

    JOINT=True, a bulk write, a persistent grid: the key tiles and then the value tiles form one
    list dealt round robin over the programs, so each program encodes its key tiles, then its
    value tiles, and no program ends more than one tile after another.  Two launches (all keys,
    then all values) each leave a partial last round of tiles and a launch gap.

    ONE_TILE (with JOINT; the grid is 2 * the tile count): program p < tiles encodes key tile p,
    the others value tile p - tiles, so no program runs the prologue (matrices, codebook) of a
    kind it has no tile of.  H200, 8 heads, fp16, us per write against the round robin
    (perf/scratch/ab_small_writes.py, session 28): k3v3 17 tokens 6.8 -> 5.4, 1024 tokens
    10.3 -> 8.2; k2q1v2 17 tokens 13.2 -> 9.9.  A run-time guard in the round-robin code
    instead made large declared writes 1-4% slower (another register allocation)."""
    if ONE_TILE:
        tiles = tl.cdiv(n_rows, TB)
        pid = tl.program_id(0)
        # two ifs in sequence, not if/else: Triton gives the two branches of an if/else
        # shared memory of their own (sm_90, k3v3: 131,072 bytes per program against 100,352)
        if pid < tiles:
            _encode_rows(k_ptr, n_rows, k_st, k_sh, out_ptr, slot_ptr, page_stride,
                         head_stride, out_ptr, rot_ptr, proj_ptr, kc_ptr, pid, tiles, H, D, DP,
                         DG, TB, K_BITS, QJL, BS, K_OFF_C, K_OFF_S, K_OFF_N, K_OFF_G, 0, False,
                         K_F32, EXACT16)  # MODE_CACHE
        if pid >= tiles:
            _encode_rows(v_ptr, n_rows, v_st, v_sh, out_ptr, slot_ptr, page_stride,
                         head_stride, out_ptr, rot_ptr, proj_ptr, vc_ptr, pid - tiles, tiles, H,
                         D, DP, DG, TB, V_BITS, False, BS, V_OFF_C, 0, V_OFF_N, 0, 0, False,
                         V_F32, EXACT16)
    elif JOINT:
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        key_tiles = tl.cdiv(n_rows, TB)
        _encode_rows(k_ptr, n_rows, k_st, k_sh, out_ptr, slot_ptr, page_stride, head_stride,
                     out_ptr, rot_ptr, proj_ptr, kc_ptr, pid, programs, H, D, DP, DG, TB,
                     K_BITS, QJL, BS, K_OFF_C, K_OFF_S, K_OFF_N, K_OFF_G, 0, False, K_F32,
                     EXACT16)  # MODE_CACHE
        # joint tile key_tiles + v goes to program (key_tiles + v) % programs
        first_value = (pid + programs - key_tiles % programs) % programs
        _encode_rows(v_ptr, n_rows, v_st, v_sh, out_ptr, slot_ptr, page_stride, head_stride,
                     out_ptr, rot_ptr, proj_ptr, vc_ptr, first_value, programs, H, D, DP, DG,
                     TB, V_BITS, False, BS, V_OFF_C, 0, V_OFF_N, 0, 0, False, V_F32, EXACT16)
    elif tl.program_id(0) == 0:
        _encode_rows(k_ptr, n_rows, k_st, k_sh, out_ptr, slot_ptr, page_stride, head_stride,
                     out_ptr, rot_ptr, proj_ptr, kc_ptr, 0, 1, H, D, DP, DG, TB, K_BITS, QJL,
                     BS, K_OFF_C, K_OFF_S, K_OFF_N, K_OFF_G, 0, False, K_F32, False)  # MODE_CACHE
    else:
        _encode_rows(v_ptr, n_rows, v_st, v_sh, out_ptr, slot_ptr, page_stride, head_stride,
                     out_ptr, rot_ptr, proj_ptr, vc_ptr, 0, 1, H, D, DP, DG, TB, V_BITS, False,
                     BS, V_OFF_C, 0, V_OFF_N, 0, 0, False, V_F32, False)  # MODE_CACHE


@triton.jit
def _encode_rows(x_ptr, n_rows, x_st, x_sh, out_ptr, slot_ptr, page_stride, head_stride,
                 norm_ptr, rot_ptr, proj_ptr, c_ptr, first_tile, tile_step,
                 H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DG: tl.constexpr,
                 TB: tl.constexpr, BITS: tl.constexpr, QJL: tl.constexpr, BS: tl.constexpr,
                 OFF_C: tl.constexpr, OFF_S: tl.constexpr, OFF_N: tl.constexpr,
                 OFF_G: tl.constexpr, MODE: tl.constexpr, NORM_F32: tl.constexpr,
                 X_F32: tl.constexpr, EXACT16: tl.constexpr):
    """encode_kernel's body for tiles first_tile, first_tile + tile_step, ..."""
    d = tl.arange(0, DP)
    dmask = d < D
    # output column c = q*DG + m holds coordinate 8m + q (grouped order)
    c = tl.arange(0, 8 * DG)
    cq = c // DG
    cm = c % DG
    coord = 8 * cm + cq
    cmask = cm < D // 8
    pit = tl.load(rot_ptr + coord[None, :] * D + d[:, None], mask=dmask[:, None] & cmask[None, :],
                  other=0.0)
    if EXACT16:
        if QJL:
            # ST[c', c] = S'[coord(c), coord(c')], gathered (one 4-byte load per entry): read
            # as the split path reads it, this launch ran 80.5 -> 87.1 us (H200, session 26)
            st = tl.load(proj_ptr + coord[None, :] * D + coord[:, None],
                         mask=cmask[:, None] & cmask[None, :], other=0.0)
        else:
            st = pit  # unused without QJL
        # declared exact16_matrices(): PiT = M / D^1.5 with an integer M (|M| <= 2048) and S'
        # of fp16 values, so one fp16 operand each holds them exactly.  A false declaration
        # sets `poison` to NaN, which goes into every stored norm (never silently wrong codes).
        rot_scale = D * tl.sqrt_rn(D * 1.0)  # D^1.5 (tq_ops.codec.rotation_matrix)
        scaled = pit * rot_scale
        m_int = tl.floor(scaled + 0.5)
        ok = (tl.abs(scaled - m_int) <= tl.abs(m_int) * EXACT_RTOL) & (tl.abs(m_int) <= EXACT_MAX_INT)
        bad = tl.sum(tl.sum((~ok).to(tl.int32), 1), 0)
        if QJL:
            bad += tl.sum(tl.sum((st.to(tl.float16).to(tl.float32) != st).to(tl.int32), 1), 0)
        poison = tl.where(bad == 0, 0.0, float("nan"))
        p_hi = m_int.to(tl.float16)
        s_hi = st.to(tl.float16)
        p_lo = p_hi  # the low parts are never read under EXACT16
        s_lo = s_hi
        rot_inv = 1.0 / rot_scale
    else:
        # split-precision matrices, once per program: PiT[i, c] = Pi[coord(c), i]
        poison = 0.0
        p_hi, p_lo = _split16(pit)
        if QJL:
            s_hi, s_lo = _split16(_projection_rows(proj_ptr, coord, cmask, D, DG))
            s_hi = _regroup(s_hi, DG)
            s_lo = _regroup(s_lo, DG)
        else:
            s_hi = p_hi
            s_lo = p_lo
        rot_inv = 1.0
    # every built-in codebook is antisymmetric (c[2^B - 1 - k] == -c[k] in fp32); the ops accept
    # any codebook, so each program checks the one it was given (_quantize_antisymmetric)
    cb = _load_codebook(c_ptr, BITS)
    antisym = cb[0] == -cb[2 ** BITS - 1]
    for k in tl.static_range(1, 2 ** (BITS - 1)):
        antisym = antisym & (cb[k] == -cb[2 ** BITS - 1 - k])
    for tile in tl.range(first_tile, tl.cdiv(n_rows, TB), tile_step):
        _encode_tile(x_ptr, n_rows, x_st, x_sh, out_ptr, slot_ptr, page_stride, head_stride,
                     norm_ptr, cb, tile, p_hi, p_lo, s_hi, s_lo, rot_inv, poison, antisym, H,
                     D, DP, DG, TB, BITS, QJL, BS, OFF_C, OFF_S, OFF_N, OFF_G, MODE, NORM_F32,
                     X_F32, EXACT16)


@triton.jit
def _load_codebook(c_ptr, BITS: tl.constexpr):
    """The 2^BITS fp32 centroids as a tuple of 16 scalars (entries past 2^BITS are 0), loaded
    once per program: loaded inside the tile loop, they were issued every tile and waited on
    (Nsight Compute, H200, session 25)."""
    n: tl.constexpr = 2 ** BITS
    return (tl.load(c_ptr + 0), tl.load(c_ptr + 1),
            tl.load(c_ptr + 2, mask=2 < n, other=0.0), tl.load(c_ptr + 3, mask=3 < n, other=0.0),
            tl.load(c_ptr + 4, mask=4 < n, other=0.0), tl.load(c_ptr + 5, mask=5 < n, other=0.0),
            tl.load(c_ptr + 6, mask=6 < n, other=0.0), tl.load(c_ptr + 7, mask=7 < n, other=0.0),
            tl.load(c_ptr + 8, mask=8 < n, other=0.0), tl.load(c_ptr + 9, mask=9 < n, other=0.0),
            tl.load(c_ptr + 10, mask=10 < n, other=0.0),
            tl.load(c_ptr + 11, mask=11 < n, other=0.0),
            tl.load(c_ptr + 12, mask=12 < n, other=0.0),
            tl.load(c_ptr + 13, mask=13 < n, other=0.0),
            tl.load(c_ptr + 14, mask=14 < n, other=0.0),
            tl.load(c_ptr + 15, mask=15 < n, other=0.0))


@triton.jit
def _quantize_counting(y, cb, BITS: tl.constexpr, QJL: tl.constexpr):
    """(code, c[code]) of rotated unit rows y (fp32, any shape) for any codebook cb
    (_load_codebook): code = #{k: y > mid_k}, the reference's definition.  c[code] only with QJL
    (0.0 otherwise)."""
    # each term is the sign bit of mid_k - y (one FADD, one LEA.HI to add it);
    # `(y > mid).to(int32)` compiles to a compare, an add and a predicated move per threshold
    # (sm_90: 2600 -> 2162 instructions per 3-bit value tile).  Equality gives +0 (no count), as
    # y > mid does.
    code = tl.zeros(y.shape, tl.int32)
    for k in tl.static_range(2 ** BITS - 1):
        mid = (cb[k] + cb[k + 1]) / 2
        code += ((mid - y).to(tl.uint32, bitcast=True) >> 31).to(tl.int32)
    if QJL:
        cval = tl.zeros(y.shape, tl.float32) + cb[0]
        for k in tl.static_range(1, 2 ** BITS):
            cval = tl.where(code == k, cb[k], cval)
    else:
        cval = 0.0
    return code, cval


@triton.jit
def _quantize_antisymmetric(y, cb, BITS: tl.constexpr, QJL: tl.constexpr):
    """_quantize_counting for a codebook with c[2^B - 1 - k] == -c[k] (checked by the caller).

    Then mid_{h-1} = 0 and mid_{h-1-j} = -mid_{h-1+j} exactly (h = 2^(B-1)), so with
    t = #{j >= h: |y| > mid_j} and pos = (y > 0) the count is h + t for y > 0 and h - 1 - t
    otherwise, i.e. code = t ^ (h - 1 + pos): h - 1 thresholds instead of 2h - 1.  It differs
    from the count only where y < 0 lies exactly on a midpoint (a tie).  c[code] is
    +-c[h + t], the sign flipped by pos: a select over h entries instead of 2h."""
    HALF: tl.constexpr = 2 ** (BITS - 1)
    a = tl.abs(y)
    t = tl.zeros(y.shape, tl.int32)
    for j in tl.static_range(HALF, 2 ** BITS - 1):
        mid = (cb[j] + cb[j + 1]) / 2
        t += ((mid - a).to(tl.uint32, bitcast=True) >> 31).to(tl.int32)
    # the sign bit of 0 - y is y > 0 (+0 and -0 both give +0, as 0 > mid_{h-1} = 0 is false)
    pos_bit = ((0.0 - y).to(tl.uint32, bitcast=True) >> 31) << 31
    code = t ^ ((HALF - 1) + (pos_bit >> 31).to(tl.int32))
    if QJL:
        mag = tl.zeros(y.shape, tl.float32) + cb[HALF]
        for k in tl.static_range(1, HALF):
            mag = tl.where(t == k, cb[HALF + k], mag)
        # c[code] = mag for y > 0 and -mag otherwise (sign flips as bit operations, which
        # fold into the residual's subtraction)
        cval = -(mag.to(tl.uint32, bitcast=True) ^ pos_bit).to(tl.float32, bitcast=True)
    else:
        cval = 0.0
    return code, cval


@triton.jit
def _encode_tile(x_ptr, n_rows, x_st, x_sh, out_ptr, slot_ptr, page_stride, head_stride,
                 norm_ptr, cb, tile, p_hi, p_lo, s_hi, s_lo, rot_inv, poison, antisym,
                 H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DG: tl.constexpr,
                 TB: tl.constexpr, BITS: tl.constexpr, QJL: tl.constexpr, BS: tl.constexpr,
                 OFF_C: tl.constexpr, OFF_S: tl.constexpr, OFF_N: tl.constexpr,
                 OFF_G: tl.constexpr, MODE: tl.constexpr, NORM_F32: tl.constexpr,
                 X_F32: tl.constexpr, EXACT16: tl.constexpr):
    d = tl.arange(0, DP)
    dmask = d < D
    m = tl.arange(0, DG)
    gm = m < D // 8
    c = tl.arange(0, 8 * DG)
    cq = c // DG
    cmask = (c % DG) < D // 8
    r = tile * TB + tl.arange(0, TB)
    rmask = r < n_rows
    t = r // H
    h = r % H
    xin = tl.load(x_ptr + t.to(tl.int64)[:, None] * x_st + h[:, None] * x_sh + d[None, :],
                  mask=rmask[:, None] & dmask[None, :], other=0.0)
    x = xin.to(tl.float32)
    if MODE == 0:
        slot = tl.load(slot_ptr + t, mask=rmask, other=-1).to(tl.int64)
        rmask = rmask & (slot >= 0)
        slot = tl.maximum(slot, 0)
        base = (slot // BS) * page_stride + h.to(tl.int64) * head_stride
        tin = slot % BS
    else:
        base = r.to(tl.int64) * page_stride
        tin = r.to(tl.int64) * 0
    n = tl.sqrt(tl.sum(x * x, 1))
    if x_ptr.dtype.element_ty == tl.float16:
        # fp16 rows are their own MMA operand: the prescale below (a power of two) commutes
        # with every rounding of the product and the division (no overflow or underflow at
        # these magnitudes), so y is bit-identical without it, and the loaded tile needs no
        # round trip through registers and shared memory to become the operand
        x_hi = xin
        x_lo = xin  # never read: fp16 input has no low part
        inv = tl.where(n > 0, rot_inv / n, 0.0)
    else:
        # power-of-two prescale from the norm: max |x s| <= n s < 2^15, and bf16 inputs convert
        # to fp16 exactly (entries below 2^-28 n would lose bits: below any rounding that
        # matters)
        e = ((n.to(tl.int32, bitcast=True) >> 23) & 255) - 127
        e = tl.minimum(tl.maximum(e, -100), 100)
        s = ((127 + 14 - e) << 23).to(tl.float32, bitcast=True)
        x_hi, x_lo = _split16(x * s[:, None])
        inv = tl.where(n > 0, rot_inv / (n * s), 0.0)
    ys = tl.dot(x_hi, p_hi)
    if not EXACT16:
        ys = tl.dot(x_hi, p_lo, ys)
    if X_F32:
        ys = tl.dot(x_lo, p_hi, ys)
    # A uniform branch (one loop per branch would double the x pipeline's shared buffers).  y
    # is formed before it: with the MMA result used inside the branch, Triton 3.6's software
    # pipeliner fails to compile the loop.
    y = ys * inv[:, None]
    if antisym:
        code, cval = _quantize_antisymmetric(y, cb, BITS, QJL)
    else:
        code, cval = _quantize_counting(y, cb, BITS, QJL)
    crow = base + BS * OFF_C + tin * (D * BITS // 8)
    smask = rmask[:, None] & gm[None, :]
    if BITS == 4:
        w = tl.reshape(code << (4 * (cq % 4))[None, :], (TB, 2, 4, DG))
        w = tl.sum(w, 2)
        w_lo, w_hi = tl.split(tl.permute(w, (0, 2, 1)))
        # 16-bit halves, not one int32: a record (MODE_RECORDS) may start at any even byte
        # (an int32 store faulted there on the H200, session 25)
        p16 = (out_ptr + crow[:, None] + 4 * m[None, :]).to(tl.pointer_type(tl.int16))
        tl.store(p16, w_lo.to(tl.int16), mask=smask)
        tl.store(p16 + 1, w_hi.to(tl.int16), mask=smask)
    elif BITS == 1:
        w = tl.sum(tl.reshape(code << cq[None, :], (TB, 8, DG)), 1)
        tl.store(out_ptr + crow[:, None] + m[None, :], w.to(tl.uint8), mask=smask)
    else:
        w = tl.sum(tl.reshape((code & 3) << (2 * cq)[None, :], (TB, 8, DG)), 1)
        # the row's word pointer first, then the group index: a byte pointer plus 2 * m has no
        # contiguity for Triton's axis analysis, and the stores were one 2-byte store per
        # element (Nsight Compute, session 25: 55% of the key launch's L2 sectors excessive)
        # instead of 16-byte vectors
        p16 = (out_ptr + crow).to(tl.pointer_type(tl.int16))[:, None] + m[None, :]
        tl.store(p16, w.to(tl.int16), mask=smask)
        if BITS == 3:
            w1 = tl.sum(tl.reshape((code >> 2) << cq[None, :], (TB, 8, DG)), 1)
            tl.store(out_ptr + crow[:, None] + D // 4 + m[None, :], w1.to(tl.uint8), mask=smask)
    if QJL:
        res = tl.where(cmask[None, :], y - cval, 0.0)
        gam2 = tl.sum(res * res, 1)
        r_hi, r_lo = _split16(res * 256.0)  # scaled so the low part stays normal; same signs
        proj = tl.dot(r_hi, s_hi)
        if not EXACT16:
            proj = tl.dot(r_hi, s_lo, proj)
        proj = tl.dot(r_lo, s_hi, proj)
        sb = _nonnegative_bits(proj, TB, DG)
        tl.store(out_ptr + (base + BS * OFF_S + tin * (D // 8))[:, None] + m[None, :],
                 sb.to(tl.uint8), mask=smask)
        gptr = (out_ptr + base + BS * OFF_G + tin * 2).to(tl.pointer_type(tl.float16))
        tl.store(gptr, tl.sqrt(gam2).to(tl.float16), mask=rmask)
    n = n + poison
    if NORM_F32:
        tl.store(norm_ptr + r, n, mask=rmask)
    else:
        nptr = (out_ptr + base + BS * OFF_N + tin * 2).to(tl.pointer_type(tl.float16))
        tl.store(nptr, n.to(tl.float16), mask=rmask)
