"""The reference (torch.ops.turboquant.* on CPU) agrees with the NumPy float64 oracle.

Hypothesis draws formats from the capability declaration (every tested head dim, bits 1..4, QJL on
and off, every input dtype), shapes including 0, GQA groups, sink / recent sizes including 0, and
input structures (Gaussian, heavy-tailed, outlier channels, six decades of scale, zero rows,
one-hot, constant).  Tolerances are those of tests/tolerances.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracle as O
from helpers import BITS, DTYPES, HEAD_DIMS, KINDS, codec, np64, vectors
from tolerances import (assert_close_verbose, check_codes, fp32_tol, reconcile_keys,
                        reconcile_values)
from tq_ops import layout

tq = torch.ops.turboquant

dims = st.sampled_from(HEAD_DIMS)
bits = st.sampled_from(BITS)
dtypes = st.sampled_from(DTYPES)
kinds = st.sampled_from(KINDS)
seeds = st.integers(0, 2**31 - 1)
rot_seeds = st.integers(0, 3)


def _out_rtol(dtype: torch.dtype, d: int) -> float:
    """fp32 arithmetic, then one rounding to the output dtype."""
    return fp32_tol(d) + (torch.finfo(dtype).eps if dtype != torch.float32 else 0.0)


# -- layout ----------------------------------------------------------------------------------

@settings(max_examples=60)
@given(d=dims, b=bits, lead=st.lists(st.integers(0, 3), max_size=2), seed=seeds)
def test_pack_codes_matches_spec(d, b, lead, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**b, size=tuple(lead) + (d,))
    packed = layout.pack_codes(torch.from_numpy(codes), b)
    assert packed.dtype == torch.uint8
    np.testing.assert_array_equal(packed.numpy(), O.oracle_pack_codes(codes, b))
    np.testing.assert_array_equal(layout.unpack_codes(packed, d, b).numpy(), codes)
    np.testing.assert_array_equal(O.oracle_unpack_codes(packed.numpy(), d, b), codes)


@settings(max_examples=30)
@given(d=dims, lead=st.lists(st.integers(0, 3), max_size=2), seed=seeds)
def test_pack_signs_matches_spec(d, lead, seed):
    rng = np.random.default_rng(seed)
    positive = rng.random(tuple(lead) + (d,)) < 0.5
    packed = layout.pack_signs(torch.from_numpy(positive))
    np.testing.assert_array_equal(packed.numpy(), O.oracle_pack_codes(positive.astype(int), 1))
    np.testing.assert_array_equal(layout.unpack_signs(packed, d).numpy(),
                                  np.where(positive, 1.0, -1.0))


def test_bit_order_is_lsb_first_in_planes():
    """A hand-worked example of the spec, so a shared misreading of it cannot pass: D=16, b=3
    (a 2-bit plane then a 1-bit plane), code j = j % 8."""
    codes = np.arange(16) % 8
    low = codes & 3                       # 2-bit plane: 4 codes per byte, first code in bits 0-1
    high = codes >> 2                     # 1-bit plane: 8 codes per byte, first code in bit 0
    expected = [sum(int(low[4 * k + i]) << (2 * i) for i in range(4)) for k in range(4)]
    expected += [sum(int(high[8 * k + i]) << i for i in range(8)) for k in range(2)]
    assert expected == [0b11100100, 0b11100100, 0b11100100, 0b11100100, 0b11110000, 0b11110000]
    got = layout.pack_codes(torch.from_numpy(codes), 3).tolist()
    assert got == expected


# -- rotation and MSE quantizer ---------------------------------------------------------------

@settings(max_examples=30)
@given(d=dims, dtype=dtypes, n=st.integers(0, 9), kind=kinds, seed=seeds, rs=rot_seeds)
def test_rotate_unrotate_match_oracle(d, dtype, n, kind, seed, rs):
    c = codec(d, seed=rs)
    x = vectors(np.random.default_rng(seed), (n, d), kind, dtype)
    rot = np64(c.rotation)
    y = tq.rotate(x, c.rotation)
    assert y.dtype == torch.float32 and y.shape == x.shape
    scale = np.abs(np64(x)).max(initial=0) * np.sqrt(d)
    assert_close_verbose(y, O.oracle_rotate(np64(x), rot), fp32_tol(d) * scale, 0, "rotate")
    back = tq.unrotate(x, c.rotation)
    assert_close_verbose(back, O.oracle_unrotate(np64(x), rot), fp32_tol(d) * scale, 0, "unrotate")


@settings(max_examples=60)
@given(d=dims, b=bits, dtype=dtypes, lead=st.lists(st.integers(0, 6), min_size=1, max_size=2),
       kind=kinds, seed=seeds, rs=rot_seeds)
def test_mse_quantize_dequantize_match_oracle(d, b, dtype, lead, kind, seed, rs):
    c = codec(d, key_bits=b, seed=rs)
    cen = O.centroids_for(d, b)
    x = vectors(np.random.default_rng(seed), tuple(lead) + (d,), kind, dtype)
    codes, norms = tq.mse_quantize(x, c.rotation, c.key_centroids, b)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape[:-1] + (d * b // 8,)
    assert norms.dtype == torch.float32 and norms.shape == x.shape[:-1]
    ocodes, onorm, oy = O.oracle_mse_quantize(np64(x), np64(c.rotation), cen)
    ref_codes = O.oracle_unpack_codes(codes.numpy(), d, b)
    flips = check_codes(ref_codes, O.Encoded(codes=ocodes, y=oy, norm=onorm), cen, "mse codes")
    np.testing.assert_array_equal(codes.numpy(), O.oracle_pack_codes(np.where(flips, ref_codes,
                                                                               ocodes), b))
    assert_close_verbose(norms, onorm, 0, 4 * 1.2e-7 * np.sqrt(d), "norms")
    # Dequantize what the reference stored, in float64, from its (fp32) norms.
    xh = tq.mse_dequantize(codes, norms, c.rotation, c.key_centroids, b)
    expect = O.oracle_mse_dequantize(ref_codes, np64(norms), np64(c.rotation), cen)
    atol = fp32_tol(d) * np64(norms).max(initial=0)
    assert_close_verbose(xh, expect, atol, 0, "mse_dequantize")


@settings(max_examples=40)
@given(d=dims, dtype=dtypes, n=st.integers(0, 9), kind=kinds, seed=seeds, rs=rot_seeds)
def test_qjl_sketch_matches_oracle(d, dtype, n, kind, seed, rs):
    c = codec(d, seed=rs)
    r = vectors(np.random.default_rng(seed), (n, d), kind, dtype)
    signs, gamma = tq.qjl_sketch(r, c.qjl_projection)
    assert signs.shape == (n, d // 8) and gamma.shape == (n,)
    pos, ogamma, proj = O.oracle_qjl_sketch(np64(r), np64(c.qjl_projection))
    ref_pos = O.oracle_unpack_codes(signs.numpy(), d, 1).astype(bool)
    window = 1e-5 * ogamma[:, None] * np.sqrt(d)
    bad = (ref_pos != pos) & (np.abs(proj) > window)
    assert not bad.any(), f"sign bits differ away from ties: {np.argwhere(bad)[:3].tolist()}"
    # A zero residual projects to exactly 0, which is a + sign (bit 1), never a dropped term.
    assert ref_pos[ogamma == 0].all()
    assert_close_verbose(gamma, ogamma, 0, 4 * 1.2e-7 * np.sqrt(d), "gamma")


@settings(max_examples=60)
@given(d=dims, b=bits, qjl=st.booleans(), dtype=dtypes,
       lead=st.lists(st.integers(0, 5), min_size=1, max_size=2), kind=kinds, seed=seeds,
       rs=rot_seeds)
def test_encode_keys_bytes_match_oracle(d, b, qjl, dtype, lead, kind, seed, rs):
    c = codec(d, key_bits=b, qjl=qjl, seed=rs)
    k = vectors(np.random.default_rng(seed), tuple(lead) + (d,), kind, dtype)
    rec = tq.encode_keys(k, c.rotation, c.qjl_projection, c.key_centroids, b, qjl)
    assert rec.shape == k.shape[:-1] + (O.key_record_bytes(d, b, qjl),)
    reconcile_keys(rec, k, np64(c.rotation), np64(c.qjl_projection), O.centroids_for(d, b), b,
                   qjl)


@settings(max_examples=40)
@given(d=dims, b=bits, dtype=dtypes, lead=st.lists(st.integers(0, 5), min_size=1, max_size=2),
       kind=kinds, seed=seeds, rs=rot_seeds)
def test_encode_values_bytes_match_oracle(d, b, dtype, lead, kind, seed, rs):
    c = codec(d, value_bits=b, seed=rs)
    v = vectors(np.random.default_rng(seed), tuple(lead) + (d,), kind, dtype)
    rec = tq.encode_values(v, c.rotation, c.value_centroids, b)
    assert rec.shape == v.shape[:-1] + (O.value_record_bytes(d, b),)
    reconcile_values(rec, v, np64(c.rotation), O.centroids_for(d, b), b)


@settings(max_examples=50)
@given(d=dims, b=bits, qjl=st.booleans(), dtype=dtypes, batch=st.integers(0, 3),
       tq_=st.integers(0, 4), tk=st.integers(0, 6), kind=kinds, seed=seeds, rs=rot_seeds)
def test_key_scores_match_oracle(d, b, qjl, dtype, batch, tq_, tk, kind, seed, rs):
    c = codec(d, key_bits=b, qjl=qjl, seed=rs)
    rng = np.random.default_rng(seed)
    k = vectors(rng, (batch, tk, d), kind, dtype)
    q = vectors(rng, (batch, tq_, d), "gauss", dtype)
    rec = tq.encode_keys(k, c.rotation, c.qjl_projection, c.key_centroids, b, qjl)
    enc = reconcile_keys(rec, k, np64(c.rotation), np64(c.qjl_projection), O.centroids_for(d, b),
                         b, qjl)
    got = tq.key_scores(q, rec, c.rotation, c.qjl_projection, c.key_centroids, b, qjl)
    assert got.dtype == torch.float32 and got.shape == (batch, tq_, tk)
    want = O.oracle_key_scores(np64(q), enc.record, np64(c.rotation), np64(c.qjl_projection),
                               O.centroids_for(d, b), b, qjl)
    qn = np.linalg.norm(np64(q), axis=-1).max(initial=0)
    kn = O.fp16_from_bytes(O.split_record(enc.record, O.key_components(d, b, qjl))["k_norm"])
    atol = fp32_tol(d) * qn * kn.max(initial=0)
    assert_close_verbose(got, want, atol, fp32_tol(d), "key_scores")


# -- attention ---------------------------------------------------------------------------------

@st.composite
def attention_case(draw):
    d = draw(dims)
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from((1, 2, 4)))
    n_s, n_c, n_r = draw(st.integers(0, 3)), draw(st.integers(0, 12)), draw(st.integers(0, 5))
    total = n_s + n_c + n_r
    n_q = draw(st.integers(0, min(total, 3)))
    return dict(d=d, hkv=hkv, hq=hkv * group, n_s=n_s, n_c=n_c, n_r=n_r, n_q=n_q,
                kb=draw(bits), vb=draw(bits), qjl=draw(st.booleans()), dtype=draw(dtypes),
                causal=draw(st.booleans()), kind=draw(kinds), seed=draw(seeds),
                rs=draw(rot_seeds))


def _attention_tolerance(q, keys, values, scale, d, dtype):
    """A logit error of at most delta = fp32_tol * scale * |q| |k| moves the softmax weights by
    at most 2 delta in L1, hence the output by 2 delta max|v|; plus fp32_tol max|v| for the
    value accumulation."""
    qn = max(np.linalg.norm(np64(q), axis=-1).max(initial=0), 1e-30)
    kn = max([np.linalg.norm(k, axis=-1).max(initial=0) for k in keys] + [0])
    vmax = max([np.abs(v).max(initial=0) for v in values] + [0])
    return fp32_tol(d) * (1 + 2 * scale * qn * kn) * vmax, _out_rtol(dtype, d)


@settings(max_examples=60)
@given(case=attention_case())
def test_attention_matches_oracle(case):
    d, hkv, hq, kb, vb, qjl = (case[k] for k in ("d", "hkv", "hq", "kb", "vb", "qjl"))
    c = codec(d, key_bits=kb, qjl=qjl, value_bits=vb, seed=case["rs"])
    rng = np.random.default_rng(case["seed"])
    dtype = case["dtype"]
    mk = lambda n, kind: vectors(rng, (n, hkv, d), kind, dtype)  # noqa: E731
    sink_k, sink_v = mk(case["n_s"], "gauss"), mk(case["n_s"], "gauss")
    comp_k, comp_v = mk(case["n_c"], case["kind"]), mk(case["n_c"], "gauss")
    rec_k, rec_v = mk(case["n_r"], "gauss"), mk(case["n_r"], "gauss")
    q = vectors(rng, (case["n_q"], hq, d), "gauss", dtype)
    scale = 1 / np.sqrt(d)
    krec = tq.encode_keys(comp_k, c.rotation, c.qjl_projection, c.key_centroids, kb, qjl)
    vrec = tq.encode_values(comp_v, c.rotation, c.value_centroids, vb)
    kcen, vcen = O.centroids_for(d, kb), O.centroids_for(d, vb)
    kenc = reconcile_keys(krec, comp_k, np64(c.rotation), np64(c.qjl_projection), kcen, kb, qjl)
    venc = reconcile_values(vrec, comp_v, np64(c.rotation), vcen, vb)
    got = tq.attention(q, krec, vrec, sink_k, sink_v, rec_k, rec_v, c.rotation, c.qjl_projection,
                       c.key_centroids, c.value_centroids, kb, qjl, vb, scale, case["causal"])
    assert got.dtype == dtype and got.shape == q.shape
    want = O.oracle_attention(np64(q), kenc.record, venc.record, np64(sink_k), np64(sink_v),
                              np64(rec_k), np64(rec_v), np64(c.rotation), np64(c.qjl_projection),
                              kcen, vcen, kb, qjl, vb, scale, case["causal"])
    atol, rtol = _attention_tolerance(q, [np64(sink_k), np64(comp_k), np64(rec_k)],
                                      [np64(sink_v), np64(comp_v), np64(rec_v)], scale, d, dtype)
    assert_close_verbose(got, want, atol, rtol, f"attention {case}")


# -- paged cache ---------------------------------------------------------------------------

@st.composite
def paged_case(draw):
    d = draw(dims)
    hkv = draw(st.integers(1, 2))
    n_seq = draw(st.integers(1, 3))
    per_seq = lambda lo, hi: st.lists(st.integers(lo, hi), min_size=n_seq, max_size=n_seq)  # noqa
    return dict(d=d, hkv=hkv, hq=hkv * draw(st.sampled_from((1, 2, 4))),
                block_size=draw(st.sampled_from((1, 2, 3, 16))),
                lens=draw(per_seq(0, 9)), raw=draw(per_seq(0, 4)), chunk=draw(per_seq(0, 4)),
                pad=draw(st.integers(0, 3)), kv_start=draw(st.integers(0, 2)),
                kb=draw(bits), vb=draw(bits), qjl=draw(st.booleans()), dtype=draw(dtypes),
                kind=draw(kinds), seed=draw(seeds), rs=draw(rot_seeds))


class PagedSetup:
    """Sequences written into a paged cache through write_cache (shuffled physical blocks,
    shuffled write order, padding slots, random initial bytes), checked byte for byte against
    the oracle's page writer; plus a raw pool whose unused rows are garbage."""

    def __init__(self, case):
        self.case = case
        d, hkv, bs = case["d"], case["hkv"], case["block_size"]
        kb, vb, qjl, dtype = case["kb"], case["vb"], case["qjl"], case["dtype"]
        self.c = c = codec(d, key_bits=kb, qjl=qjl, value_bits=vb, seed=case["rs"])
        self.rng = rng = np.random.default_rng(case["seed"])
        self.lens = lens = case["lens"]
        self.n_seq = n_seq = len(lens)
        blocks_per_seq = [max(1, -(-n // bs)) for n in lens]
        num_blocks = sum(blocks_per_seq) + 1
        perm = rng.permutation(num_blocks)
        self.table = np.zeros((n_seq, max(blocks_per_seq)), dtype=np.int32)
        off = 0
        for b, nb in enumerate(blocks_per_seq):
            self.table[b, :nb] = perm[off:off + nb]
            off += nb
        self.keys = [vectors(rng, (n, hkv, d), case["kind"], dtype) for n in lens]
        self.vals = [vectors(rng, (n, hkv, d), "gauss", dtype) for n in lens]
        slots = [self.slot(b, p) for b in range(n_seq) for p in range(lens[b])]
        k_all = torch.cat(self.keys + [vectors(rng, (case["pad"], hkv, d), "gauss", dtype)])
        v_all = torch.cat(self.vals + [vectors(rng, (case["pad"], hkv, d), "gauss", dtype)])
        slots = np.array(slots + [-1] * case["pad"], dtype=np.int64)
        order = rng.permutation(len(slots))
        k_all, v_all, slots = k_all[order], v_all[order], slots[order]
        init = rng.integers(0, 256, size=(num_blocks, hkv, bs * O.slot_bytes(d, kb, qjl, vb)),
                            dtype=np.uint8)
        self.cache = torch.from_numpy(init.copy())
        ret = tq.write_cache(k_all, v_all, self.cache, torch.from_numpy(slots).to(torch.int32),
                             c.rotation, c.qjl_projection, c.key_centroids, c.value_centroids,
                             kb, qjl, vb)
        assert ret is None
        self.kcen, self.vcen = O.centroids_for(d, kb), O.centroids_for(d, vb)
        ref_k = tq.encode_keys(k_all, c.rotation, c.qjl_projection, c.key_centroids, kb, qjl)
        ref_v = tq.encode_values(v_all, c.rotation, c.value_centroids, vb)
        self.kenc = reconcile_keys(ref_k, k_all, np64(c.rotation), np64(c.qjl_projection),
                                   self.kcen, kb, qjl)
        self.venc = reconcile_values(ref_v, v_all, np64(c.rotation), self.vcen, vb)
        expect = O.oracle_write_cache(init.copy(), self.kenc.record, self.venc.record, slots, d,
                                      kb, qjl, vb)
        np.testing.assert_array_equal(self.cache.numpy(), expect, err_msg="paged cache bytes")
        self.row_of_slot = {int(s): i for i, s in enumerate(slots) if s >= 0}
        # Raw pool: sequence b owns a shuffled row, first raw[b] tokens valid, the rest garbage.
        r_max = max(case["raw"] + [1])
        pool = n_seq + 1
        self.raw_k = vectors(rng, (pool, r_max, hkv, d), "gauss", dtype)
        self.raw_v = vectors(rng, (pool, r_max, hkv, d), "gauss", dtype)
        self.raw_index = rng.permutation(pool)[:n_seq]
        for b in range(n_seq):
            self.raw_k[self.raw_index[b], case["raw"][b]:] = float("nan")
            self.raw_v[self.raw_index[b], case["raw"][b]:] = float("inf")

    def slot(self, b: int, p: int) -> int:
        bs = self.case["block_size"]
        return int(self.table[b, p // bs]) * bs + p % bs

    def compressed(self, b: int, upto: int):
        """Oracle key/value records of sequence b at page positions kv_start..upto-1, in order."""
        rows = np.array([self.row_of_slot[self.slot(b, p)]
                         for p in range(self.case["kv_start"], upto)], dtype=np.int64)
        return self.kenc.record[rows], self.venc.record[rows]

    def raw(self, b: int):
        n = self.case["raw"][b]
        return np64(self.raw_k[self.raw_index[b], :n]), np64(self.raw_v[self.raw_index[b], :n])

    def op_args(self):
        c, case = self.c, self.case
        return (torch.from_numpy(self.raw_index).to(torch.int32),
                torch.tensor(case["raw"], dtype=torch.int32), c.rotation, c.qjl_projection,
                c.key_centroids, c.value_centroids, case["kb"], case["qjl"], case["vb"])


@settings(max_examples=50)
@given(case=paged_case())
def test_paged_write_and_decode_match_contiguous_oracle(case):
    ps = PagedSetup(case)
    d, hkv, hq, dtype = case["d"], case["hkv"], case["hq"], case["dtype"]
    c, n_seq = ps.c, ps.n_seq
    q = vectors(ps.rng, (n_seq, hq, d), "gauss", dtype)
    scale = 1 / np.sqrt(d)
    raw_index, raw_lens, *fmt = ps.op_args()
    got = tq.paged_decode_attention(q, ps.cache, torch.from_numpy(ps.table),
                                    torch.tensor(ps.lens, dtype=torch.int32), ps.raw_k, ps.raw_v,
                                    raw_index, raw_lens, *fmt, scale, case["kv_start"])
    assert got.dtype == dtype and got.shape == q.shape
    empty = np.zeros((0, hkv, d))
    for b in range(n_seq):
        krec, vrec = ps.compressed(b, ps.lens[b])
        rk, rv = ps.raw(b)
        if not len(krec) and not len(rk):
            assert torch.equal(got[b], torch.zeros_like(got[b])), "no tokens: documented zeros"
            continue
        want = O.oracle_attention(np64(q[b:b + 1]), krec, vrec, rk, rv, empty, empty,
                                  np64(c.rotation), np64(c.qjl_projection), ps.kcen, ps.vcen,
                                  case["kb"], case["qjl"], case["vb"], scale, False)
        atol, rtol = _attention_tolerance(q[b:b + 1], [np64(ps.keys[b]), rk],
                                          [np64(ps.vals[b]), rv], scale, d, dtype)
        assert_close_verbose(got[b:b + 1], want, atol, rtol, f"paged decode seq {b} of {case}")


@settings(max_examples=40)
@given(case=paged_case())
def test_paged_prefill_matches_contiguous_oracle(case):
    """Each sequence's chunk attends to its compressed prefix (page positions kv_start..len-1),
    its raw pool tokens and causally to itself: the oracle's single-sequence attention with the
    raw tokens as exact leading keys and the chunk as the exact recent tokens."""
    ps = PagedSetup(case)
    d, hkv, hq, dtype = case["d"], case["hkv"], case["hq"], case["dtype"]
    c, n_seq, chunk = ps.c, ps.n_seq, case["chunk"]
    t = sum(chunk)
    q = vectors(ps.rng, (t, hq, d), "gauss", dtype)
    k = vectors(ps.rng, (t, hkv, d), "gauss", dtype)
    v = vectors(ps.rng, (t, hkv, d), "gauss", dtype)
    cu = np.concatenate([[0], np.cumsum(chunk)]).astype(np.int32)
    scale = 1 / np.sqrt(d)
    raw_index, raw_lens, *fmt = ps.op_args()
    got = tq.paged_prefill_attention(q, k, v, torch.from_numpy(cu), ps.cache,
                                     torch.from_numpy(ps.table),
                                     torch.tensor(ps.lens, dtype=torch.int32), ps.raw_k, ps.raw_v,
                                     raw_index, raw_lens, *fmt, scale, case["kv_start"])
    assert got.dtype == dtype and got.shape == q.shape
    for b in range(n_seq):
        sl = slice(int(cu[b]), int(cu[b + 1]))
        if sl.start == sl.stop:
            continue
        krec, vrec = ps.compressed(b, ps.lens[b])
        rk, rv = ps.raw(b)
        want = O.oracle_attention(np64(q[sl]), krec, vrec, rk, rv, np64(k[sl]), np64(v[sl]),
                                  np64(c.rotation), np64(c.qjl_projection), ps.kcen, ps.vcen,
                                  case["kb"], case["qjl"], case["vb"], scale, True)
        atol, rtol = _attention_tolerance(q[sl], [np64(ps.keys[b]), rk, np64(k[sl])],
                                          [np64(ps.vals[b]), rv, np64(v[sl])], scale, d, dtype)
        assert_close_verbose(got[sl], want, atol, rtol, f"paged prefill seq {b} of {case}")


@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_zero_key_and_value_encode_to_zero_norm_no_nan(d):
    c = codec(d)
    z = torch.zeros(2, d)
    rec = tq.encode_keys(z, c.rotation, c.qjl_projection, c.key_centroids, 2, True)
    enc = reconcile_keys(rec, z, np64(c.rotation), np64(c.qjl_projection), O.centroids_for(d, 2),
                         2, True)
    assert (enc.norm == 0).all()
    s = tq.key_scores(torch.randn(1, 3, d), rec[None], c.rotation, c.qjl_projection,
                      c.key_centroids, 2, True)
    assert torch.equal(s, torch.zeros_like(s))


def test_oracle_imports_nothing_from_tq_ops():
    import ast
    import pathlib
    tree = ast.parse(pathlib.Path(O.__file__).read_text())
    mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    mods += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in mods if m.split(".")[0] == "tq_ops"], mods


def test_comparison_helpers_can_fail():
    """The reconcile helpers accept only ties: a code flipped away from a midpoint, a flipped
    sign bit with a large projection, or a norm two fp16 steps off are all reported."""
    d, b = 128, 2
    c = codec(d, key_bits=b)
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(5))
    rec = tq.encode_keys(x, c.rotation, c.qjl_projection, c.key_centroids, b, True)
    args = (x, np64(c.rotation), np64(c.qjl_projection), O.centroids_for(d, b), b, True)
    reconcile_keys(rec, *args)  # the real records pass
    lay = O.split_record(rec.numpy(), O.key_components(d, b, True))
    enc = O.oracle_encode_keys(np64(x), *args[1:])
    j = int(np.argmax(O.distance_to_midpoint(enc.y[0], args[3])))  # far from any midpoint
    codes = enc.codes.copy()
    codes[0, j] = (codes[0, j] + 1) % 4
    bad = np.concatenate([O.oracle_pack_codes(codes, b), lay["k_signs"], lay["k_norm"],
                          lay["k_gamma"]], -1)
    with pytest.raises(AssertionError, match="differ away from a midpoint"):
        reconcile_keys(torch.from_numpy(bad), *args)
    k = int(np.argmax(np.abs(enc.proj[0])))
    signs = enc.positive.copy()
    signs[0, k] = ~signs[0, k]
    bad = np.concatenate([lay["k_codes"], O.oracle_pack_codes(signs.astype(int), 1),
                          lay["k_norm"], lay["k_gamma"]], -1)
    with pytest.raises(AssertionError, match="QJL sign differs"):
        reconcile_keys(torch.from_numpy(bad), *args)
    norm = np.ascontiguousarray(lay["k_norm"]).view("<u2").copy()
    norm[0] += 2
    bad = np.concatenate([lay["k_codes"], lay["k_signs"], norm.view(np.uint8),
                          lay["k_gamma"]], -1)
    with pytest.raises(AssertionError, match="norm: fp16 bytes differ"):
        reconcile_keys(torch.from_numpy(bad), *args)
