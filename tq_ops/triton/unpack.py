"""Shared @triton.jit helpers: paged-cache addressing and bit-plane unpacking.

Coordinate groups.  The kernels never rebuild a (tokens, D) code tile in coordinate order: they
split the D coordinates into 8 groups, group r holding coordinates 8*m + r for m in [0, DG)
(DG = group_width(D), padded to a power of two >= 16 so each group is a legal tl.dot K).  In a
bit plane of width w (tq_ops.layout) the 8*w bits of coordinates 8m .. 8m+7 are the w bytes
starting at byte m*w, and coordinate 8m + r sits at bit w*r of that little-endian word.  So one
load of a (tokens, DG) tensor of w-byte words serves all 8 groups, each group being one constant
shift and mask.  The query side (q_rot, u) is loaded in the same grouped order, a dot product over
D is the sum of 8 tl.dot calls of width DG, and value accumulators are stored back at 8m + r.

Two ways to turn codes into fp16 tensor-core operands:

* fast (GPU only): `tl.inline_asm_elementwise` with pack=4 decodes four codes per few
  instructions: PRMT byte permutes look the fp16 centroids up in a table held in two registers
  (the codebook is baked into the asm as compile-time constants).  The 1- and 2-bit decoders are unary and
  pure, so Triton evaluates them directly in the MMA operand layout (no fp16 round trip through
  shared memory); the 3-bit one reads both planes and gathers from byte tables of all 8 centroids.  Used for 1..3-bit codes when the centroids passed at
  run time equal the baked table (checked in the kernel, so any codebook stays correct).
* slow (everywhere, and the only one under TRITON_INTERPRET): per-element byte gathers and a
  select chain over the centroids read at run time.
"""
from __future__ import annotations

import math
import struct

import triton
import triton.language as tl

from tq_ops.codebook_tables import CENTROIDS


