"""The decode split kernel's decoders in the MMA operand layout (tq_ops.triton.unpack): the
bit-plane key decoders ("bit planes") and the 3-bit value decoders.

Their inline PTX runs only on a GPU, so here a small interpreter executes the very asm text the
kernel embeds (the handful of instructions it uses) on random code words, and the kernel's
algebra (query-side scales, offsets) must give back q . c[code] with the built-in codebooks.
The only error the scheme admits is the fp16 rounding of the scaled query: with
q'_exact = (2 gamma / c) q, the identity sum q'_exact (v - a) - gamma sum q = gamma sum q s holds
exactly, so the error is sum (q' - q'_exact)(v - a), bounded here term by term.
"""
from __future__ import annotations

import numpy as np
import pytest

from tq_ops.triton import unpack as U

MASK32 = 0xFFFFFFFF
HEAD_DIMS = [64, 96, 128, 256]


def run_ptx(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    """Execute the mov/shl/shr/and/or/lop3/prmt subset of PTX on 32-bit registers."""
    regs = dict(inputs)

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok.startswith("0x"):
            return int(tok, 16)
        if tok.isdigit():
            return int(tok)
        return regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        d = args[0]
        if op in ("mov.b32", "mov.u32"):
            # %laneid: a special register, given by the caller like an operand
            regs[d] = val(args[1])
        elif op == "shl.b32":
            regs[d] = (val(args[1]) << val(args[2])) & MASK32
        elif op == "shr.b32":
            regs[d] = val(args[1]) >> val(args[2])
        elif op == "and.b32":
            regs[d] = val(args[1]) & val(args[2])
        elif op == "or.b32":
            regs[d] = val(args[1]) | val(args[2])
        elif op == "lop3.b32":
            a, b, c, lut = (val(x) for x in args[1:5])
            out = 0
            for i in range(32):
                idx = ((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1)
                out |= ((lut >> idx) & 1) << i
            regs[d] = out
        elif op == "prmt.b32":
            a, b, sel = val(args[1]), val(args[2]), val(args[3])
            src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
            out = 0
            for i in range(4):
                n = (sel >> 4 * i) & 0xF
                byte = src[n & 7]
                if n & 8:
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << 8 * i
            regs[d] = out
        else:
            raise AssertionError(f"instruction outside the interpreter's subset: {line}")
    return regs


def halves_to_f16(word: int) -> tuple[float, float]:
    pair = np.array([word & 0xFFFF, word >> 16], dtype=np.uint16).view(np.float16)
    return float(pair[0]), float(pair[1])


def codebook(head_dim: int) -> np.ndarray:
    t = U.fp16_table(head_dim, 2)
    return np.array(t, dtype=np.uint16).view(np.float16).astype(np.float64)


@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_builtin_codebooks_are_symmetric(head_dim):
    ok, t0, t1 = U.asm_tables(head_dim, 2)
    assert ok and U.planes_apply(t0, t1)


def test_asymmetric_table_keeps_the_table_decoders():
    ok, t0, t1 = U.asm_tables(128, 2)
    assert not U.planes_apply(t0 ^ 1, t1)   # c0 nudged by one ulp


@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("r", range(8), ids=lambda r: f"group{r}")
def test_key_planes_give_q_dot_centroids(head_dim, r):
    _, t0, t1 = U.asm_tables(head_dim, 2)
    c = codebook(head_dim)
    rng = np.random.default_rng(1000 * head_dim + r)
    words = rng.integers(0, 1 << 16, size=(64, 4))        # 64 packs of 4 int16 words
    q = rng.standard_normal((64, 4)) * rng.choice([1e-3, 1.0, 30.0])
    codes = (words >> (2 * r)) & 3
    want = float((q * c[codes]).sum())
    got = -U.key_plane_gamma_sum(t0, t1) * q.sum()
    bound = 0.0
    for hi in (1, 0):
        scale = U.key_plane_scale(t0, t1, r, hi)
        a = U.key_plane_offset(r, hi)
        asm = U._asm_key_plane(r, hi)
        qp = (np.float32(scale) * q.astype(np.float32)).astype(np.float16).astype(np.float64)
        for i in range(64):
            regs = run_ptx(asm, {"$2": int(words[i, 0] | words[i, 1] << 16),
                                 "$3": int(words[i, 2] | words[i, 3] << 16)})
            v = halves_to_f16(regs["$0"]) + halves_to_f16(regs["$1"])
            for e in range(4):
                got += qp[i, e] * v[e] - a * qp[i, e]
                bound += abs(qp[i, e] - scale * q[i, e]) * abs(v[e] - a)
    assert abs(got - want) <= bound + 1e-12 * np.abs(q).sum()


def sign_plane_dot(asm: str, words, u, scale: float, a: float, extra=None):
    """(u . s as the kernel rebuilds it, its rounding bound): the sign decoder `asm` run on each
    register of 4 sign bytes in `words` (plus `extra` inputs, e.g. %laneid), its plane values v
    against the fp16-rounded u' = scale u, minus the offsets a u' and sum u; the bound is the
    operands' fp16 rounding, term by term."""
    up = (np.float32(scale) * u.astype(np.float32)).astype(np.float16).astype(np.float64)
    got, bound = -u.sum(), 0.0
    for i in range(len(words)):
        regs = run_ptx(asm, {"$2": int(words[i]), **(extra or {})})
        v = halves_to_f16(regs["$0"]) + halves_to_f16(regs["$1"])
        for e in range(4):
            got += up[i, e] * v[e] - a * up[i, e]
            bound += abs(up[i, e] - scale * u[i, e]) * abs(v[e] - a)
    return got, bound


@pytest.mark.parametrize("r", range(8), ids=lambda r: f"group{r}")
def test_sign_plane_gives_u_dot_signs(r):
    rng = np.random.default_rng(77 + r)
    words = rng.integers(0, 1 << 32, size=64)               # 4 sign bytes per register
    u = rng.standard_normal((64, 4)) * rng.choice([1e-4, 1.0, 50.0])
    byte = (words[:, None] >> (8 * np.arange(4))[None, :]) & 0xFF
    signs = np.where((byte >> r) & 1, 1.0, -1.0)
    want = float((u * signs).sum())
    got, bound = sign_plane_dot(U._asm_sign_plane(r), words, u, U.sign_plane_scale(r),
                                U.sign_plane_offset(r))
    assert abs(got - want) <= bound + 1e-12 * np.abs(u).sum()


@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("k", range(4), ids=lambda k: f"groups{k}+{k + 4}")
def test_value_word_pair_decoder_gives_the_centroids(head_dim, k):
    """The pair decoder (groups k and k + 4 from one selector word) returns exactly the fp16
    centroids of each word's two codes, in the two results' element order."""
    ok, t0, t1 = U.asm_tables(head_dim, 3)
    assert ok and (t0 or t1)
    table = np.array(U.fp16_table(head_dim, 3), dtype=np.uint16)
    rng = np.random.default_rng(7 * head_dim + k)
    w16 = rng.integers(0, 1 << 16, size=(96, 4))
    x8 = rng.integers(0, 1 << 8, size=(96, 4))
    words = w16 | x8 << 16
    asm = U._asm_lut3_word_pair(k, t0, t1)
    for r, out in ((k, ("$0", "$1")), (k + 4, ("$2", "$3"))):
        codes = ((w16 >> (2 * r)) & 3) | (((x8 >> r) & 1) << 2)
        assert set(codes.ravel()) == set(range(8))
        for i in range(96):
            regs = run_ptx(asm, {f"${4 + e}": int(words[i, e]) for e in range(4)})
            got = [regs[out[0]] & 0xFFFF, regs[out[0]] >> 16, regs[out[1]] & 0xFFFF,
                   regs[out[1]] >> 16]
            assert got == [int(table[c]) for c in codes[i]], (r, i)


@pytest.mark.parametrize("r", range(4), ids=lambda r: f"groups{r}|{r + 4}")
@pytest.mark.parametrize("hi", [1, 0], ids=["high", "low"])
def test_folded_key_plane_gives_q_dot_centroids(r, hi):
    """The folded key-plane decoder of head_dim 64: elements 0-3 of its 8 (operand columns
    0-7) decode group r's plane bit, elements 4-7 (columns 8-15, the same words) group r + 4's,
    both at one position, so the query side's constants (per coordinate, by its own group)
    are the same for both and the plane product is exact up to the operands' fp16 rounding."""
    _, t0, t1 = U.asm_tables(64, 2)
    assert U.key_plane_position(r, hi) == U.key_plane_position(r + 4, hi)
    rng = np.random.default_rng(500 + 10 * r + hi)
    words = rng.integers(0, 1 << 16, size=(64, 8))
    groups = np.array([r] * 4 + [r + 4] * 4)
    bits = (words >> (2 * groups + hi)) & 1
    assert bits.min() == 0 and bits.max() == 1
    a, c = U._PLANE_AC[U.key_plane_position(r, hi)]
    asm = U._asm_key_plane_folded(r, hi)
    for i in range(64):
        regs = run_ptx(asm, {f"${4 + j}": int(words[i, 2 * j] | words[i, 2 * j + 1] << 16)
                             for j in range(4)})
        v = [h for reg in ("$0", "$1", "$2", "$3") for h in halves_to_f16(regs[reg])]
        assert v == [a + c * b for b in bits[i]], i


@pytest.mark.parametrize("r", range(4), ids=lambda r: f"groups{r}|{r + 4}")
@pytest.mark.parametrize("lane", [0, 1, 2, 3, 17, 30], ids=lambda n: f"lane{n}")
def test_folded_sign_plane_gives_u_dot_signs(r, lane):
    """The folded sign decoder of head_dim 64: a lane with bit 1 set holds operand columns
    8-15 (kWidth 4) and decodes group r + 4's signs, others group r's, both at group r's
    position, whose constants the query side then uses for every coordinate of groups r and
    r + 4 (sign_plane_group); u . s exact up to the operands' fp16 rounding."""
    rng = np.random.default_rng(900 + 10 * r + lane)
    words = rng.integers(0, 1 << 32, size=64)
    group = r + 4 if lane & 2 else r
    byte = (words[:, None] >> (8 * np.arange(4))[None, :]) & 0xFF
    signs = np.where((byte >> group) & 1, 1.0, -1.0)
    u = rng.standard_normal((64, 4)) * rng.choice([1e-4, 1.0, 50.0])
    want = float((u * signs).sum())
    coord_group = U.sign_plane_group(8 + group, 64)
    assert coord_group == r
    got, bound = sign_plane_dot(U._asm_sign_plane_folded(r), words, u,
                                U.sign_plane_scale(coord_group),
                                U.sign_plane_offset(coord_group), {"%laneid": lane})
    assert abs(got - want) <= bound + 1e-12 * np.abs(u).sum()


@pytest.mark.parametrize("k", range(2), ids=lambda k: f"groups{k}+{k + 4}|{k + 2}+{k + 6}")
def test_folded_value_word_pair_decoder_gives_the_centroids(k):
    """The folded pair decoder of head_dim 64 (unpack.fold_group_dims): of its 8 words, the
    first 4 (row g of the operand) decode groups k and k + 4 and the last 4 (row g + 8, the
    same words loaded again) groups k + 2 and k + 6, exactly, in the two results' order."""
    ok, t0, t1 = U.asm_tables(64, 3)
    assert ok and (t0 or t1)
    table = np.array(U.fp16_table(64, 3), dtype=np.uint16)
    rng = np.random.default_rng(11 + k)
    w16 = rng.integers(0, 1 << 16, size=(96, 8))
    x8 = rng.integers(0, 1 << 8, size=(96, 8))
    words = w16 | x8 << 16
    asm = U._asm_lut3_word_pair_folded(k, t0, t1)
    for first, regs_out in ((k, ("$0", "$1", "$2", "$3")), (k + 4, ("$4", "$5", "$6", "$7"))):
        groups = np.array([first] * 4 + [first + 2] * 4)
        codes = ((w16 >> (2 * groups)) & 3) | (((x8 >> groups) & 1) << 2)
        assert set(codes.ravel()) == set(range(8))
        for i in range(96):
            regs = run_ptx(asm, {f"${8 + e}": int(words[i, e]) for e in range(8)})
            got = [h for r in regs_out for h in (regs[r] & 0xFFFF, regs[r] >> 16)]
            assert got == [int(table[c]) for c in codes[i]], (first, i)


@pytest.mark.parametrize("r", range(8), ids=lambda r: f"group{r}")
def test_table_operand_decoder_gives_the_centroids(r):
    """The 3-bit decoder that takes its byte tables as operands (fast_values3: keys of 3-bit
    formats, values where value_words is off) shares the selector and lookup PTX of the
    other 3-bit decoders; every code of every byte position, against a table of distinct
    entries (a swapped pair of outputs or table halves would show)."""
    rng = np.random.default_rng(31 + r)
    table = rng.permutation(np.arange(0x3000, 0x3000 + 97 * 8, 97))        # 8 distinct fp16
    lo = [int(sum((int(table[4 * h + i]) & 0xFF) << 8 * i for i in range(4))) for h in (0, 1)]
    hi = [int(sum((int(table[4 * h + i]) >> 8) << 8 * i for i in range(4))) for h in (0, 1)]
    w16 = rng.integers(0, 1 << 16, size=(128, 4))
    x8 = rng.integers(0, 1 << 8, size=(128, 4))
    codes = ((w16 >> (2 * r)) & 3) | (((x8 >> r) & 1) << 2)
    assert set(codes.ravel()) == set(range(8))
    asm = U._asm_lut3(r)
    for i in range(128):
        regs = run_ptx(asm, {"$2": int(w16[i, 0] | w16[i, 1] << 16),
                             "$3": int(w16[i, 2] | w16[i, 3] << 16),
                             "$4": int(sum(int(x8[i, e]) << 8 * e for e in range(4))),
                             "$5": lo[0], "$9": lo[1], "$13": hi[0], "$17": hi[1]})
        got = [regs["$0"] & 0xFFFF, regs["$0"] >> 16, regs["$1"] & 0xFFFF, regs["$1"] >> 16]
        assert got == [int(table[c]) for c in codes[i]]


def test_interpreter_rejects_unknown_instructions():
    with pytest.raises(AssertionError):
        run_ptx("{\nadd.u32 x, $2, 1;\n}", {"$2": 1})


def test_planes_use_only_normal_fp16_values():
    """Every decoded value is 0 or a normal fp16 (the MMA's handling of subnormals is not
    relied on)."""
    for p, base in U._PLANE_BASE.items():
        for b in (0, 1):
            bits = base | (b << p)
            v = np.array([bits], dtype=np.uint16).view(np.float16)[0]
            assert v == 0 or abs(v) >= np.finfo(np.float16).tiny
            a, c = U._PLANE_AC[p]
            assert float(v) == a + c * b
