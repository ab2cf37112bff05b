"""The raw Triton kernels on CPU, under TRITON_INTERPRET=1, against the PyTorch reference.

wrap_triton refuses interpreted kernels (style.md A9), so each op's `launch_*` helper is called
with raw=True, which launches the bare @triton.jit kernels.  TRITON_INTERPRET must be set before
triton is imported and must not leak into the rest of the suite, so every check runs in ONE child
process (this file run as a script); the tests below read its JSON report.  The interpreter runs
the portable decoders (byte gathers + select chains): the inline-PTX decoders are GPU-only and
are checked by perf/gpu_check.py.

Tolerances:
* codes and packed bytes: bit-identical, except coordinates whose reference rotated value lies
  within TIE of a cell boundary (the interpreter's dots round differently from torch's matmul).
* attention outputs: the kernels feed tensor cores fp16 operands (q_rot, u, centroids, signs,
  softmax weights times value norms), i.e. a handful of roundings of relative size 2^-11 each;
  ATT_RTOL = 8 * 2^-11 of the output's scale.
* codec ops (tf32x3, ~fp32): RTOL_F32.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.interpret

TIE = 1e-5
ATT_RTOL = 8 * 2.0 ** -11
RTOL_F32 = 1e-5

# (key_bits, qjl, value_bits, head_dim, G, block_size): the seed default, MSE-only keys, 4-bit
# (byte gathers for 4-bit planes), 1-bit codes, a non-power-of-two head_dim, odd GQA groups,
# head_dim 256 (the prefill kernel's per-tile query loads), the seed format at head_dim 128
# in 32-token pages, and a GQA group of 8 (the prefill's blocks of fewer query tokens:
# tq_ops.triton.prefill.prefill_config).  Pages of 16 and 32 tokens give decode tiles of
# several whole pages (tq_ops.triton.decode.page_tile), 64 one tile per page.
FORMATS = [(2, True, 3, 64, 4, 16), (3, False, 3, 64, 3, 32), (4, False, 4, 96, 1, 16),
           (1, True, 2, 32, 2, 16), (2, True, 1, 128, 2, 64), (2, True, 3, 256, 2, 16),
           (2, True, 3, 128, 4, 32), (2, True, 3, 64, 8, 16)]

# the format whose bulk-write tile is checked (the seed format at head_dim 128, as on GPUs)
BULK_FORMAT = FORMATS[4]

# formats whose TQCodec matrices qualify for write_cache's exact16_matrices declaration
# (power-of-two head dims; it changes both bulk encodes)
EXACT16_FORMATS = [f for f in FORMATS if f[3] & (f[3] - 1) == 0]


def _fmt_id(f):
    kb, qjl, vb, d, g, bs = f
    return f"k{kb}{'q1' if qjl else ''}v{vb}-d{d}-g{g}-bs{bs}"


# -- child process -----------------------------------------------------------------------------

def _child() -> dict:
    import importlib

    from tq_ops import TQCodec, preset
    from tq_ops import reference as R
    from tq_ops.codec import exact16_matrices
    from tq_ops.triton.prefill import BLOCK_N as PREFILL_BLOCK_N
    from tq_ops.triton.unpack import group_width

    torch.manual_seed(0)
    torch.set_num_threads(1)
    out: dict = {}

    def mod(name):
        return importlib.import_module(f"tq_ops.ops.{name}")

    def code_mismatch(got_codes, ref_codes, y_ref, centroids):
        """Max distance to a boundary among mismatching codes (0 when all codes match)."""
        bad = got_codes != ref_codes
        if not bad.any():
            return 0.0
        mids = (centroids[1:] + centroids[:-1]) / 2
        dist = (y_ref.unsqueeze(-1) - mids).abs().amin(-1)
        return float(dist[bad].max())

    def norms_match(got, ref, rows):
        """fp16 norms equal, or the two fp16 neighbours of the exact norm of `rows` where that
        norm lies within fp32 summation error (D * 2^-24 relative) of their midpoint: the
        kernel and the reference sum the squares in different orders, so such a norm may round
        either way (seen in one key of the bulk-two-launches case: 12.296875 against the
        reference's 12.2890625)."""
        got16, ref16 = got.half(), ref.half()
        adjacent = torch.nextafter(ref16, got16) == got16
        exact = rows.double().norm(dim=-1)
        mid = (got16.double() + ref16.double()) / 2
        tie = adjacent & ((exact - mid).abs() <= exact * rows.shape[-1] * 2.0 ** -24)
        return bool(((got16 == ref16) | tie).all())

    def write_check(c, kb, qjl, vb, d, bs, t, hkv=2, exact16=False, key_dtype=torch.float16):
        """write_cache's kernel against the reference: t tokens into 6 pages of a poisoned cache,
        shuffled slots, one token dropped (slot -1) and one all-zero key.  exact16: with the
        op's exact16_matrices declaration."""
        lay = c.config.layout
        k = torch.randn(t, hkv, d, dtype=key_dtype)
        v = torch.randn(t, hkv, d, dtype=torch.bfloat16)
        k[4] = 0
        nb = 6
        slots = torch.randperm(nb * bs)[:t].to(torch.int32)
        slots[3] = -1
        c1 = torch.randint(0, 256, (nb, hkv, bs * lay.slot_bytes), dtype=torch.uint8)
        c2 = c1.clone()
        args = (slots, c.rotation, c.qjl_projection, c.key_centroids, c.value_centroids, kb, qjl,
                vb)
        mod("write_cache").launch_write_cache(k, v, c1, *args, raw=True, exact16=exact16)
        R.write_cache(k, v, c2, *args)
        keys1, vals1 = R.gather_pages(c1, torch.arange(nb).reshape(1, nb), d, kb, qjl, vb)
        keys2, vals2 = R.gather_pages(c2, torch.arange(nb).reshape(1, nb), d, kb, qjl, vb)
        order = torch.argsort(slots.long().clamp(min=0))
        valid = slots[order] >= 0
        pos = slots[order][valid].long()
        y_k = R.rotate(R._normalize(k[order][valid])[0], c.rotation)
        y_v = R.rotate(R._normalize(v[order][valid])[0], c.rotation)
        ck1 = R.parse_key_records(keys1[0, pos], d, kb, qjl)
        ck2 = R.parse_key_records(keys2[0, pos], d, kb, qjl)
        cv1 = R.parse_value_records(vals1[0, pos], d, vb)
        cv2 = R.parse_value_records(vals2[0, pos], d, vb)
        untouched = torch.ones(nb * bs, dtype=torch.bool)
        untouched[pos] = False
        return dict(
            key_tie=code_mismatch(ck1[0], ck2[0], y_k, c.key_centroids),
            value_tie=code_mismatch(cv1[0], cv2[0], y_v, c.value_centroids),
            norms_match=(norms_match(ck1[2], ck2[2], k[order][valid])
                         and norms_match(cv1[1], cv2[1], v[order][valid])),
            signs_equal=bool(not qjl or torch.equal(ck1[1], ck2[1])),
            gamma_equal=bool(not qjl or torch.equal(ck1[3], ck2[3])),
            other_slots_untouched=bool(torch.equal(keys1[0, untouched], keys2[0, untouched])))

    for f in FORMATS:
        kb, qjl, vb, d, g, bs = f
        fid = _fmt_id(f)
        c = TQCodec.build(preset("seed", head_dim=d).replace(key_mse_bits=kb, key_qjl_bits=int(qjl),
                                                             value_bits=vb))
        lay = c.config.layout
        hkv = 2
        # -- write_cache: bytes of the paged cache
        out[f"write_cache/{fid}"] = write_check(c, kb, qjl, vb, d, bs, t=29, hkv=hkv)
        if f in EXACT16_FORMATS:
            out[f"write_cache_exact16/{fid}"] = dict(
                write_check(c, kb, qjl, vb, d, bs, t=29, hkv=hkv, exact16=True),
                qualifies=exact16_matrices(c.rotation, c.qjl_projection))
        # -- encode_keys / encode_values / mse_quantize records
        x = torch.randn(3, 5, d)
        rk = mod("encode_keys").launch_encode_keys(x, c.rotation, c.qjl_projection,
                                                   c.key_centroids, kb, qjl, raw=True)
        rv = mod("encode_values").launch_encode_values(x, c.rotation, c.value_centroids, vb,
                                                       raw=True)
        qc, qn = mod("mse_quantize").launch_mse_quantize(x, c.rotation, c.value_centroids, vb,
                                                         raw=True)
        rc, rn = R.mse_quantize(x, c.rotation, c.value_centroids, vb)
        out[f"records/{fid}"] = dict(
            keys_equal=bool(torch.equal(rk, R.encode_keys(x, c.rotation, c.qjl_projection,
                                                          c.key_centroids, kb, qjl))),
            values_equal=bool(torch.equal(rv, R.encode_values(x, c.rotation, c.value_centroids,
                                                              vb))),
            codes_equal=bool(torch.equal(qc, rc)),
            norm_rel=float(((qn - rn).abs() / rn.abs().clamp(min=1e-30)).max()))
        # -- paged decode attention
        b, mb = 3, 5
        lens = [1, 37, 5 * bs - 3]
        nbk = 3 * mb + 1
        cache = torch.randint(0, 256, (nbk, hkv, bs * lay.slot_bytes), dtype=torch.uint8)
        bt = torch.randperm(nbk)[:b * mb].reshape(b, mb).to(torch.int32)
        for i, n in enumerate(lens):
            kk, vv = torch.randn(n, hkv, d), torch.randn(n, hkv, d)
            sl = bt[i].long()[torch.arange(n) // bs] * bs + torch.arange(n) % bs
            R.write_cache(kk, vv, cache, sl, c.rotation, c.qjl_projection, c.key_centroids,
                          c.value_centroids, kb, qjl, vb)
        q = torch.randn(b, hkv * g, d)
        pk, pv = torch.randn(4, 6, hkv, d), torch.randn(4, 6, hkv, d)
        dargs = (q, cache, bt, torch.tensor(lens, dtype=torch.int32), pk, pv,
                 torch.tensor([1, 3, 0], dtype=torch.int32), torch.tensor([2, 0, 6], dtype=torch.int32),
                 c.rotation, c.qjl_projection, c.key_centroids, c.value_centroids, kb, qjl, vb,
                 d ** -0.5, 3)
        got = mod("paged_decode_attention").launch(*dargs, raw=True)
        ref = R.paged_decode_attention(*dargs)
        out[f"decode/{fid}"] = dict(err=float((got - ref).abs().max()),
                                    scale=float(ref.abs().max()),
                                    merge_tiles=merge_mode(b, hkv, g, d, kb, bt.shape[1] * bs, bs),
                                    rows=b * hkv * g, group=g)
        # the fallback merge (the op's path on CUDA when the caller does not declare the
        # built-in codebooks), for formats with baked tables: with the true tables it merges
        # the split partials; with a wrong one it attends the compressed tokens itself.  With
        # `poison` the split partials of compressed tokens are NaN before the merge, so each
        # case shows which of the two it did
        tabs = baked_tables(f)
        if tabs:
            k0, k1, v0, v1 = tabs
            for name, tables, poison in (
                    ("match", tabs, False),
                    ("match-poisoned", tabs, True),
                    ("key-mismatch-poisoned", (k0 ^ 1, k1, v0, v1), True),
                    ("value-mismatch-poisoned", (k0, k1, v0 ^ 1, v1), True)):
                got = decode_with_fallback(dargs, tables, poison)
                out[f"decode-fallback/{fid}/{name}"] = dict(
                    err=float((got - ref).abs().max()), scale=float(ref.abs().max()),
                    nan_rows=int(got.isnan().any(-1).any(-1).sum()), rows=b)
        # -- paged prefill attention
        chunk, pref, rawl = [5, 1, 19], [lens[0], 0, lens[2]], [3, 0, 2]
        tt = sum(chunk)
        pq = torch.randn(tt, hkv * g, d, dtype=torch.float16)
        pkey = torch.randn(tt, hkv, d, dtype=torch.float16)
        pval = torch.randn(tt, hkv, d, dtype=torch.float16)
        cu = torch.tensor([0, 5, 6, 25], dtype=torch.int32)
        pargs = (pq, pkey, pval, cu, cache, bt, torch.tensor(pref, dtype=torch.int32),
                 pk.half(), pv.half(), torch.tensor([2, 0, 1], dtype=torch.int32),
                 torch.tensor(rawl, dtype=torch.int32), c.rotation, c.qjl_projection,
                 c.key_centroids, c.value_centroids, kb, qjl, vb, d ** -0.5, 2)
        got = mod("paged_prefill_attention").launch(*pargs, raw=True)
        ref = R.paged_prefill_attention(*pargs)
        out[f"prefill/{fid}"] = dict(err=float((got.float() - ref.float()).abs().max()),
                                     scale=float(ref.float().abs().max()))
        # -- the decoded prefix: paged_dequantize, then the prefill kernel's decoded variant.
        # Sequences 1 and 2 share request 2's pages and rows (as a chunk's flush groups do),
        # with different prefix lengths; sequence 0 has its own.  Decoded rows: none, exactly
        # one whole key tile (no partial tile), and whole tiles and a partial one.
        kv0 = 2
        sbt = bt[[0, 2, 2]].contiguous()
        spref = torch.tensor([lens[0], kv0 + PREFILL_BLOCK_N, lens[2]], dtype=torch.int32)
        req_bt = bt[[0, 2]].contiguous()
        req_lens = torch.tensor([lens[0], lens[2]], dtype=torch.int32)
        n0 = max(0, lens[0] - kv0)
        req_off = torch.tensor([0, n0], dtype=torch.int32)
        ntok = n0 + max(0, lens[2] - kv0)
        dq = (cache, req_bt, req_lens, req_off, ntok, c.rotation, c.qjl_projection,
              c.key_centroids, c.value_centroids, kb, qjl, vb, kv0)
        dk, dv = mod("paged_dequantize").launch(*dq, torch.float32, raw=True)
        rk_, rv_ = R.paged_dequantize(*dq, torch.float32)
        out[f"dequantize/{fid}"] = dict(
            key=float((dk - rk_).abs().max() / rk_.abs().max()),
            value=float((dv - rv_).abs().max() / rv_.abs().max()))
        hk, hv = R.paged_dequantize(*dq, torch.float16)
        dstart = torch.tensor([0, n0, n0], dtype=torch.int32)
        sargs = (pq, pkey, pval, cu, cache, sbt, spref, pk.half(), pv.half(),
                 torch.tensor([2, 0, 1], dtype=torch.int32), torch.tensor(rawl, dtype=torch.int32),
                 c.rotation, c.qjl_projection, c.key_centroids, c.value_centroids, kb, qjl, vb,
                 d ** -0.5, kv0)
        got = mod("paged_prefill_attention").launch(*sargs, hk, hv, dstart, raw=True)
        same = R.paged_prefill_attention(*sargs, hk, hv, dstart)
        ref = R.paged_prefill_attention(*sargs)
        out[f"prefill-decoded/{fid}"] = dict(
            err=float((got.float() - same.float()).abs().max()),
            err_vs_compressed=float((got.float() - ref.float()).abs().max()),
            scale=float(ref.float().abs().max()))
        # -- slabs: compressed positions from `cut` on through the kernel's partial variant
        # (paged_prefill_prefix), then the prefill kernel over the rest with that prior; from
        # the pages and from the decoded rows (entered at the slab's first position)
        pp = mod("paged_prefill_attention")
        cut = kv0 + 40
        hi_lens, lo_lens = spref.clamp(min=cut), spref.clamp(max=cut)
        slab = (pq, pq, pq, cu, cache, sbt, hi_lens, pq, pq, hi_lens, hi_lens, c.rotation,
                c.qjl_projection, c.key_centroids, c.value_centroids, kb, qjl, vb, d ** -0.5,
                cut)
        lo_args = sargs[:6] + (lo_lens,) + sargs[7:]
        po, pl = pp.launch(*slab, partial=True, raw=True)
        got_pages = pp.launch(*lo_args, prior_out=po, prior_lse=pl, raw=True)
        po, pl = pp.launch(*slab, hk, hv, dstart + (cut - kv0), partial=True, raw=True)
        got_dec = pp.launch(*lo_args, hk, hv, dstart, po, pl, raw=True)
        out[f"prefill-slabs/{fid}"] = dict(
            pages_err=float((got_pages.float() - ref.float()).abs().max()),
            decoded_err=float((got_dec.float() - same.float()).abs().max()),
            scale=float(ref.float().abs().max()))
        # -- tq_vllm's FlashAttention route: the whole decoded prefix as an fp16 prior, the
        # kernel over the raw pool and the chunk only.  Sequence 1 has no compressed position
        # here: its prior is lse -inf with NaN values, which the kernel must ignore
        fpref = spref.clone()
        fpref[1] = kv0
        po, pl = R.paged_prefill_prefix(pq, cu, cache, sbt, fpref, c.rotation, c.qjl_projection,
                                        c.key_centroids, c.value_centroids, kb, qjl, vb,
                                        d ** -0.5, kv0, hk, hv, dstart)
        po = po.half()
        po[5] = float("nan")
        fargs = sargs[:6] + (fpref.clamp(max=kv0),) + sargs[7:]
        got = pp.launch(*fargs, hk, hv, dstart, po, pl, raw=True)
        want = R.paged_prefill_attention(*(sargs[:6] + (fpref,) + sargs[7:]), hk, hv, dstart)
        out[f"prefill-flash/{fid}"] = dict(
            err=float((got.float() - want.float()).abs().max()),
            scale=float(want.float().abs().max()), lse_row1=float(pl[5].max()))
        # -- codec ops
        ro = mod("rotate")
        e_rot = float((ro.launch_rotate(x, c.rotation, False, raw=True)
                       - R.rotate(x, c.rotation)).abs().max())
        e_unrot = float((ro.launch_rotate(x, c.rotation, True, raw=True)
                         - R.unrotate(x, c.rotation)).abs().max())
        s1, g1 = mod("qjl_sketch").launch_qjl_sketch(x, c.qjl_projection, raw=True)
        s2, g2 = R.qjl_sketch(x, c.qjl_projection)
        deq = mod("mse_dequantize").launch_mse_dequantize(rc, rn, c.rotation, c.value_centroids,
                                                          vb, raw=True)
        deq_ref = R.mse_dequantize(rc, rn, c.rotation, c.value_centroids, vb)
        kq = torch.randn(2, 5, d)
        krec = R.encode_keys(torch.randn(2, 33, d), c.rotation, c.qjl_projection,
                             c.key_centroids, kb, qjl)
        ks = mod("key_scores").launch_key_scores(kq, krec, c.rotation, c.qjl_projection,
                                                 c.key_centroids, kb, qjl, raw=True)
        ks_ref = R.key_scores(kq, krec, c.rotation, c.qjl_projection, c.key_centroids, kb, qjl)
        out[f"codec/{fid}"] = dict(
            rotate=e_rot / float(x.abs().max()), unrotate=e_unrot / float(x.abs().max()),
            signs_equal=bool(torch.equal(s1, s2)),
            gamma=float(((g1 - g2).abs() / g2).max()),
            dequantize=float((deq - deq_ref).abs().max() / deq_ref.abs().max()),
            key_scores=float((ks - ks_ref).abs().max() / ks_ref.abs().max()))
    # the bulk-write tile (tq_ops.triton.encode.ENCODE_CONFIGS on GPUs: 128 rows): a write of more
    # than LATENCY_ROWS rows, with the interpreter's ('cpu') entries pointed at that tile
    from unittest import mock

    from tq_ops.triton import encode as E

    kb, qjl, vb, d, g, bs = BULK_FORMAT
    c = TQCodec.build(preset("seed", head_dim=d).replace(key_mse_bits=kb, key_qjl_bits=int(qjl),
                                                         value_bits=vb))
    tile = E.EncodeConfig(128, 8, 1)
    t = E.LATENCY_ROWS // 2 + 6  # x 2 heads: more rows than LATENCY_ROWS, two 128-row tiles
    t_rr = 100  # x 2 heads: more rows than 3 "SMs" take as a small bulk write (pair_configs)
    # keys and values at one config: one joint launch (encode_pair_kernel's JOINT), 4 tiles
    # dealt over 3 programs (the value tiles start where the key tiles' round robin stopped)
    with mock.patch.dict(E.ENCODE_CONFIGS, {("cpu", d, kb, False): tile,
                                            ("cpu", d, vb, False): tile}), \
            mock.patch.object(mod("write_cache"), "sm_count", lambda device: 3):
        assert E.pair_configs("cpu", d, kb, vb, 2 * t_rr, 3) == (tile, tile)
        out["write_cache/bulk-tile"] = write_check(c, kb, qjl, vb, d, bs, t=t_rr)
    # a small bulk write (at most one DEFAULT_ENCODE tile per "SM", 8 of them): DEFAULT_ENCODE
    # for keys and values whatever the table says, one tile per program (ONE_TILE): programs
    # 0-2 the key tiles, 3-5 the value tiles
    with mock.patch.dict(E.ENCODE_CONFIGS, {("cpu", d, kb, False): tile}), \
            mock.patch.object(mod("write_cache"), "sm_count", lambda device: 8):
        assert E.pair_configs("cpu", d, kb, vb, 2 * t, 8) == (E.DEFAULT_ENCODE,) * 2
        out["write_cache/bulk-one-tile"] = write_check(c, kb, qjl, vb, d, bs, t=t)
    # keys and values at different configs: two encode_kernel launches
    assert kb != vb
    with mock.patch.dict(E.ENCODE_CONFIGS, {("cpu", d, kb, False): tile}), \
            mock.patch.object(mod("write_cache"), "sm_count", lambda device: 1):
        kc, vc = E.pair_configs("cpu", d, kb, vb, 2 * t, 1)
        assert kc == tile and vc != tile
        out["write_cache/bulk-two-launches"] = write_check(c, kb, qjl, vb, d, bs, t=t)
    # the bulk launches with EXACT16: several 64-row tiles per persistent program (one
    # program: "one SM"); the declaration's threshold lowered to these interpreter-sized writes
    exact_tile = E.EncodeConfig(64, 4, 1)
    exact_rows = mock.patch.object(mod("write_cache"), "EXACT16_MIN_ROWS", E.LATENCY_ROWS + 1)
    with mock.patch.dict(E.ENCODE_CONFIGS, {("cpu", d, kb, True): exact_tile,
                                            ("cpu", d, vb, True): exact_tile}), \
            mock.patch.object(mod("write_cache"), "sm_count", lambda device: 1), exact_rows:
        assert E.encode_config("cpu", d, vb, 2 * t, exact16=True) == exact_tile
        assert 2 * t > 2 * exact_tile.rows
        out["write_cache_exact16/bulk-tile"] = write_check(c, kb, qjl, vb, d, bs, t=t,
                                                           exact16=True)
        # fp32 keys: EXACT16 with the input's low part as one more MMA operand
        out["write_cache_exact16/bulk-fp32"] = write_check(c, kb, qjl, vb, d, bs, t=t,
                                                           exact16=True, key_dtype=torch.float32)
        # MSE-only 3-bit keys and 3-bit values (the bulk format's values have 1 bit)
        kb3, qjl3, vb3, d3, _, bs3 = FORMATS[1]
        c3 = TQCodec.build(preset("seed", head_dim=d3).replace(
            key_mse_bits=kb3, key_qjl_bits=int(qjl3), value_bits=vb3))
        out["write_cache_exact16/bulk-mse-only"] = write_check(c3, kb3, qjl3, vb3, d3, bs3, t=t,
                                                               exact16=True)
    # codebooks that are not antisymmetric take the kernels' counting quantizer (built-in ones,
    # every case above, the antisymmetric one): shifted by a fraction of a cell, still ascending
    # (the codebook check asks for that), bulk and decode-sized writes
    shifted = dataclasses.replace(c, key_centroids=c.key_centroids + 0.3 * (
        c.key_centroids[1] - c.key_centroids[0]), value_centroids=c.value_centroids + 0.3 * (
        c.value_centroids[1] - c.value_centroids[0]))
    from tq_ops import codebooks

    def antisymmetric(cb):
        return bool(torch.equal(cb, -cb.flip(0)))
    out["write_cache/antisymmetric"] = dict(
        builtin=all(antisymmetric(codebooks.centroids(f[3], b)) for f in FORMATS
                    for b in (f[0], f[2])),
        shifted=antisymmetric(shifted.key_centroids) or antisymmetric(shifted.value_centroids))
    for t_, name in ((t, "bulk"), (5, "small")):
        out[f"write_cache/asymmetric-{name}"] = write_check(shifted, kb, qjl, vb, d, bs, t=t_)
    # a false declaration: a projection off the fp16 grid poisons every key norm a bulk write
    # of at least EXACT16_MIN_ROWS rows stores (values untouched by it: they do not use S');
    # a smaller write does not use the declaration: "below" is the real threshold, "bulk" the
    # lowered one
    lay = c.config.layout
    false_decl = {}
    for t_, lowered in ((5, True), (t, True), (t, False)):
        kx = torch.randn(t_, 2, d, dtype=torch.float16)
        nb = math.ceil(t_ / bs) + 1
        slots = torch.randperm(nb * bs)[:t_].to(torch.int32)
        cache = torch.randint(0, 256, (nb, 2, bs * lay.slot_bytes), dtype=torch.uint8)
        undeclared = cache.clone()
        min_rows = E.LATENCY_ROWS + 1 if lowered else E.EXACT16_MIN_ROWS
        with mock.patch.object(mod("write_cache"), "EXACT16_MIN_ROWS", min_rows):
            for dst, declared in ((cache, True), (undeclared, False)):
                mod("write_cache").launch_write_cache(
                    kx, kx, dst, slots, c.rotation, c.qjl_projection * (1 + 2 ** -12),
                    c.key_centroids, c.value_centroids, kb, qjl, vb, raw=True, exact16=declared)
        keys_, vals_ = R.gather_pages(cache, torch.arange(nb).reshape(1, nb), d, kb, qjl, vb)
        false_decl[f"{t_}-{'lowered' if lowered else 'real'}"] = dict(
            bulk=2 * t_ >= min_rows,
            key_norms_nan=bool(R.parse_key_records(keys_[0, slots.long()], d, kb, qjl)[2]
                               .isnan().all()),
            value_norms_finite=bool(R.parse_value_records(vals_[0, slots.long()], d, vb)[1]
                                    .isfinite().all()),
            same_as_undeclared=bool(torch.equal(cache, undeclared)))
    out["write_cache_exact16/false-declaration"] = false_decl
    # decode with raw-pool runs longer than the raw-pool program's tile (several online-softmax
    # steps over the exact tokens: vLLM's flush buffer holds up to S + F of them)
    kb, qjl, vb, d, g, bs = FORMATS[0]
    c = TQCodec.build(preset("seed", head_dim=d).replace(key_mse_bits=kb, key_qjl_bits=int(qjl),
                                                         value_bits=vb))
    hkv, lens, mb = 2, [40, 3, 77], 8
    cache = torch.randint(0, 256, (3 * mb, hkv, bs * c.config.layout.slot_bytes),
                          dtype=torch.uint8)
    bt = torch.randperm(3 * mb)[:3 * mb].reshape(3, mb).to(torch.int32)
    for i, n in enumerate(lens):
        kk, vv = torch.randn(n, hkv, d), torch.randn(n, hkv, d)
        sl = bt[i].long()[torch.arange(n) // bs] * bs + torch.arange(n) % bs
        R.write_cache(kk, vv, cache, sl, c.rotation, c.qjl_projection, c.key_centroids,
                      c.value_centroids, kb, qjl, vb)
    pool = 150
    pk, pv = torch.randn(4, pool, hkv, d), torch.randn(4, pool, hkv, d)
    dargs = (torch.randn(3, hkv * g, d), cache, bt, torch.tensor(lens, dtype=torch.int32), pk, pv,
             torch.tensor([2, 0, 3], dtype=torch.int32),
             torch.tensor([pool, 0, 129], dtype=torch.int32), c.rotation, c.qjl_projection,
             c.key_centroids, c.value_centroids, kb, qjl, vb, d ** -0.5, 0)
    got = mod("paged_decode_attention").launch(*dargs, raw=True)
    ref = R.paged_decode_attention(*dargs)
    out["decode/long-raw"] = dict(err=float((got - ref).abs().max()),
                                  scale=float(ref.abs().max()))
    # the same with fp16 query and raw pool, as a model in half precision passes them: the raw
    # partial's MMAs then take the 16-bit operands as they are and split the fp32 softmax weights
    # into hi + lo halves (tq_ops.triton.decode.exact_dot); the fp32 run above takes tf32x3
    hargs = (dargs[0].half(),) + dargs[1:4] + (pk.half(), pv.half()) + dargs[6:]
    got = mod("paged_decode_attention").launch(*hargs, raw=True)
    ref = R.paged_decode_attention(*hargs)
    out["decode/long-raw-fp16"] = dict(err=float((got.float() - ref.float()).abs().max()),
                                       scale=float(ref.float().abs().max()))
    # decode with more splits than the merge's widest step takes (merge_step: two steps of
    # MERGE_STEPS[-1], Pi loaded after the loop): the merge's online max rescales what earlier
    # steps summed; every split holds tokens
    dec = mod("paged_decode_attention")
    n_splits = dec.MERGE_STEPS[-1] + 6
    assert dec.merge_step(n_splits) > dec.MERGE_PI_FIRST_MAX_STEP
    # one merge program per row (paged_decode_attention.merge_tiles)
    assert not dec.merge_tiles(n_splits, 8 * group_width(d))
    n = n_splits * math.gcd(bs, dec.decode_config("cpu", d, kb).block_n)
    mb = n // bs + 1
    cache = torch.randint(0, 256, (mb + 1, hkv, bs * c.config.layout.slot_bytes),
                          dtype=torch.uint8)
    bt = (torch.randperm(mb) + 1).reshape(1, mb).to(torch.int32)
    kk, vv = torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    sl = bt[0].long()[torch.arange(n) // bs] * bs + torch.arange(n) % bs
    R.write_cache(kk, vv, cache, sl, c.rotation, c.qjl_projection, c.key_centroids,
                  c.value_centroids, kb, qjl, vb)
    dargs = (torch.randn(1, hkv * g, d) * 3, cache, bt, torch.tensor([n], dtype=torch.int32),
             pk, pv, torch.tensor([1], dtype=torch.int32), torch.tensor([5], dtype=torch.int32),
             c.rotation, c.qjl_projection, c.key_centroids, c.value_centroids, kb, qjl, vb,
             d ** -0.5, 0)
    got = dec.launch(*dargs, raw=True, splits=n_splits)
    ref = R.paged_decode_attention(*dargs)
    out["decode/many-splits"] = dict(err=float((got - ref).abs().max()),
                                     scale=float(ref.abs().max()))
    # the query prep's plane operands (tq_ops.triton.unpack, "bit planes"), head dims 64 and 256
    # (whole matrices, and JB-column blocks with a read-back)
    # and one program per row (RB = 1, the small-batch path), head dims 64 and 128
    for d in (64, 256):
        out[f"prep-planes/d{d}"] = prep_planes_check(d)
    for d in (64, 128):
        # one-row programs: two per row at d64 (the key and sign halves apart), one at d128
        out[f"prep-planes/d{d}-rowwise"] = prep_planes_check(d, rb=1, two_parts=d == 64)
    # the int8 key operands (head_dim 128): 8-row programs and one program per row, a GQA group
    # of 4 and one of 3 (padded to 4 columns)
    for g_, rb_ in ((4, None), (3, 1)):
        out[f"prep-int8/g{g_}-rb{rb_ or 'default'}"] = prep_int8_check(g_, rb=rb_)
    # write_raw: strided K/V (slices of a fused qkv row, as vLLM passes them) into a poisoned
    # pool, a padding token (negative paged slot) skipped.  bf16 into bf16 (vLLM's case: a copy)
    # and fp32 into fp16 (a rounding cast); not fp32 into bf16, which the interpreter truncates
    # where the GPU rounds to nearest.
    for d, hkv, src, dst in ((64, 3, torch.bfloat16, torch.bfloat16),
                             (96, 2, torch.float32, torch.float16)):
        t, n_rows, r_slots = 7, 3, 4
        qkv = torch.randn(t, 4 + 2 * hkv, d).to(src)
        kk, vv = qkv[:, 4:4 + hkv], qkv[:, 4 + hkv:]
        rows = torch.tensor([2, 0, 1, 2, 0, 1, 2])
        rslots = torch.tensor([0, 3, 1, 1, 2, 0, 0])  # token 6 collides with 0 but is padding
        paged = torch.tensor([5, 9, 0, 7, 3, 2, -1], dtype=torch.int32)
        pools = [torch.full((n_rows, r_slots, hkv, d), float("nan"), dtype=dst)
                 for _ in range(4)]
        mod("write_raw").launch_write_raw(kk, vv, pools[0], pools[1], rows, rslots, paged,
                                          raw=True)
        R.write_raw(kk, vv, pools[2], pools[3], rows, rslots, paged)
        out[f"write_raw/d{d}-h{hkv}"] = dict(
            keys_equal=bool(torch.equal(pools[0].isnan(), pools[2].isnan())
                            and torch.equal(pools[0].nan_to_num(), pools[2].nan_to_num())),
            values_equal=bool(torch.equal(pools[1].isnan(), pools[3].isnan())
                              and torch.equal(pools[1].nan_to_num(), pools[3].nan_to_num())),
            written=int((~pools[0].isnan()).all(-1).all(-1).sum()))
    return out


def merge_mode(b: int, hkv: int, g: int, d: int, kb: int, positions: int, bs: int) -> bool:
    """Whether paged_decode_attention.launch merges in 16-row tiles on CPU at this shape (its
    split count as launch computes it off CUDA; merge_tiles)."""
    import importlib

    from tq_ops.triton.launch import sm_count
    from tq_ops.triton.unpack import group_width

    P = importlib.import_module("tq_ops.ops.paged_decode_attention")
    cfg = P.decode_config("cpu", d, kb)
    ns = P.num_splits(b, hkv, positions, sm_count(torch.device("cpu")), cfg,
                      tile=P.page_tile(bs, cfg, d))
    return P.merge_tiles(ns, 8 * group_width(d))


def decode_with_fallback(dargs: tuple, tables: tuple, poison: bool):
    """paged_decode_attention's launch with the fallback merge checking `tables`; with
    `poison`, the split launch's compressed partials (every slot but the raw pool's) are set to
    NaN after it ran."""
    import importlib

    P = importlib.import_module("tq_ops.ops.paged_decode_attention")  # the module, not the op
    split = P.decode_split_kernel

    class Poisoned:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                split[grid](*args, **kwargs)
                o_part, m_part, l_part, ns = args[9], args[10], args[11], args[15]
                rows = grid[0]
                for t in (o_part, m_part, l_part):
                    t.view(rows, ns + 1, -1)[:, :ns] = float("nan")
            return run

    if poison:
        P.decode_split_kernel = Poisoned()
    try:
        return P.launch(*dargs, raw=True, fallback_tables=tables)
    finally:
        P.decode_split_kernel = split


def prep_planes_check(d: int, rows: int = 5, rb: int | None = None,
                      two_parts: bool = False) -> dict:
    """query_prep_kernel with PLANES on random queries, rb rows per program (default the op's
    PREP_ROWS); then for random 2-bit codes and sign bits per coordinate, the plane products
    rebuilt from its outputs (v = a + c b per plane position, minus the offsets) against
    q . c[code] and u . s from its own fp32 qr, u.  The only admissible error is the fp16
    rounding of the scaled operands, at most a half ulp each: sum max(2^-11 |s q|, 2^-25)
    |v - a|.  Also qr and u against float64 products."""
    import importlib

    import numpy as np

    from tq_ops import TQCodec, preset
    from tq_ops.codec import qjl_scale
    from tq_ops.triton import unpack as U
    from tq_ops.triton.decode import query_prep_kernel

    P = importlib.import_module("tq_ops.ops.paged_decode_attention")  # the module, not the op
    c = TQCodec.build(preset("seed", head_dim=d))
    _, t0, t1 = U.asm_tables(d, 2)
    dp = 8 * U.group_width(d)
    q = torch.randn(rows, d) * 4
    qr = torch.full((rows, d), float("nan"))
    u = torch.full((rows, d), float("nan"))
    qp = torch.full((rows, 3, d), float("nan"), dtype=torch.float16)
    qo = torch.full((rows, 4), float("nan"))  # off_s, off_z; the int8 key scale and a spare unused
    rb = rb or P.PREP_ROWS
    query_prep_kernel[P.prep_grid(rows, rb, 2 if two_parts else 1)](
        q, c.rotation, c.qjl_projection, qr, u, qp, qo, rows, d ** -0.5, qjl_scale(d),
        D=d, DP=dp, RB=rb, JB=P.WHOLE_MATRIX_COLUMNS, QJL=True, PLANES=True, KT0=t0,
        KT1=t1, q8_ptr=qr, INT8_KEYS=False, G=1, GP=1, num_warps=P.PREP_WARPS)
    table = np.array(U.fp16_table(d, 2), dtype=np.uint16).view(np.float16).astype(np.float64)
    gen = np.random.default_rng(d)
    def half_ulp(x):  # fp16 round-to-nearest: 2^-11 relative, 2^-25 absolute among subnormals
        return max(2.0 ** -11 * abs(x), 2.0 ** -25)

    worst, rounding = 0.0, 0.0
    for i in range(rows):
        qd, ud = qr[i].double().numpy(), u[i].double().numpy()
        hi, lo, us = (qp[i, j].double().numpy() for j in range(3))
        code = gen.integers(0, 4, d)
        sign = gen.integers(0, 2, d)
        got_s, got_z, bound_s, bound_z = -float(qo[i, 0]), -float(qo[i, 1]), 0.0, 0.0
        for k in range(d):
            r = k % 8
            for part, b, s_ in ((hi, code[k] >> 1, 1), (lo, code[k] & 1, 0)):
                a, cc = U._PLANE_AC[U.key_plane_position(r, s_)]
                exact = U.key_plane_scale(t0, t1, r, s_) * qd[k]
                rounding = max(rounding, abs(part[k] - exact) / half_ulp(exact))
                got_s += part[k] * (a + cc * b)
                bound_s += half_ulp(exact) * abs(cc * b)
            # the sign plane's position: the coordinate's own group, or at folded widths
            # (head_dim 64) the one the split kernel decodes it at
            rs = U.sign_plane_group(k, d)
            a, cc = U._PLANE_AC[U.sign_plane_position(rs)]
            exact = U.sign_plane_scale(rs) * ud[k]
            rounding = max(rounding, abs(us[k] - exact) / half_ulp(exact))
            got_z += us[k] * (a + cc * sign[k])
            bound_z += half_ulp(exact) * abs(cc * sign[k])
        want_s = float((qd * table[code]).sum())
        want_z = float((ud * np.where(sign == 1, 1.0, -1.0)).sum())
        # fp32 sums in the kernel: a few ulps of the summed magnitudes on top of the bound
        slack_s = 1e-6 * (np.abs(qd).sum() + np.abs(hi).sum() + np.abs(lo).sum())
        slack_z = 1e-6 * (np.abs(ud).sum() + np.abs(us).sum())
        worst = max(worst, abs(got_s - want_s) / (bound_s + slack_s),
                    abs(got_z - want_z) / (bound_z + slack_z))
    # qr and u themselves against float64 products
    qr_ref = (q.double() @ c.rotation.double().T) * d ** -0.5
    u_ref = (qr_ref @ c.qjl_projection.double().T) * qjl_scale(d)
    return dict(worst_over_bound=worst, rounding_over_half_ulp=rounding,
                finite=bool(torch.isfinite(qo[:, :2]).all() and torch.isfinite(qp.float()).all()),
                qr_err=float((qr.double() - qr_ref).abs().max() / qr_ref.abs().max()),
                u_err=float((u.double() - u_ref).abs().max() / u_ref.abs().max()))


def int8_plane_values(code_bytes, p: int):
    """The int8 operand of plane p over uint8 code bytes, as decode.int8_key_plane defines it:
    planes 0-3 keep bit 4 + p of each byte, planes 4-7 bit p moved up to 4 + (p - 4); the kept
    bit is worth 16, 32, 64 or -128 (int8)."""
    import numpy as np

    b = code_bytes.astype(np.int64)
    x = b & (16 << p) if p < 4 else (b << 4) & (16 << (p - 4))
    return np.where(x >= 128, x - 256, x)


def prep_int8_check(g: int, rows_per_head: int = 2, rb: int | None = None) -> dict:
    """query_prep_kernel with INT8_KEYS (head_dim 128, GQA group g): for random 2-bit codes,
    the MSE part of q . k rebuilt the way the split kernel computes it (int8 planes of the code
    bytes against the high and low int8 parts, times the row's scale, minus off_s) against
    q . c[code] from the kernel's own fp32 qr.  The admissible error is the fixed-point rounding
    of each coefficient, half a step (the row's scale) times the bit's int8 value, plus fp32
    slack for off_s and the scaled coefficients.  Also: every part in [-128, 127] (read back
    as int8, an overflow would wrap and show as a large error) and finite scales."""
    two_parts = rb == 1  # one-row programs: the key and sign halves apart
    import importlib

    import numpy as np
    import triton

    from tq_ops import TQCodec, preset
    from tq_ops.codec import qjl_scale
    from tq_ops.triton import unpack as U
    from tq_ops.triton.decode import query_prep_kernel

    P = importlib.import_module("tq_ops.ops.paged_decode_attention")
    d, heads = 128, 3
    gp = max(2, triton.next_power_of_2(g))
    rows = heads * g
    c = TQCodec.build(preset("seed", head_dim=d))
    _, t0, t1 = U.asm_tables(d, 2)
    q = torch.randn(rows, d) * 4
    qr = torch.full((rows, d), float("nan"))
    u = torch.full((rows, d), float("nan"))
    qp = torch.full((rows, 3, d), float("nan"), dtype=torch.float16)
    qo = torch.full((rows, 4), float("nan"))
    q8 = torch.full((heads * 16 * (d // 4) * gp,), 99, dtype=torch.int8)
    rb = rb or P.PREP_ROWS
    query_prep_kernel[P.prep_grid(rows, rb, 2 if two_parts else 1)](
        q, c.rotation, c.qjl_projection, qr, u, qp, qo, rows, d ** -0.5, qjl_scale(d),
        D=d, DP=d, RB=rb, JB=P.WHOLE_MATRIX_COLUMNS, QJL=True, PLANES=True, KT0=t0, KT1=t1,
        q8_ptr=q8, INT8_KEYS=True, G=g, GP=gp, num_warps=P.PREP_WARPS)
    table = np.array(U.fp16_table(d, 2), dtype=np.uint16).view(np.float16).astype(np.float64)
    parts = q8.numpy().reshape(heads, 16, d // 4, gp).astype(np.int64)
    gen = np.random.default_rng(g)
    worst = 0.0
    for i in range(rows):
        h, col = divmod(i, g)
        qd = qr[i].double().numpy()
        delta = float(qo[i, 2])
        for _ in range(rows_per_head):
            code = gen.integers(0, 4, d)
            # code byte j holds coordinate 4 j + f at bits 2 f (low) and 2 f + 1 (high)
            code_bytes = np.zeros(d // 4, np.int64)
            for k in range(d):
                code_bytes[k // 4] |= int(code[k]) << (2 * (k % 4))
            acc, bound = 0, 0.0
            for p in range(8):
                x = int8_plane_values(code_bytes, p)
                acc += 256 * int((x * parts[h, p, :, col]).sum()) + int(
                    (x * parts[h, 8 + p, :, col]).sum())
                bound += 0.5 * delta * float(np.abs(x).sum())
            got = delta * acc - float(qo[i, 0])
            want = float((qd * table[code]).sum())
            slack = 1e-6 * float(np.abs(qd).sum() * np.abs(table).max())
            worst = max(worst, abs(got - want) / (bound + slack))
    # each coefficient against its exact value: within half a fixed-point step (plus the fp32
    # rounding of the scaled coefficient); a truncating rounding would reach a whole step
    c2, c3 = table[2], table[3]
    rounding = 0.0
    for i in range(rows):
        h, col = divmod(i, g)
        delta = float(qo[i, 2])
        for k in range(d):
            f, j = k % 4, k // 4
            plane = (4 if f < 2 else 0) + 2 * (f % 2)
            for bit, weight, value in ((0, c3 - c2, 16 if f % 2 == 0 else 64),
                                       (1, c3 + c2, 32 if f % 2 == 0 else -128)):
                exact = float(qr[i, k]) * weight / value
                fixed = 256 * parts[h, plane + bit, j, col] + parts[h, 8 + plane + bit, j, col]
                err = abs(fixed * delta - exact) - 2.0 ** -23 * abs(exact)
                rounding = max(rounding, err / (0.5 * delta))
    used = parts[:, :, :, :g]
    return dict(worst_over_bound=worst, rounding_over_half_step=rounding,
                finite=bool(torch.isfinite(qo[:, :3]).all()),
                scale_positive=bool((qo[:, 2] > 0).all()),
                parts_in_range=bool((used >= -128).all() and (used <= 127).all()),
                padded_columns_untouched=bool((parts[:, :, :, g:] == 99).all()))


# -- tests -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_write_cache_kernel(report, fmt):
    r = report[f"write_cache/{_fmt_id(fmt)}"]
    assert r["key_tie"] <= TIE and r["value_tie"] <= TIE, r
    assert r["norms_match"] and r["signs_equal"] and r["gamma_equal"], r
    assert r["other_slots_untouched"], r


def test_write_cache_codebook_symmetry(report):
    """The premise of the asymmetric-* cases below: the built-in codebooks of FORMATS are
    antisymmetric in fp32 (so the other cases cover the kernels' antisymmetric quantizer), the
    shifted ones are not."""
    r = report["write_cache/antisymmetric"]
    assert r["builtin"] and not r["shifted"], r


@pytest.mark.parametrize("case", ["bulk-tile", "bulk-one-tile", "bulk-two-launches",
                                  "asymmetric-bulk", "asymmetric-small"])
def test_write_cache_kernel_bulk_tile(report, case):
    """bulk-tile: 128-row tiles, keys and values in one joint launch, round robin over fewer
    programs than tiles.  bulk-one-tile: a small bulk write, one tile per program
    (tq_ops.triton.encode.pair_configs, encode_pair_kernel's ONE_TILE).  bulk-two-launches: key
    and value tiles of different configs, one launch each.  asymmetric-*: codebooks without
    c[2^B-1-k] == -c[k], which the encode kernels quantize by counting all 2^B - 1 midpoints
    (built-in codebooks take the antisymmetric path: every other write_cache case)."""
    r = report[f"write_cache/{case}"]
    assert r["key_tie"] <= TIE and r["value_tie"] <= TIE, r
    assert r["norms_match"] and r["signs_equal"] and r["gamma_equal"], r
    assert r["other_slots_untouched"], r


@pytest.mark.parametrize("case", [_fmt_id(f) for f in EXACT16_FORMATS] + [
    "bulk-tile", "bulk-fp32", "bulk-mse-only"])
def test_write_cache_kernel_exact16(report, case):
    """The declared exact16_matrices path (one fp16 operand per matrix) writes the reference's
    bytes, up to ties, as the split-precision path does."""
    r = report[f"write_cache_exact16/{case}"]
    assert r.get("qualifies", True), "TQCodec's matrices must qualify at power-of-two head dims"
    assert r["key_tie"] <= TIE and r["value_tie"] <= TIE, r
    assert r["norms_match"] and r["signs_equal"] and r["gamma_equal"], r
    assert r["other_slots_untouched"], r


def test_write_cache_kernel_false_exact16(report):
    """A false exact16_matrices declaration makes a write of at least EXACT16_MIN_ROWS rows
    store NaN key norms rather than codes of another matrix; smaller writes (a decode-sized
    one through encode_pair_kernel, a bulk one below the threshold) do not use it."""
    cases = report["write_cache_exact16/false-declaration"]
    assert sorted(r["bulk"] for r in cases.values()) == [False, False, True]
    for t, r in cases.items():
        if r["bulk"]:
            assert r["key_norms_nan"] and r["value_norms_finite"], (t, r)
        else:
            assert r["same_as_undeclared"] and not r["key_norms_nan"], (t, r)


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_record_kernels(report, fmt):
    r = report[f"records/{_fmt_id(fmt)}"]
    assert r["keys_equal"] and r["values_equal"] and r["codes_equal"], r
    assert r["norm_rel"] <= RTOL_F32, r


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_decode_kernel(report, fmt):
    r = report[f"decode/{_fmt_id(fmt)}"]
    assert r["err"] <= ATT_RTOL * r["scale"], r


def test_decode_merges_both_ways(report):
    """The decode cases above cover the merge's 16-row tiles (few splits: every format up to
    head_dim 128 here), among them tiles whose rows straddle KV heads (a group of 3, more
    rows than one tile) and a tile of masked rows past the end; the many-splits case covers
    one program per row (asserted where it is built)."""
    runs = [report[f"decode/{_fmt_id(f)}"] for f in FORMATS]
    tiled = [r for r in runs if r["merge_tiles"]]
    assert any(r["rows"] > 16 and 16 % r["group"] for r in tiled), runs
    assert any(r["rows"] % 16 for r in tiled), runs


def baked_tables(fmt) -> tuple | None:
    """(KT0, KT1, VT0, VT1) of the fast decoders' baked codebooks, or None where a format has
    none (those take the portable decoders on GPUs too)."""
    from tq_ops.triton.unpack import asm_tables

    kb, _, vb, d, _, _ = fmt
    kt, vt = asm_tables(d, kb), asm_tables(d, vb)
    if kt[0] and vt[0] and (kt[1] or kt[2]) and (vt[1] or vt[2]):
        return kt[1], kt[2], vt[1], vt[2]
    return None


FALLBACK_FORMATS = [f for f in FORMATS if baked_tables(f)]
assert FALLBACK_FORMATS


@pytest.mark.parametrize("fmt", FALLBACK_FORMATS, ids=_fmt_id)
def test_decode_fallback_merge(report, fmt):
    """decode_merge_fallback_kernel: the merge of the split partials when the codebooks match
    its tables (poisoned partials then poison the output), the compressed tokens attended by
    itself when either table differs (poisoned partials unused)."""
    fid = _fmt_id(fmt)
    cases = {k.rsplit("/", 1)[1]: v for k, v in report.items()
             if k.startswith(f"decode-fallback/{fid}/")}
    assert set(cases) == {"match", "match-poisoned", "key-mismatch-poisoned",
                          "value-mismatch-poisoned"}, cases
    assert cases["match"]["nan_rows"] == 0 and \
        cases["match"]["err"] <= ATT_RTOL * cases["match"]["scale"], cases
    # every sequence's split slots were poisoned, the empty ones' too
    assert cases["match-poisoned"]["nan_rows"] == cases["match-poisoned"]["rows"] > 0, cases
    for name in ("key-mismatch-poisoned", "value-mismatch-poisoned"):
        r = cases[name]
        assert r["nan_rows"] == 0 and r["err"] <= ATT_RTOL * r["scale"], (name, r)


@pytest.mark.parametrize("case", ["d64-h3", "d96-h2"])
def test_write_raw_kernel(report, case):
    r = report[f"write_raw/{case}"]
    assert r["keys_equal"] and r["values_equal"], r
    assert r["written"] == 6, r  # 7 tokens, one of them padding


@pytest.mark.parametrize("case", ["long-raw", "long-raw-fp16"])
def test_decode_kernel_long_raw_runs(report, case):
    r = report[f"decode/{case}"]
    # fp16 output: one more fp16 rounding of it
    assert r["err"] <= (ATT_RTOL + (2.0 ** -11 if "fp16" in case else 0)) * r["scale"], r


def test_decode_kernel_many_splits(report):
    # more split partials than one step of the merge kernel
    r = report["decode/many-splits"]
    assert r["err"] <= ATT_RTOL * r["scale"], r


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_prefill_kernel(report, fmt):
    r = report[f"prefill/{_fmt_id(fmt)}"]
    # fp16 inputs and output: add one fp16 rounding of the output
    assert r["err"] <= (ATT_RTOL + 2.0 ** -11) * r["scale"], r


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_dequantize_kernel(report, fmt):
    # tf32x3 products against the reference's fp32 ones: fp32 rounding of a D-term sum
    r = report[f"dequantize/{_fmt_id(fmt)}"]
    assert r["key"] <= RTOL_F32 and r["value"] <= RTOL_F32, r


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_prefill_kernel_decoded(report, fmt):
    r = report[f"prefill-decoded/{_fmt_id(fmt)}"]
    # the kernel against the reference over the same fp16 decoded prefix: as test_prefill_kernel
    assert r["err"] <= (ATT_RTOL + 2.0 ** -11) * r["scale"], r
    # against the compressed path: also the fp16 rounding of the decoded keys and values (each
    # half an ulp, 2^-12 relative), which moves a logit by at most 2^-12 |q| |k| and an output
    # by 2^-12 of the largest value
    assert r["err_vs_compressed"] <= (ATT_RTOL + 2 * 2.0 ** -11) * r["scale"], r


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_prefill_kernel_slabs(report, fmt):
    r = report[f"prefill-slabs/{_fmt_id(fmt)}"]
    # the prefix cut in two slabs, merged through the kernel's prior: as test_prefill_kernel and
    # test_prefill_kernel_decoded against the same references (the partial is fp32)
    assert r["pages_err"] <= (ATT_RTOL + 2.0 ** -11) * r["scale"], r
    assert r["decoded_err"] <= (ATT_RTOL + 2.0 ** -11) * r["scale"], r


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_prefill_kernel_fp16_prior(report, fmt):
    r = report[f"prefill-flash/{_fmt_id(fmt)}"]
    # the prefix as an fp16 prior (tq_vllm's FlashAttention route): test_prefill_kernel_decoded's
    # bound plus the prior's fp16 rounding (half an ulp of values at most the largest output);
    # a NaN from the row without a prior would fail it
    assert r["lse_row1"] == float("-inf"), r
    assert r["err"] <= (ATT_RTOL + 2.0 ** -11 + 2.0 ** -12) * r["scale"], r


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_codec_kernels(report, fmt):
    r = report[f"codec/{_fmt_id(fmt)}"]
    assert r["signs_equal"], r
    for name in ("rotate", "unrotate", "gamma", "dequantize", "key_scores"):
        assert r[name] <= RTOL_F32, (name, r)


@pytest.mark.parametrize("case", ["d64", "d256", "d64-rowwise", "d128-rowwise"])
def test_prep_plane_operands(report, case):
    r = report[f"prep-planes/{case}"]
    assert r["finite"]
    # each operand is its exact scaled value rounded to fp16 (a half ulp; 1e-6 for the fp32
    # product before the rounding), and the products rebuild the scores within those roundings
    assert r["rounding_over_half_ulp"] <= 1.0 + 1e-6
    assert r["worst_over_bound"] <= 1.0
    # the fp32 products (tf32x3 on tensor cores, or multiply-and-sum per row)
    assert r["qr_err"] <= RTOL_F32 and r["u_err"] <= RTOL_F32, r


@pytest.mark.parametrize("case", ["g4-rbdefault", "g3-rb1"])
def test_prep_int8_key_operands(report, case):
    r = report[f"prep-int8/{case}"]
    assert r["finite"] and r["scale_positive"] and r["parts_in_range"], r
    # every coefficient rounds to the nearest fixed-point step, and the planes rebuild the
    # scores within those roundings (the parts are read back as int8: a high part out of range
    # would have wrapped and broken both)
    assert r["rounding_over_half_step"] <= 1.0 + 1e-6, r
    assert r["worst_over_bound"] <= 1.0, r
    # GP > G: the kernel writes only its own G columns (the split kernel masks the rest)
    assert r["padded_columns_untouched"], r


def test_prefill_reference_matches_contiguous_attention():
    """paged_prefill_attention's reference (used by the CPU op) equals the committed contiguous
    reference attention, sequence by sequence: raw pool tokens as sinks, the compressed prefix
    as records, the chunk as the recent buffer with causal masking."""
    from tq_ops import TQCodec, preset
    from tq_ops import reference as R

    torch.manual_seed(1)
    c = TQCodec.build(preset("seed", head_dim=64))
    lay = c.config.layout
    bs, hkv, g, d = 16, 2, 3, 64
    chunk, pref, rawl = [5, 1, 9], [20, 0, 33], [3, 0, 2]
    kv_start = 3
    nb, mb = 40, 4
    cache = torch.zeros(nb, hkv, bs * lay.slot_bytes, dtype=torch.uint8)
    bt = torch.randperm(nb)[:3 * mb].reshape(3, mb).to(torch.int32)
    prefix = []
    for i in range(3):
        k, v = torch.randn(pref[i], hkv, d), torch.randn(pref[i], hkv, d)
        sl = bt[i].long()[torch.arange(pref[i]) // bs] * bs + torch.arange(pref[i]) % bs
        R.write_cache(k, v, cache, sl, c.rotation, c.qjl_projection, c.key_centroids,
                      c.value_centroids, 2, True, 3)
        prefix.append((k, v))
    t = sum(chunk)
    q, key, val = torch.randn(t, hkv * g, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    pool_k, pool_v = torch.randn(5, 4, hkv, d), torch.randn(5, 4, hkv, d)
    ridx = torch.tensor([4, 0, 2], dtype=torch.int32)
    out = torch.ops.turboquant.paged_prefill_attention(
        q, key, val, cu, cache, bt, torch.tensor(pref, dtype=torch.int32), pool_k, pool_v, ridx,
        torch.tensor(rawl, dtype=torch.int32), c.rotation, c.qjl_projection, c.key_centroids,
        c.value_centroids, 2, True, 3, 0.125, kv_start)
    for i in range(3):
        s0, s1 = int(cu[i]), int(cu[i + 1])
        k, v = prefix[i]
        kr = R.encode_keys(k[kv_start:], c.rotation, c.qjl_projection, c.key_centroids, 2, True)
        vr = R.encode_values(v[kv_start:], c.rotation, c.value_centroids, 3)
        ref = R.attention(q[s0:s1], kr, vr, pool_k[ridx[i], :rawl[i]], pool_v[ridx[i], :rawl[i]],
                          key[s0:s1], val[s0:s1], c.rotation, c.qjl_projection, c.key_centroids,
                          c.value_centroids, 2, True, 3, 0.125, True)
        # same fp32 operations in a different order: fp32 rounding only
        torch.testing.assert_close(out[s0:s1], ref, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest"
    print(json.dumps(_child()))