def group_width(head_dim: int) -> int:
    """DG: padded number of coordinates in one of the 8 groups."""
    return max(16, triton.next_power_of_2(head_dim // 8))


def folded_width(head_dim: int) -> bool:
    """Head widths whose D / 8 group indices fill exactly half of a DG-row (or -column) MMA
    operand (head_dim 64): there the split kernel's fast decoders fold, each operand holding
    every code word twice and its second half decoding other groups (fold_group_dims, the
    folded key and sign planes)."""
    return 2 * (head_dim // 8) == group_width(head_dim)


def sign_plane_group(k: int, head_dim: int) -> int:
    """The group whose sign-plane position (and query-side constants) coordinate k takes: its
    own, k % 8, or at folded widths k % 4: the folded sign decoder shifts the signs of groups
    4-7 onto the bits of groups 0-3 (_asm_sign_plane_folded)."""
    return k % 4 if folded_width(head_dim) else k % 8


def _f16_bits(x: float) -> int:
    return struct.unpack("<H", struct.pack("<e", x))[0]


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def fp16_table(head_dim: int, bits: int) -> tuple[int, ...]:
    """fp16 bit patterns of the stored (sphere) codebook, exactly as TQCodec builds it: the float64
    table value / sqrt(D), rounded to fp32 (the centroid tensor), then to fp16 (the MMA operand)."""
    vals = CENTROIDS.get((head_dim, bits))
    if vals is None:
        return ()
    return tuple(_f16_bits(_f32(v / math.sqrt(head_dim))) for v in vals)


def asm_tables(head_dim: int, bits: int) -> tuple[int, int, int]:
    """(ok, T0, T1): the baked table words of the fast decoders (fp16 bit patterns).

    bits 1: T0 = c0 | c1<<16.  bits 2: T0 = c0|c1<<16, T1 = c2|c3<<16.
    bits 3: T0 = c0 | c1<<16 | c2<<32 | c3<<48, T1 the same of c4..c7; without a stored
    codebook T0 = T1 = 0 and ok = 1 all the same: the 3-bit decoder that reads the centroids at
    run time (fast_values3) serves it.
    bits 4, or a head_dim without a stored 1- or 2-bit codebook: ok = 0 (slow path only).
    """
    if bits == 3:
        t = fp16_table(head_dim, bits)
        if not t:
            return (1, 0, 0)
        return (1, sum(v << 16 * i for i, v in enumerate(t[:4])),
                sum(v << 16 * i for i, v in enumerate(t[4:])))
    t = fp16_table(head_dim, bits)
    if not t or bits > 3:
        return (0, 0, 0)
    t = t + (0,) * (4 - len(t))
    return (1, t[0] | t[1] << 16, t[2] | t[3] << 16)


# -- inline PTX, built at compile time from constexpr table words -------------------------------

@triton.constexpr_function
def _asm_lut2(r, t0, t1):
    # in: 4 int16 words (2 regs), out: 4 fp16 (2 regs).  Byte r//4 of each word holds the code.
    sel = "0x7531" if r >= 4 else "0x6420"
    return f"""{{
.reg .b32 x, t, u, v, ta, tb;
prmt.b32 x, $2, $3, {sel};
shr.b32 t, x, {2 * (r % 4)};
and.b32 t, t, 0x03030303;
mad.lo.u32 u, t, 0x22, 0x10101010;
mov.b32 ta, 0x{t0:08X};
mov.b32 tb, 0x{t1:08X};
prmt.b32 $0, ta, tb, u;
shr.b32 v, u, 16;
prmt.b32 $1, ta, tb, v;
}}"""


def _lut3_lookup(r: int, bits2: str, lo_a: str, lo_b: str, hi_a: str, hi_b: str) -> str:
    """PTX shared by the 3-bit decoders: register x holds the 2-bit-plane bytes of group r's
    4 codes (one byte per code), `bits2` the 1-bit-plane bytes; the codes become selector
    nibbles into the byte tables (low / high bytes of c0..3 and c4..7), and the 4 fp16 go to
    $0, $1.  Uses registers t, hh, y, s, l4, h4 (declared by the caller)."""
    hshift = (f"shl.b32 hh, {bits2}, {2 - r};" if r <= 2
              else f"shr.b32 hh, {bits2}, {r - 2};")
    return "\n".join([
        f"shr.b32 t, x, {2 * (r % 4)};",
        "and.b32 t, t, 0x03030303;",
        hshift,
        "and.b32 hh, hh, 0x04040404;",
        "or.b32 t, t, hh;",
        # PRMT reads only the selector's low 16 bits: t | t >> 12 puts codes 0, 2, 1, 3 in
        # its nibbles (one LEA.HI), so the lookups come out in that order and the interleaves
        # below undo it; no PRMT gathers the nibbles first
        "shr.b32 y, t, 12;",
        "or.b32 s, y, t;",
        f"prmt.b32 l4, {lo_a}, {lo_b}, s;",
        f"prmt.b32 h4, {hi_a}, {hi_b}, s;",
        "prmt.b32 $0, l4, h4, 0x6240;",
        "prmt.b32 $1, l4, h4, 0x7351;"])


@triton.constexpr_function
def _asm_lut3(r):
    # in: 4 int16 words of the 2-bit plane ($2, $3), 4 bytes of the 1-bit plane ($4), and the
    # byte tables of the 8 centroids (low bytes of c0..3 in $5, c4..7 in $9, high bytes in $13,
    # $17: each table operand is a broadcast scalar, so only its first register is read).
    # out: 4 fp16.  The 3-bit codes become selector nibbles: one PRMT gathers the 4 low bytes,
    # one the 4 high bytes, two interleave them.
    from tq_ops.triton import unpack as U
    sel = "0x7531" if r >= 4 else "0x6420"
    return f"""{{
.reg .b32 x, t, hh, y, s, l4, h4;
prmt.b32 x, $2, $3, {sel};
{U._lut3_lookup(r, "$4", "$5", "$9", "$13", "$17")}
}}"""


# -- bit planes: the decode split kernel's key decoders -------------------------------------
#
# A symmetric 2-bit codebook (c0 = -c3, c1 = -c2, as every built-in one) is a sum of two +-1
# planes: c[2 b1 + b0] = alpha s1 + beta s0 with s = 2b - 1, alpha = (c3 + c2)/2,
# beta = (c3 - c2)/2; the QJL signs are one such plane.  So q . k is a sum of plane products,
# and a plane needs no table: one AND and one OR turn a bit into an fp16 MMA operand that is
# affine in it, v = a + c b, because the bit lands in the exponent field (or the sign) of an
# fp16 whose other bits are a fixed base.  Positions 10..15 of a 16-bit half are used:
#
#   p   base      v for b = 0, 1
#   10  0x3800    0.5, 1        (exponent bit 0 over exponent 14)
#   11  0x3400    0.25, 1       (exponent bit 1 over 13)
#   12  0x2C00    2^-4, 1       (exponent bit 2 over 11)
#   13  0x1C00    2^-8, 1       (exponent bit 3 over 7)
#   14  0x0000    0, 2          (exponent bit 4)
#   15  0x3C00    1, -1         (the sign of 1.0)
#
# Every value is a normal fp16 (no subnormals, no large scales), and the query side absorbs
# the affine map: gamma * sum q s = sum q' v - a sum q' - gamma sum q with q' = (2 gamma / c) q,
# the two sums per query computed once per program (q' rounded to fp16 exactly as the MMA sees
# it, so the a-part cancels exactly).  Bits below position 10 are first shifted up, by a shift
# that ptxas shares between the groups using it.  Per 4 codes that is 4 ALU instructions for
# the two 2-bit planes and ~2 for the signs, against ~6.5 and ~5.5 for the PRMT tables
# (perf/NOTES.md, session 6).  At head_dim 128 the split kernel takes the two 2-bit planes as
# int8 MMA operands instead, straight from the code bytes (tq_ops.triton.decode.int8_key_plane,
# one AND per 4 codes and plane; perf/NOTES.md, session 29); the sign plane stays as here.

_PLANE_BASE = {10: 0x3800, 11: 0x3400, 12: 0x2C00, 13: 0x1C00, 14: 0x0000, 15: 0x3C00}
_PLANE_AC = {10: (0.5, 0.5), 11: (0.25, 0.75), 12: (1 / 16, 15 / 16), 13: (1 / 256, 255 / 256),
             14: (0.0, 2.0), 15: (1.0, -2.0)}
# left shift of a 2-bit-plane word that brings group r's bits (2r, 2r+1) into 10..15
_KEY_SHIFT = (10, 8, 8, 8, 2, 0, 0, 0)


def _f16_value(bits: int) -> float:
    return struct.unpack("<e", struct.pack("<H", bits & 0xFFFF))[0]


def key_plane_position(r: int, hi: int) -> int:
    """Position in the fp16 half of group r's code bit (hi: the code's high bit)."""
    return 2 * r + hi + _KEY_SHIFT[r]


def sign_plane_position(r: int) -> int:
    """Position of group r's sign bit after its byte is moved to the high byte of a half."""
    return 8 + r + (2 if r < 2 else 0)


def symmetric_table(t0: int, t1: int) -> bool:
    """True when the baked 2-bit table words (asm_tables) hold a codebook with c0 = -c3 and
    c1 = -c2 exactly, so the plane decoders apply."""
    c = [_f16_value(t0), _f16_value(t0 >> 16), _f16_value(t1), _f16_value(t1 >> 16)]
    return c[0] == -c[3] and c[1] == -c[2] and c[3] > c[2] > 0


# The constexpr wrappers below reach the plain helpers through a local import: Triton's
# dependency scan rejects plain global functions named in a constexpr function's body.

@triton.constexpr_function
def planes_apply(t0, t1):
    from tq_ops.triton import unpack as U
    return U.symmetric_table(t0, t1)


@triton.constexpr_function
def key_plane_scale(t0, t1, r, hi):
    """(2 gamma / c) of group r's plane: gamma = alpha (hi) or beta, c of its position."""
    from tq_ops.triton import unpack as U
    c2, c3 = U._f16_value(t1), U._f16_value(t1 >> 16)
    gamma = (c3 + c2) / 2 if hi else (c3 - c2) / 2
    return 2 * gamma / U._PLANE_AC[U.key_plane_position(r, hi)][1]


@triton.constexpr_function
def key_plane_offset(r, hi):
    """a of group r's plane position."""
    from tq_ops.triton import unpack as U
    return U._PLANE_AC[U.key_plane_position(r, hi)][0]


@triton.constexpr_function
def key_plane_gamma_sum(t0, t1):
    """alpha + beta = c3: the weight of sum q in the key offset."""
    from tq_ops.triton import unpack as U
    return U._f16_value(t1 >> 16)


@triton.constexpr_function
def groups_folded(d):
    from tq_ops.triton import unpack as U
    return U.folded_width(d)


@triton.constexpr_function
def sign_plane_scale(r):
    from tq_ops.triton import unpack as U
    return 2 / U._PLANE_AC[U.sign_plane_position(r)][1]


@triton.constexpr_function
def sign_plane_offset(r):
    from tq_ops.triton import unpack as U
    return U._PLANE_AC[U.sign_plane_position(r)][0]


def _mask_or(src: str, dst: str, p: int) -> str:
    # one LOP3, (src & m) | base: the base goes in a register (LOP3 takes one immediate)
    m = (1 << p) | (1 << (p + 16))
    b = _PLANE_BASE[p] * 0x10001
    if b:
        return (f"mov.b32 {src}b, 0x{b:08X};\n"
                f"lop3.b32 {dst}, {src}, 0x{m:08X}, {src}b, 0xEA;")
    return f"and.b32 {dst}, {src}, 0x{m:08X};"


@triton.constexpr_function
def _asm_key_plane(r, hi):
    # in: 4 int16 words of the 2-bit plane (2 regs), out: 4 fp16 (2 regs) of group r's plane.
    from tq_ops.triton import unpack as U
    s, p = U._KEY_SHIFT[r], U.key_plane_position(r, hi)
    return f"""{{
.reg .b32 t, u, tb, ub;
shl.b32 t, $2, {s};
shl.b32 u, $3, {s};
{U._mask_or("t", "$0", p)}
{U._mask_or("u", "$1", p)}
}}"""


@triton.constexpr_function
def _asm_key_plane_folded(r, hi):
    # in: 8 int16 words (4 regs) of a (tokens, 16) operand holding each word twice; in its MMA
    # layout (kWidth 2: register bases k+1, m+8, k+8) elements 0-3 ($4, $5) are columns below
    # 8 and 4-7 ($6, $7) the same words in columns 8-15.  out: 8 fp16, group r's plane, then
    # group r + 4's (r < 4): its bits sit 8 higher and land at the same position
    # (key_plane_position(r) == key_plane_position(r + 4)), so the query side is unchanged.
    from tq_ops.triton import unpack as U
    s, s4, p = U._KEY_SHIFT[r], U._KEY_SHIFT[r + 4], U.key_plane_position(r, hi)
    return f"""{{
.reg .b32 t, u, t4, u4, tb, ub, t4b, u4b;
{U._shift("t", "$4", s)}
{U._shift("u", "$5", s)}
{U._shift("t4", "$6", s4)}
{U._shift("u4", "$7", s4)}
{U._mask_or("t", "$0", p)}
{U._mask_or("u", "$1", p)}
{U._mask_or("t4", "$2", p)}
{U._mask_or("u4", "$3", p)}
}}"""


def _sign_plane_spread(src: str, r: int) -> str:
    """PTX from the 4 sign bytes in register `src` to group r's 4 fp16 plane values ($0, $1):
    PRMT moves bytes 0,1 (2,3) to the high bytes of the two halves; groups 0 and 1 are then
    shifted up into the exponent field.  Uses registers a, b, z, ab, bb."""
    up = 2 if r < 2 else 0
    p = sign_plane_position(r)
    return "\n".join(["mov.b32 z, 0;", f"prmt.b32 a, {src}, z, 0x1404;",
                      f"prmt.b32 b, {src}, z, 0x3424;", f"shl.b32 a, a, {up};",
                      f"shl.b32 b, b, {up};", _mask_or("a", "$0", p), _mask_or("b", "$1", p)])


@triton.constexpr_function
def _asm_sign_plane_folded(r):
    # in: 4 sign bytes (1 reg) of 4 columns of a (tokens, 16) operand holding each byte twice;
    # in its MMA layout (kWidth 4: lane bases k+4, k+8, ...) a lane with bit 1 set holds
    # columns 8-15, the copies, whose bytes are shifted down 4 bits first so that group r + 4's
    # signs take group r's bit (r < 4); the query side scales those coordinates with group r's
    # constants (sign_plane_group).  out: 4 fp16, as _asm_sign_plane.
    from tq_ops.triton import unpack as U
    return f"""{{
.reg .b32 a, b, z, ab, bb, ln, x;
mov.u32 ln, %laneid;
and.b32 ln, ln, 2;
shl.b32 ln, ln, 1;
shr.b32 x, $2, ln;
{U._sign_plane_spread("x", r)}
}}"""


@triton.constexpr_function
def _asm_sign_plane(r):
    # in: 4 sign bytes (1 reg), out: 4 fp16 (2 regs) (_sign_plane_spread).  No backslash
    # escapes in a constexpr function: torch.compile copies its source into a string literal,
    # where they would be interpreted
    from tq_ops.triton import unpack as U
    return f"""{{
.reg .b32 a, b, z, ab, bb;
{U._sign_plane_spread("$2", r)}
}}"""


@triton.jit
def key_plane(w16, R: tl.constexpr, HI: tl.constexpr):
    """(N, DG) int16 2-bit-plane words -> fp16 plane operand of group R (v = a + c b)."""
    return tl.inline_asm_elementwise(_asm_key_plane(R, HI), "=r,=r,r,r", [w16],
                                     dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def sign_plane(x8, R: tl.constexpr):
    """(N, DG) uint8 sign bytes -> fp16 plane operand of group R (v = a + c b)."""
    return tl.inline_asm_elementwise(_asm_sign_plane(R), "=r,=r,r", [x8], dtype=tl.float16,
                                     is_pure=True, pack=4)


@triton.jit
def key_plane_folded(w16, R: tl.constexpr, HI: tl.constexpr):
    """(N, 16) int16 2-bit-plane words, each twice (load_fast FOLD) -> fp16 plane operand of
    group R (R < 4) in columns 0-7 and group R + 4 in columns 8-15."""
    return tl.inline_asm_elementwise(_asm_key_plane_folded(R, HI), "=r,=r,=r,=r,r,r,r,r", [w16],
                                     dtype=tl.float16, is_pure=True, pack=8)


@triton.jit
def sign_plane_folded(x8, R: tl.constexpr):
    """(N, 16) uint8 sign bytes, each twice -> fp16 plane operand of group R (R < 4) in
    columns 0-7 and group R + 4 in columns 8-15, both at group R's position."""
    return tl.inline_asm_elementwise(_asm_sign_plane_folded(R), "=r,=r,r", [x8],
                                     dtype=tl.float16, is_pure=True, pack=4)


def _shift(dst: str, src: str, n: int) -> str:
    """PTX moving src up by n bits (down for n < 0) into dst."""
    if n == 0:
        return f"mov.b32 {dst}, {src};"
    return f"shl.b32 {dst}, {src}, {n};" if n > 0 else f"shr.b32 {dst}, {src}, {-n};"


@triton.constexpr_function
def _asm_lut3_word_pair(k, t0, t1):
    # in: 4 value words ($4..$7, value_words: bits 0-15 the 2-bit-plane word, bits 16-23 the
    # 1-bit-plane byte of one coordinate group index).  out: groups k ($0, $1) and k + 4
    # ($2, $3), 4 fp16 each.  Unary, so Triton runs it in the MMA operand layout (no fp16
    # round trip through shared memory).  Seven PRMTs gather the plane bytes of the 4 words;
    # ptxas shares them between the 4 pairs.  One selector word serves both groups: byte e
    # holds element e's group-k code in its low nibble and its group-(k + 4) code in the high
    # one (the two groups' 2-bit fields sit at the same place in a word's low and high byte,
    # their 1-bit-plane bits 4 apart), so it is built once per pair and its upper half takes
    # one shift; the interleaves pick each group's bytes out of the shared lookups.  Offline
    # sm_90: 1695 instructions per 64-token tile against 1797 for one group per call
    # (perf/NOTES.md, session 30).
    from tq_ops.triton import unpack as U
    return U._word_pair_ptx(k, t0, t1, False)


@triton.constexpr_function
def _asm_lut3_word_pair_folded(k, t0, t1):
    # in: 8 value words ($8..$15), out: 8 fp16 of each output ($0..$3, $4..$7).  The folded
    # decoder (head_dim 64, fold_group_dims): the operand's 16 rows hold each word twice, and
    # in Triton's MMA operand layout of kWidth 4 (what an operand built from 8-bit loads gets;
    # test_launch_configs checks it) a thread's elements 0-3 of every 8 are 4 tokens of row
    # g and 4-7 the same tokens of row g + 8.  So the second 4 decode groups k + 2 and k + 6:
    # their gathered plane bytes take one shift each first.
    from tq_ops.triton import unpack as U
    return U._word_pair_ptx(k, t0, t1, True)


def _word_pair_ptx(k: int, t0: int, t1: int, folded: bool) -> str:
    """PTX of the word-pair decoders (above): one half of 4 words, or (folded) two."""
    c = [(t0 >> 16 * i) & 0xFFFF for i in range(4)] + [(t1 >> 16 * i) & 0xFFFF for i in range(4)]
    lo_a = sum((c[i] & 0xFF) << 8 * i for i in range(4))
    lo_b = sum((c[4 + i] & 0xFF) << 8 * i for i in range(4))
    hi_a = sum((c[i] >> 8) << 8 * i for i in range(4))
    hi_b = sum((c[4 + i] >> 8) << 8 * i for i in range(4))
    names = ("a", "b", "xl", "xh", "cc", "dd", "h", "u", "v", "hh", "t", "sb", "l4a", "h4a",
             "l4b", "h4b")

    def half(sfx, ins, outs, fold):
        r = {n: n + sfx for n in names}
        lines = [f"prmt.b32 {r['a']}, {ins[0]}, {ins[1]}, 0x5140;",
                 f"prmt.b32 {r['b']}, {ins[2]}, {ins[3]}, 0x5140;",
                 f"prmt.b32 {r['xl']}, {r['a']}, {r['b']}, 0x5410;",
                 f"prmt.b32 {r['xh']}, {r['a']}, {r['b']}, 0x7632;",
                 f"prmt.b32 {r['cc']}, {ins[0]}, {ins[1]}, 0x0062;",
                 f"prmt.b32 {r['dd']}, {ins[2]}, {ins[3]}, 0x0062;",
                 f"prmt.b32 {r['h']}, {r['cc']}, {r['dd']}, 0x5410;"]
        if fold:
            # two groups down: 2-bit fields 2, 3 of each byte to 0, 1, sign-plane bits +2
            lines += [f"shr.b32 {r['xl']}, {r['xl']}, 4;", f"shr.b32 {r['xh']}, {r['xh']}, 4;",
                      f"shr.b32 {r['h']}, {r['h']}, 2;"]
        lines += [_shift(r["u"], r["xl"], -2 * k), _shift(r["v"], r["xh"], 4 - 2 * k),
                  _shift(r["hh"], r["h"], 2 - k),
                  f"and.b32 {r['u']}, {r['u']}, 0x03030303;",
                  f"and.b32 {r['v']}, {r['v']}, 0x30303030;",
                  f"and.b32 {r['hh']}, {r['hh']}, 0x44444444;",
                  f"or.b32 {r['t']}, {r['u']}, {r['v']};",
                  f"or.b32 {r['t']}, {r['t']}, {r['hh']};",
                  f"shr.b32 {r['sb']}, {r['t']}, 16;",
                  f"prmt.b32 {r['l4a']}, la, lb, {r['t']};",
                  f"prmt.b32 {r['h4a']}, ha, hb, {r['t']};",
                  f"prmt.b32 {r['l4b']}, la, lb, {r['sb']};",
                  f"prmt.b32 {r['h4b']}, ha, hb, {r['sb']};",
                  f"prmt.b32 {outs[0]}, {r['l4a']}, {r['h4a']}, 0x6240;",
                  f"prmt.b32 {outs[1]}, {r['l4b']}, {r['h4b']}, 0x6240;",
                  f"prmt.b32 {outs[2]}, {r['l4a']}, {r['h4a']}, 0x7351;",
                  f"prmt.b32 {outs[3]}, {r['l4b']}, {r['h4b']}, 0x7351;"]
        return lines, [r[n] for n in names]

    if folded:
        body, regs = half("", ("$8", "$9", "$10", "$11"), ("$0", "$1", "$4", "$5"), False)
        more, regs2 = half("2", ("$12", "$13", "$14", "$15"), ("$2", "$3", "$6", "$7"), True)
        body, regs = body + more, regs + regs2
    else:
        body, regs = half("", ("$4", "$5", "$6", "$7"), ("$0", "$1", "$2", "$3"), False)
    head = [".reg .b32 " + ", ".join(regs + ["la", "lb", "ha", "hb"]) + ";",
            f"mov.b32 la, 0x{lo_a:08X};", f"mov.b32 lb, 0x{lo_b:08X};",
            f"mov.b32 ha, 0x{hi_a:08X};", f"mov.b32 hb, 0x{hi_b:08X};"]
    return "{\n" + "\n".join(head + body) + "\n}"


@triton.jit
def fast_values3_word_pair(words, K: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr,
                           FOLD: tl.constexpr = False):
    """fp16 centroids of groups K and K + 4 (K < 4) of 3-bit codes from value_words; FOLD
    (words a (16, tokens) MMA operand holding its 8 group indices twice, K < 2): rows 8-15
    decode groups K + 2 and K + 6 instead (fold_group_dims)."""
    if FOLD:
        out = tl.inline_asm_elementwise(_asm_lut3_word_pair_folded(K, T0, T1),
                                        "=r,=r,=r,=r,=r,=r,=r,=r" + ",r" * 8, [words],
                                        dtype=(tl.float16, tl.float16), is_pure=True, pack=8)
    else:
        out = tl.inline_asm_elementwise(_asm_lut3_word_pair(K, T0, T1), "=r,=r,=r,=r,r,r,r,r",
                                        [words], dtype=(tl.float16, tl.float16), is_pure=True,
                                        pack=4)
    return out


@triton.jit
def fold_group_dims(m, A: tl.constexpr, D: tl.constexpr):
    """The coordinates of rows m (< 2 * (D // 8)) of folded value accumulator A (< 4):
    fast_values3_word_pair(FOLD=True) call K = A % 2, output A // 2 decodes group
    K + 4 (A // 2) on rows below D // 8 and two groups more on the rest."""
    grp = A % 2 + 4 * (A // 2) + 2 * (m >= D // 8).to(tl.int32)
    return 8 * (m % (D // 8)) + grp


@triton.jit
def value_words(w16, x8):
    """One int32 per (group index, token) from the plane tensors of load_fast (BITS 3): the
    2-bit-plane word in bits 0-15, the 1-bit-plane byte in bits 16-23.  Element-wise integer
    ops, so Triton moves the layout conversion above them to the loads."""
    return (w16.to(tl.int32) & 0xFFFF) | (x8.to(tl.int32) << 16)


@triton.jit
def byte_tables(c_ptr, BITS: tl.constexpr):
    """The fp16 centroids as 4 PRMT table words (low bytes of entries 0..3, 4..7, high bytes of
    0..3, 4..7), read from the centroid tensor at run time: exact for any codebook."""
    k = tl.arange(0, 8)
    c = tl.load(c_ptr + k, mask=k < 2 ** BITS, other=0.0).to(tl.float16)
    h = c.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    sh = (k % 4) * 8
    lo_a = tl.sum(tl.where(k < 4, (h & 0xFF) << sh, 0), 0)
    lo_b = tl.sum(tl.where(k >= 4, (h & 0xFF) << sh, 0), 0)
    hi_a = tl.sum(tl.where(k < 4, (h >> 8) << sh, 0), 0)
    hi_b = tl.sum(tl.where(k >= 4, (h >> 8) << sh, 0), 0)
    return lo_a, lo_b, hi_a, hi_b


@triton.constexpr_function
def _asm_lut1(r, t0):
    # in: 4 uint8 (1 reg), out: 4 fp16 (2 regs).  bit r of each byte is a 1-bit code.
    return f"""{{
.reg .b32 t, u, v, ta;
shr.b32 t, $2, {r};
and.b32 t, t, 0x01010101;
mad.lo.u32 u, t, 0x22, 0x10101010;
mov.b32 ta, 0x{t0:08X};
prmt.b32 $0, ta, ta, u;
shr.b32 v, u, 16;
prmt.b32 $1, ta, ta, v;
}}"""


@triton.constexpr_function
def _asm_sign(r):
    # in: 4 uint8, out: 4 fp16 +-1 (bit r set -> +1).  fp16 +1 = 0x3C00, -1 = 0xBC00.
    return f"""{{
.reg .b32 s, z;
shl.b32 s, $2, {7 - r};
and.b32 s, s, 0x80808080;
xor.b32 s, s, 0xBCBCBCBC;
mov.b32 z, 0;
prmt.b32 $0, s, z, 0x1404;
prmt.b32 $1, s, z, 0x3424;
}}"""


@triton.jit
def fast_sign(x8, R: tl.constexpr):
    """(N, DG) uint8 sign bytes -> fp16 +-1 of group R."""
    return tl.inline_asm_elementwise(_asm_sign(R), "=r,=r,r", [x8], dtype=tl.float16,
                                     is_pure=True, pack=4)


@triton.jit
def fast_values(w16, x8, R: tl.constexpr, BITS: tl.constexpr, T0: tl.constexpr,
                T1: tl.constexpr):
    """fp16 centroids of group R from the plane tensors of load_fast, BITS 1 or 2; T0, T1 are the
    baked table words (asm_tables)."""
    if BITS == 1:
        v = tl.inline_asm_elementwise(_asm_lut1(R, T0), "=r,=r,r", [x8], dtype=tl.float16,
                                      is_pure=True, pack=4)
    else:
        v = tl.inline_asm_elementwise(_asm_lut2(R, T0, T1), "=r,=r,r,r", [w16],
                                      dtype=tl.float16, is_pure=True, pack=4)
    return v


@triton.jit
def fast_values3(w16, x8, R: tl.constexpr, tabs):
    """fp16 centroids of group R of 3-bit codes; tabs = byte_tables(centroids).  Not unary, so it
    runs before the conversion to the MMA layout (the fp16 result goes through shared memory)."""
    z = tl.zeros(w16.shape, tl.int32)
    return tl.inline_asm_elementwise(
        _asm_lut3(R), "=r,=r" + ",r" * 19,
        [w16, x8, z + tabs[0], z + tabs[1], z + tabs[2], z + tabs[3]],
        dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def group_centroids(w16, x8, ptr, row2, m2, R: tl.constexpr, D: tl.constexpr,
                    BITS: tl.constexpr, FAST: tl.constexpr, tabs, T0: tl.constexpr,
                    T1: tl.constexpr, c_ptr):
    """fp16 centroids of coordinate group R of one code component, (tokens, DG) or (DG, tokens)
    as row2 / m2 broadcast: FAST, the asm decoders over load_fast's planes w16, x8 (3-bit codes
    from the byte tables `tabs`, 1- and 2-bit ones from the baked words T0, T1); otherwise the
    portable decoder, reading the codes at ptr + row2 byte by byte and the centroids at c_ptr
    (w16, x8 unused: None)."""
    if FAST:
        if BITS == 3:
            v = fast_values3(w16, x8, R, tabs)
        else:
            v = fast_values(w16, x8, R, BITS, T0, T1)
    else:
        v = lookup(slow_code(ptr, row2, m2, R, D, BITS), c_ptr, BITS).to(tl.float16)
    return v


@triton.jit
def load_fast(ptr, row2, m2, D: tl.constexpr, DG: tl.constexpr, BITS: tl.constexpr,
              FOLD: tl.constexpr = False):
    """Plane tensors of one code component: (w16 int16 words of the 2-bit plane, x8 bytes of the
    1-bit plane); the one a format lacks is a dummy copy.  row2 / m2 broadcast against each other
    (row2 = token byte offsets [:, None] or [None, :], m2 = group index the other way), so the
    tensors come out (tokens, DG) or (DG, tokens).  FOLD: group index m2 % (D // 8), every
    word twice (DG == 2 * (D // 8)), for fast_values3_word_pair's FOLD."""
    if BITS == 1:
        x8 = load_group_words(ptr + row2, m2, D, DG, FOLD)
        w16 = x8.to(tl.int16)
    else:
        w16 = load_group_words((ptr + row2).to(tl.pointer_type(tl.int16)), m2, D, DG, FOLD)
        if BITS == 3:
            x8 = load_group_words(ptr + row2 + D // 4, m2, D, DG, FOLD)
        else:
            x8 = w16.to(tl.uint8)
    return w16, x8


@triton.jit
def load_group_words(rows, m2, D: tl.constexpr, DG: tl.constexpr, FOLD: tl.constexpr = False):
    """rows[m2]: one word per coordinate group index m2 (< DG); masked only where DG pads D/8,
    because even an all-true mask stops Triton from vectorising the load.  FOLD: rows[m2 %
    (D // 8)] (DG == 2 * (D // 8)), each word twice."""
    if FOLD:
        tl.static_assert(DG == 2 * (D // 8), "a folded load fills DG with two copies of D/8")
        w = tl.load(rows + m2 % (D // 8))
    elif D // 8 == DG:
        w = tl.load(rows + m2)
    else:
        w = tl.load(rows + m2, mask=m2 < D // 8, other=0)
    return w


@triton.jit
def slow_code(ptr, row2, m2, R, D: tl.constexpr, BITS: tl.constexpr):
    """int32 codes of group R, read byte by byte (any BITS in 1..4); shapes as in load_fast.
    R is a constant group or a tensor of groups broadcasting with m2 (coordinate 8 m2 + R)."""
    real = m2 < D // 8
    base = ptr + row2
    if BITS == 4:
        b = tl.load(base + 4 * m2 + R // 2, mask=real, other=0)
        c = (b >> (4 * (R % 2))) & 15
    elif BITS == 1:
        b = tl.load(base + m2, mask=real, other=0)
        c = (b >> R) & 1
    else:
        b = tl.load(base + 2 * m2 + R // 4, mask=real, other=0)
        c = (b >> (2 * (R % 4))) & 3
        if BITS == 3:
            h = tl.load(base + D // 4 + m2, mask=real, other=0)
            c = c | (((h >> R) & 1) << 2)
    return c.to(tl.int32)


@triton.jit
def lookup(code, c_ptr, BITS: tl.constexpr):
    """fp32 centroid c[code] by a select chain over the 2**BITS table entries."""
    v = tl.zeros(code.shape, tl.float32) + tl.load(c_ptr)
    for k in tl.static_range(1, 2 ** BITS):
        v = tl.where(code == k, tl.load(c_ptr + k), v)
    return v


@triton.jit
def slow_sign(ptr, row2, m2, R, D: tl.constexpr):
    """fp32 +-1 of the QJL sign bits of group R (bit 1 = +1); shapes and R as in slow_code."""
    b = tl.load(ptr + row2 + m2, mask=m2 < D // 8, other=0)
    return tl.where(((b >> R) & 1) != 0, 1.0, -1.0)


@triton.jit
def table_matches(c_ptr, BITS: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr):
    """True when the fp16 centroids equal the baked table words (asm_tables); always true for 3
    bits without a baked table, whose decoder reads the centroids."""
    if BITS == 3:
        if T0 == 0 and T1 == 0:
            ok = True
        else:
            k = tl.arange(0, 8)
            c = tl.load(c_ptr + k).to(tl.float16)
            bits = c.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            want = tl.where(k == 0, T0 & 0xFFFF, tl.where(k == 1, (T0 >> 16) & 0xFFFF,
                            tl.where(k == 2, (T0 >> 32) & 0xFFFF, tl.where(
                                k == 3, (T0 >> 48) & 0xFFFF, tl.where(
                                    k == 4, T1 & 0xFFFF, tl.where(
                                        k == 5, (T1 >> 16) & 0xFFFF, tl.where(
                                            k == 6, (T1 >> 32) & 0xFFFF,
                                            (T1 >> 48) & 0xFFFF)))))))
            ok = tl.sum((bits != want).to(tl.int32), 0) == 0
    else:
        k = tl.arange(0, 4)
        c = tl.load(c_ptr + k, mask=k < 2 ** BITS, other=0.0).to(tl.float16)
        bits = c.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        want = tl.where(k == 0, T0 & 0xFFFF, tl.where(k == 1, T0 >> 16,
                        tl.where(k == 2, T1 & 0xFFFF, T1 >> 16)))
        bad = tl.where(k < 2 ** BITS, (bits != want).to(tl.int32), 0)
        ok = tl.sum(bad, 0) == 0
    return ok


@triton.constexpr_function
def _asm_prefetch_l2(nbytes):
    # lane 0 of the warp issues one bulk L2 prefetch when the predicate ($2) is set and the
    # address is 16-byte aligned (the instruction's requirement; nbytes is a multiple of 16)
    return f"""{{
.reg .pred p;
.reg .b32 l;
.reg .b64 a;
mov.u32 l, %laneid;
and.b64 a, $1, 15;
setp.eq.u64 p, a, 0;
setp.eq.and.u32 p, l, 0, p;
setp.ne.and.u32 p, $2, 0, p;
@p cp.async.bulk.prefetch.L2.global [$1], {nbytes};
mov.b32 $0, 0;
}}"""


@triton.jit
def prefetch_l2(ptr, pred, NBYTES: tl.constexpr):
    """A hint: bring NBYTES (a multiple of 16) at `ptr` (a scalar pointer) into L2 when `pred`
    holds.  GPU only (sm_90 PTX); nothing is read back, so it cannot change a result."""
    tl.inline_asm_elementwise(_asm_prefetch_l2(NBYTES), "=r,l,r", [ptr, pred.to(tl.int32)],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def tile_rows(bt_ptr, bt_row, start, page_stride, head_off, BS: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Byte offset of the tile's page+head region and each row's in-page index.

    Tiles start at multiples of BLOCK_N and BLOCK_N divides BS, so a tile lies inside one page:
    one block-table load and scalar address arithmetic per tile.
    """
    page = tl.load(bt_ptr + bt_row + start // BS)
    return page.to(tl.int64) * page_stride + head_off, (start % BS) + tl.arange(0, BLOCK_N)


@triton.jit
def load_tile_scalars(ptr, base, start, OFF: tl.constexpr, BS: tl.constexpr,
                      BLOCK_N: tl.constexpr, AL: tl.constexpr):
    """(BLOCK_N,) fp16 scalar component at slot offset OFF (a norm or gamma) of the tile's tokens
    start .. start+BLOCK_N-1, page region at byte `base`.  Addressed as one contiguous fp16 row
    with its byte alignment AL, so the load is vectorised and software-pipelined (per-element
    byte pointers cast to fp16 were 2-byte loads outside the pipeline: Nsight Compute showed
    their latency as long-scoreboard stalls every tile)."""
    row = tl.multiple_of(base + BS * OFF + (start % BS) * 2, AL)
    return tl.load((ptr + row).to(tl.pointer_type(tl.float16)) + tl.arange(0, BLOCK_N))


@triton.jit
def tile_rows_paged(bt_ptr, bt_row, start, hi, page_stride, head_off, BS: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """tile_rows for a tile of BLOCK_N // BS whole pages (BS divides BLOCK_N): each row's
    page+head byte offset (a (BLOCK_N,) int64 vector) and in-page index.

    The tile's page ids are scalar loads, spread over the rows by selects on the row index: a
    vector load of the block table gave a tensor that every user (key rows, transposed value
    rows, scalars) needed in its own layout, and Triton moved it between them through shared
    memory (perf/NOTES.md, session 20); the selects are recomputed in each layout like the
    row index.  Pages at or past `hi` are not read (their entries may lie past the sequence's
    row): their rows read page 0, and the caller masks their scores."""
    pos = start + tl.arange(0, BLOCK_N)
    sub = (pos - start) // BS
    first = bt_ptr + bt_row + start // BS
    page = tl.load(first)
    for j in tl.static_range(1, BLOCK_N // BS):
        pj = tl.load(first + j, mask=start + j * BS < hi, other=0)
        page = tl.where(sub == j, pj, page)
    return page.to(tl.int64) * page_stride + head_off, pos % BS


@triton.jit
def load_scalars(ptr, base, tin, start, OFF: tl.constexpr, BS: tl.constexpr,
                 BLOCK_N: tl.constexpr, AL: tl.constexpr):
    """(BLOCK_N,) fp16 scalar component at slot offset OFF of the tile's rows, from tile_rows
    (one page: load_tile_scalars' contiguous row) or tile_rows_paged (`base` a vector: one 2-byte
    load per row, since the tile's rows are not one contiguous run)."""
    if BS < BLOCK_N:
        row = tl.multiple_of(base + BS * OFF + tin * 2, 2)
        return tl.load((ptr + row).to(tl.pointer_type(tl.float16)))
    else:
        return load_tile_scalars(ptr, base, start, OFF, BS, BLOCK_N, AL)


@triton.jit
def tuple_set(t, R: tl.constexpr, v):
    """t with t[R] replaced by v (8-tuples; Triton tuples are immutable)."""
    if R == 0:
        return (v, t[1], t[2], t[3], t[4], t[5], t[6], t[7])
    elif R == 1:
        return (t[0], v, t[2], t[3], t[4], t[5], t[6], t[7])
    elif R == 2:
        return (t[0], t[1], v, t[3], t[4], t[5], t[6], t[7])
    elif R == 3:
        return (t[0], t[1], t[2], v, t[4], t[5], t[6], t[7])
    elif R == 4:
        return (t[0], t[1], t[2], t[3], v, t[5], t[6], t[7])
    elif R == 5:
        return (t[0], t[1], t[2], t[3], t[4], v, t[6], t[7])
    elif R == 6:
        return (t[0], t[1], t[2], t[3], t[4], t[5], v, t[7])
    else:
        return (t[0], t[1], t[2], t[3], t[4], t[5], t[6], v)
