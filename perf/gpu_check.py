"""Every GPU check of the Triton bodies in one invocation, then the benchmark table (printed last).

    PYTHONPATH=. python perf/gpu_check.py [--out DIR] [--workers N] [--skip-bench]
        [--skip-checks] [--skip-prefill-bench]

1. correctness (N worker processes in parallel, compile time dominates): every Triton body
   against the CPU reference on fresh random inputs, outputs poisoned first (the caching
   allocator hands the ops memory just filled with NaN / 0xFF); Llama-3-8B (32/8, D=128) and
   SmolLM2 (9/3, D=64) geometries, head dims 64/96/128/256, block sizes 16/32/64, ragged lengths
   1/7/129/4097, fp16 and bf16, every preset format, the slow decoders (perturbed codebook:
   the fallback merge);
   torch.library.opcheck on CUDA samples of every op; each check prints a CHECK line (and
   --out's checks.json is rewritten) as it finishes, so a run cut short keeps what finished;
2. compile and graphs, each in a fresh process: torch.compile(fullgraph=True,
   mode="reduce-overhead") of a decode step with a static cache (no graph break, no cudagraph
   skip, output == eager); manual torch.cuda.graph capture of a decode step replayed after the
   cache, block table and lengths were updated in place == eager; the same with the cache write
   on a side stream beside the decode (tq_vllm.attend.SideStream, as the vLLM backend runs it);
   compile and capture again with a block table short enough that the merge takes 16-row tiles
   (the "-tiles" runs; each run checks which merge its shapes take);
3. benchmarks: decode at the seed format vs SDPA-flash fp16, the format's memory floor, percent
   of the measured copy bandwidth; encode+write throughput; then decode variants and prefill
   rows.  Each row prints a BENCH line (and --out's bench.json is rewritten) as it is measured.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import subprocess
import sys
import time
import traceback
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

HERE = os.path.abspath(__file__)

# tolerances (derivations in perf/README.md)
ATT_RTOL = 8 * 2.0 ** -11          # fp16 tensor-core operands, relative to the output scale
OUT_RTOL = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 0.0}
TIE = 4e-6                          # |y - boundary| under which a code may differ (unit vectors)
SIGN_TIE = 1e-4                     # |S'r|_j / ||r|| under which a QJL sign may differ
F32_RTOL = 1e-5                     # tf32x3 codec ops


def poison(nbytes: int = 1 << 28) -> None:
    """Fill then free a block, so the next torch.empty likely returns NaN / 0xFF bytes."""
    t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t.fill_(0xFF)
    del t


# -- correctness -------------------------------------------------------------------------------

def cases() -> list[dict]:
    out = []
    for dt in ("fp16", "bf16"):
        for bs in (16, 64):
            out.append(dict(name=f"llama3-8b seed {dt} bs{bs}", hq=32, hkv=8, d=128, fmt="seed",
                            dtype=dt, bs=bs, lens=[1, 7, 129, 4097]))
    out.append(dict(name="smollm2 seed bf16 bs16", hq=9, hkv=3, d=64, fmt="seed", dtype="bf16",
                    bs=16, lens=[1, 7, 129, 4097]))
    # head_dim 64 inside one page as well (its row's decoders since session 31: bit planes and
    # the pair value decoder, as at 128)
    out.append(dict(name="smollm2 seed fp16 bs64", hq=9, hkv=3, d=64, fmt="seed", dtype="fp16",
                    bs=64, lens=[1, 7, 129, 4097]))
    for d in (96, 256):
        out.append(dict(name=f"d{d} seed fp16 bs32", hq=8, hkv=2, d=d, fmt="seed", dtype="fp16",
                        bs=32, lens=[1, 7, 129, 1000]))
    for fmt in ("k3v3", "k4v4", "k2q1v2", "k3q1v3", "k4v3", "k3v2"):
        out.append(dict(name=f"d128 {fmt} fp16 bs16", hq=8, hkv=2, d=128, fmt=fmt, dtype="fp16",
                        bs=16, lens=[7, 129, 700]))
    # GQA groups other than 4 at head_dim 128 (the int8 key operands' N: a group of 1 and 2 is
    # padded to 2, 3 to 4; 8 fills an MMA's N)
    for g in (1, 3, 8):
        out.append(dict(name=f"d128 seed fp16 bs64 gqa{g}", hq=2 * g, hkv=2, d=128, fmt="seed",
                        dtype="fp16", bs=64, lens=[7, 129, 700]))
    # 157 splits at page 64 (one sequence of 20000 tokens, 2 KV heads): the merge takes two
    # steps of its widest width (tq_ops.ops.paged_decode_attention.merge_step)
    out.append(dict(name="d128 seed fp16 bs64 long (157 splits)", hq=8, hkv=2, d=128, fmt="seed",
                    dtype="fp16", bs=64, lens=[1, 7, 20000]))
    out.append(dict(name="d128 seed perturbed codebook (fallback merge, slow decoders, "
                    "asymmetric encode)", hq=8, hkv=2, d=128, fmt="seed", dtype="fp16", bs=16,
                    lens=[7, 129, 700], perturb=True))
    # many sequences, so few splits: the merge takes 16-row tiles (paged_decode_attention.
    # merge_tiles), the plain one and the fallback one; with a perturbed codebook the fallback
    # tiles attend each KV head of their rows (a group of 3: KV heads across two tiles)
    many = [1 + (37 * i) % 600 for i in range(40)]
    out.append(dict(name="llama3-8b seed fp16 bs64 40 sequences (merge tiles)", hq=32, hkv=8,
                    d=128, fmt="seed", dtype="fp16", bs=64, lens=many))
    out.append(dict(name="d128 seed perturbed codebook gqa3 40 sequences (fallback merge "
                    "tiles)", hq=6, hkv=2, d=128, fmt="seed", dtype="fp16", bs=64,
                    lens=[1 + (37 * i) % 400 for i in range(40)], perturb=True))
    for d in (64, 96, 128, 256):
        out.append(dict(name=f"codec ops d{d}", codec_ops=True, d=d))
    out.append(dict(name="opcheck cuda", opcheck=True))
    out.append(dict(name="no recompiles on run-time values", recompiles=True))
    out.append(dict(name="cache-write warm-up (no compile at any write size)", write_warm=True))
    return out


def _dt(name):
    return dict(fp16=torch.float16, bf16=torch.bfloat16, fp32=torch.float32)[name]


def _codes_check(cache_gpu, cache_ref, block_ids, positions, k, v, codec, cfg, bs):
    """Compare two caches field by field; returns a dict of worst deviations."""
    from tq_ops import reference as R

    d, kb, qjl, vb = cfg.head_dim, cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits
    res = {}
    bt = torch.tensor(block_ids).reshape(1, -1)
    k1, v1 = R.gather_pages(cache_gpu, bt, d, kb, qjl, vb)
    k2, v2 = R.gather_pages(cache_ref, bt, d, kb, qjl, vb)
    pos = torch.tensor(positions)
    a, b = R.parse_key_records(k1[0, pos], d, kb, qjl), R.parse_key_records(k2[0, pos], d, kb, qjl)
    unit_k, _ = R._normalize(k)
    y = R.rotate(unit_k, codec.rotation)
    mids = (codec.key_centroids[1:] + codec.key_centroids[:-1]) / 2
    bad = a[0] != b[0]
    res["key_code_mismatch"] = int(bad.sum())
    res["key_code_worst_tie"] = float((y.unsqueeze(-1) - mids).abs().amin(-1)[bad].max()) \
        if bad.any() else 0.0
    res["key_norm_ulps"] = float(((a[2] - b[2]).abs() / (b[2].abs() * 2 ** -10).clamp(min=2 ** -24)).max())
    if qjl:
        resid = y - codec.key_centroids[b[0]]
        proj = resid @ codec.qjl_projection.t()
        rel = proj.abs() / torch.linalg.vector_norm(resid, dim=-1, keepdim=True).clamp(min=1e-30)
        # a code tie changes that key's residual, so all its signs may legitimately differ
        tie_rows = bad.any(-1, keepdim=True)
        res["sign_rows_after_code_tie"] = int(tie_rows.sum())
        sbad = (a[1] != b[1]) & ~tie_rows
        res["sign_mismatch"] = int(sbad.sum())
        res["sign_worst_rel"] = float(rel[sbad].max()) if sbad.any() else 0.0
        gam = ((a[3] - b[3]).abs() / (b[3].abs() * 2 ** -10).clamp(min=2 ** -24))
        res["gamma_ulps"] = float(gam[~tie_rows.squeeze(-1)].max()) if (~tie_rows).any() else 0.0
    av, bv = R.parse_value_records(v1[0, pos], d, vb), R.parse_value_records(v2[0, pos], d, vb)
    yv = R.rotate(R._normalize(v)[0], codec.rotation)
    vm = (codec.value_centroids[1:] + codec.value_centroids[:-1]) / 2
    vbad = av[0] != bv[0]
    res["value_code_mismatch"] = int(vbad.sum())
    res["value_code_worst_tie"] = float((yv.unsqueeze(-1) - vm).abs().amin(-1)[vbad].max()) \
        if vbad.any() else 0.0
    res["value_norm_ulps"] = float(((av[1] - bv[1]).abs() / (bv[1].abs() * 2 ** -10).clamp(min=2 ** -24)).max())
    return res


def run_attention_case(c: dict) -> dict:
    from tq_ops import TQCodec, preset
    from tq_ops import reference as R
    from tq_ops.codec import exact16_matrices
    from tq_ops.ops.write_cache import triton_encode_supported
    from tq_ops.triton.encode import LATENCY_ROWS

    torch.manual_seed(hash(c["name"]) % (1 << 31))
    dt = _dt(c["dtype"])
    cfg = preset(c["fmt"], head_dim=c["d"])
    codec = TQCodec.build(cfg)
    if c.get("perturb"):
        # scaled and shifted: off the decoders' baked tables, and no longer antisymmetric, so
        # write_cache's encode counts all midpoints (the built-in codebooks take its
        # antisymmetric quantizer: tq_ops.triton.encode)
        kc, vc = codec.key_centroids, codec.value_centroids
        codec = TQCodec(cfg, codec.rotation, codec.qjl_projection,
                        kc * (1 + 1e-3) + 1e-2 * (kc[1] - kc[0]),
                        vc * (1 - 1e-3) - 1e-2 * (vc[1] - vc[0]))
        assert not torch.equal(codec.key_centroids, -codec.key_centroids.flip(0))
        assert not torch.equal(codec.value_centroids, -codec.value_centroids.flip(0))
    cg = codec.to("cuda")
    hq, hkv, d, bs, lens = c["hq"], c["hkv"], c["d"], c["bs"], c["lens"]
    kb, qjl, vb = cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits
    lay = cfg.layout
    b = len(lens)
    mb = max(math.ceil(n / bs) for n in lens) + 1
    nblocks = b * mb + 3
    cache0 = torch.randint(0, 256, (nblocks, hkv, bs * lay.slot_bytes), dtype=torch.uint8)
    bt = torch.randperm(nblocks)[:b * mb].reshape(b, mb).to(torch.int32)
    ks, vs, slots = [], [], []
    for i, n in enumerate(lens):
        ks.append(torch.randn(n, hkv, d).to(dt) * (1 + 4 * torch.rand(n, hkv, 1)).to(dt))
        vs.append(torch.randn(n, hkv, d).to(dt))
        pos = torch.arange(n)
        slots.append(bt[i].long()[pos // bs] * bs + pos % bs)
    k, v, sl = torch.cat(ks), torch.cat(vs), torch.cat(slots).to(torch.int32)
    sl_pad = torch.cat([sl, torch.tensor([-1], dtype=torch.int32)])  # a padding token
    k_pad = torch.cat([k, torch.randn(1, hkv, d).to(dt)])
    v_pad = torch.cat([v, torch.randn(1, hkv, d).to(dt)])
    res = {"name": c["name"]}
    # write_cache.  The op uses an exact16_matrices declaration in writes of at least
    # EXACT16_MIN_ROWS rows only (65536: more than these); lowered for this section, so the
    # declared writes below run (and check) the EXACT16 kernels
    import importlib

    # (the package's attribute `write_cache` is the op, not this module)
    write_cache_module = importlib.import_module("tq_ops.ops.write_cache")
    lowered = mock.patch.object(write_cache_module, "EXACT16_MIN_ROWS", LATENCY_ROWS + 1)
    lowered.start()
    cache_ref = cache0.clone()
    R.write_cache(k_pad, v_pad, cache_ref, sl_pad, codec.rotation, codec.qjl_projection,
                  codec.key_centroids, codec.value_centroids, kb, qjl, vb)
    # the op's default, then (where TQCodec's matrices qualify: power-of-two head dims) with
    # exact16_matrices=True, as the vLLM backend calls it; the same reference bytes for both
    ok = True
    for declared in ([False, True] if exact16_matrices(codec.rotation, codec.qjl_projection)
                     else [False]):
        tag = "_exact16" if declared else ""
        cache_gpu = cache0.cuda()
        torch.ops.turboquant.write_cache(k_pad.cuda(), v_pad.cuda(), cache_gpu, sl_pad.cuda(),
                                         cg.rotation, cg.qjl_projection, cg.key_centroids,
                                         cg.value_centroids, kb, qjl, vb, declared)
        cache_gpu = cache_gpu.cpu()
        written = torch.zeros(nblocks * bs, dtype=torch.bool)
        written[sl.long()] = True
        untouched_ok = True
        for blk in range(nblocks):
            if not written[blk * bs:(blk + 1) * bs].any():
                untouched_ok &= bool(torch.equal(cache_gpu[blk], cache0[blk]))
        order = torch.argsort(sl.long())
        bulk = _codes_check(cache_gpu, cache_ref, list(range(nblocks)), sl.long()[order].tolist(),
                            k[order].float(), v[order].float(), codec, cfg, bs)
        res.update({f"{name}{tag}": val for name, val in bulk.items()})
        res[f"untouched_pages_equal{tag}"] = untouched_ok
        ok &= (bulk["key_code_worst_tie"] <= TIE and bulk["value_code_worst_tie"] <= TIE
               and bulk["key_norm_ulps"] <= 1 and bulk["value_norm_ulps"] <= 1 and untouched_ok)
        if qjl:
            ok &= bulk["sign_worst_rel"] <= SIGN_TIE and bulk["gamma_ulps"] <= 1
        # a decode-sized write (at most LATENCY_ROWS rows: one launch of encode_pair_kernel), the
        # last tokens and the padding one, into a fresh copy of the poisoned cache
        n_small = min(k_pad.shape[0], max(1, LATENCY_ROWS // hkv))
        ks_, vs_, ss_ = k_pad[-n_small:], v_pad[-n_small:], sl_pad[-n_small:]
        small_ref = cache0.clone()
        R.write_cache(ks_, vs_, small_ref, ss_, codec.rotation, codec.qjl_projection,
                      codec.key_centroids, codec.value_centroids, kb, qjl, vb)
        small_gpu = cache0.cuda()
        torch.ops.turboquant.write_cache(ks_.cuda(), vs_.cuda(), small_gpu, ss_.cuda(),
                                         cg.rotation, cg.qjl_projection, cg.key_centroids,
                                         cg.value_centroids, kb, qjl, vb, declared)
        small_gpu = small_gpu.cpu()
        keep = ss_ >= 0
        sorder = torch.argsort(ss_[keep].long())
        small = _codes_check(small_gpu, small_ref, list(range(nblocks)),
                             ss_[keep].long()[sorder].tolist(), ks_[keep][sorder].float(),
                             vs_[keep][sorder].float(), codec, cfg, bs)
        small_written = torch.zeros(nblocks * bs, dtype=torch.bool)
        small_written[ss_[keep].long()] = True
        small_ok = all(torch.equal(small_gpu[blk], cache0[blk]) for blk in range(nblocks)
                       if not small_written[blk * bs:(blk + 1) * bs].any())
        small_ok &= (small["key_code_worst_tie"] <= TIE and small["value_code_worst_tie"] <= TIE
                     and small["key_norm_ulps"] <= 1 and small["value_norm_ulps"] <= 1)
        if qjl:
            small_ok &= small["sign_worst_rel"] <= SIGN_TIE and small["gamma_ulps"] <= 1
        res["small_write_rows"] = n_small * hkv
        res[f"small_write_ok{tag}"] = bool(small_ok)
        ok &= small_ok
    if qjl and triton_encode_supported(d) and exact16_matrices(codec.rotation,
                                                              codec.qjl_projection):
        # a false declaration (a projection off the fp16 grid) must poison every written key's
        # norm, not write codes of a matrix other than the one passed
        false_gpu = cache0.cuda()
        torch.ops.turboquant.write_cache(k_pad.cuda(), v_pad.cuda(), false_gpu, sl_pad.cuda(),
                                         cg.rotation, cg.qjl_projection * (1 + 2 ** -12),
                                         cg.key_centroids, cg.value_centroids, kb, qjl, vb, True)
        fk, _ = R.gather_pages(false_gpu.cpu(), torch.arange(nblocks).reshape(1, -1), d, kb,
                               qjl, vb)
        norms = R.parse_key_records(fk[0, sl.long()], d, kb, qjl)[2]
        res["false_declaration_norms_nan"] = bool(norms.isnan().all())
        ok &= res["false_declaration_norms_nan"]
    lowered.stop()
    res["write_ok"] = bool(ok)
    # decode: exact same cache contents for both (the reference's)
    cache_g = cache_ref.cuda()
    q = torch.randn(b, hq, d).to(dt)
    pool_r = 130
    pk, pv = torch.randn(b + 1, pool_r, hkv, d).to(dt), torch.randn(b + 1, pool_r, hkv, d).to(dt)
    ridx = torch.randperm(b + 1)[:b].to(torch.int32)
    rl = torch.tensor([0, 3, 128, 130][:b] + [5] * max(0, b - 4), dtype=torch.int32)
    kv_lens = torch.tensor(lens, dtype=torch.int32)
    worst = 0.0
    for kv_start in (0, 4):
        args = (q, cache_ref, bt, kv_lens, pk, pv, ridx, rl, codec.rotation, codec.qjl_projection,
                codec.key_centroids, codec.value_centroids, kb, qjl, vb, d ** -0.5, kv_start)
        ref = R.paged_decode_attention(*args).float()
        poison()
        got = torch.ops.turboquant.paged_decode_attention(
            q.cuda(), cache_g, bt.cuda(), kv_lens.cuda(), pk.cuda(), pv.cuda(), ridx.cuda(),
            rl.cuda(), cg.rotation, cg.qjl_projection, cg.key_centroids, cg.value_centroids, kb,
            qjl, vb, d ** -0.5, kv_start).float().cpu()
        if not torch.isfinite(got).all():
            worst = float("inf")
            break
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    # builtin_codebooks=True: the plain merge instead of the fallback one, bit for bit the same
    # output with the built-in codebooks; NaN everywhere (not a silent wrong answer) with others
    declared = torch.ops.turboquant.paged_decode_attention(
        q.cuda(), cache_g, bt.cuda(), kv_lens.cuda(), pk.cuda(), pv.cuda(), ridx.cuda(),
        rl.cuda(), cg.rotation, cg.qjl_projection, cg.key_centroids, cg.value_centroids, kb,
        qjl, vb, d ** -0.5, 4, True).float().cpu()
    from tq_ops import codebooks
    if (codebooks.is_builtin(codec.key_centroids, d, kb)
            and codebooks.is_builtin(codec.value_centroids, d, vb)):
        res["declared_builtin_equal"] = bool(torch.equal(declared, got))
    else:  # the perturbed case: the seed format, whose fast decoders have baked tables
        # rows with compressed tokens to read are NaN (a row with none has nothing to decode)
        res["declared_builtin_nan"] = bool(torch.isnan(declared[kv_lens > 4]).all())
    res["decode_rel_err"] = worst
    res["decode_ok"] = (worst <= ATT_RTOL + OUT_RTOL[dt]
                        and res.get("declared_builtin_equal", True)
                        and res.get("declared_builtin_nan", True))
    # prefill: two chunks over prefixes of sequences 1 and 2 (plus raw pool tokens)
    chunk = [7, 33]
    prefix = [lens[1], lens[2]]
    tt = sum(chunk)
    pq = torch.randn(tt, hq, d).to(dt)
    pkey, pval = torch.randn(tt, hkv, d).to(dt), torch.randn(tt, hkv, d).to(dt)
    cu = torch.tensor([0, chunk[0], tt], dtype=torch.int32)
    pbt = bt[1:3].contiguous()
    pargs = (pq, pkey, pval, cu, cache_ref, pbt, torch.tensor(prefix, dtype=torch.int32), pk, pv,
             ridx[:2].contiguous(), rl[1:3].contiguous(), codec.rotation, codec.qjl_projection,
             codec.key_centroids, codec.value_centroids, kb, qjl, vb, d ** -0.5, 2)
    ref = R.paged_prefill_attention(*pargs).float()
    poison()
    got = torch.ops.turboquant.paged_prefill_attention(
        *[a.cuda() if isinstance(a, torch.Tensor) and a is not cache_ref else a for a in pargs[:4]],
        cache_g, *[a.cuda() for a in pargs[5:11]], cg.rotation, cg.qjl_projection,
        cg.key_centroids, cg.value_centroids, kb, qjl, vb, d ** -0.5, 2).float().cpu()
    perr = float((got - ref).abs().max() / ref.abs().max()) if torch.isfinite(got).all() else float("inf")
    res["prefill_rel_err"] = perr
    # bf16/fp16 inputs meet bf16/fp16 MMAs in the chunk and raw phases: one more rounding
    res["prefill_ok"] = perr <= ATT_RTOL + 2 * OUT_RTOL[dt]
    # the decoded path: paged_dequantize of both prefixes (rows 0.. and then the second's) in
    # fp16, as tq_vllm asks for it whatever the model dtype, against the reference's; then the
    # prefill's decoded variant against the compressed reference above: one more fp16
    # rounding (the decoded K/V, and the compressed phase's MMA operands in their dtype)
    kv0 = 2
    n0 = max(0, prefix[0] - kv0)
    dq = [cache_ref, pbt, torch.tensor(prefix, dtype=torch.int32),
          torch.tensor([0, n0], dtype=torch.int32), n0 + max(0, prefix[1] - kv0),
          codec.rotation, codec.qjl_projection, codec.key_centroids, codec.value_centroids, kb,
          qjl, vb, kv0, torch.float16]
    rk_, rv_ = R.paged_dequantize(*dq[:-1], torch.float32)
    poison()
    dk, dv = torch.ops.turboquant.paged_dequantize(
        cache_g, pbt.cuda(), dq[2].cuda(), dq[3].cuda(), dq[4], cg.rotation, cg.qjl_projection,
        cg.key_centroids, cg.value_centroids, kb, qjl, vb, kv0, torch.float16)
    derr = max(float((dk.float().cpu() - rk_).abs().max() / rk_.abs().max()),
               float((dv.float().cpu() - rv_).abs().max() / rv_.abs().max()))
    res["dequantize_rel_err"] = derr
    # fp32 outputs (tq_vllm's for fp32 models): the products' fp32 accuracy alone
    poison()
    fk, fv = torch.ops.turboquant.paged_dequantize(
        cache_g, pbt.cuda(), dq[2].cuda(), dq[3].cuda(), dq[4], cg.rotation, cg.qjl_projection,
        cg.key_centroids, cg.value_centroids, kb, qjl, vb, kv0, torch.float32)
    derr32 = max(float((fk.cpu() - rk_).abs().max() / rk_.abs().max()),
                 float((fv.cpu() - rv_).abs().max() / rv_.abs().max()))
    res["dequantize_fp32_rel_err"] = derr32
    del fk, fv
    poison()
    got = torch.ops.turboquant.paged_prefill_attention(
        *[a.cuda() if isinstance(a, torch.Tensor) and a is not cache_ref else a for a in pargs[:4]],
        cache_g, *[a.cuda() for a in pargs[5:11]], cg.rotation, cg.qjl_projection,
        cg.key_centroids, cg.value_centroids, kb, qjl, vb, d ** -0.5, kv0, dk, dv,
        torch.tensor([0, n0], dtype=torch.int32, device="cuda")).float().cpu()
    derr2 = float((got - ref).abs().max() / ref.abs().max()) if torch.isfinite(got).all() \
        else float("inf")
    res["prefill_decoded_rel_err"] = derr2
    # slabs: compressed positions from `cut` on through paged_prefill_prefix, the rest through
    # paged_prefill_attention with that prior; from the pages and from the decoded rows
    # (entered at the slab's first position); the same tolerances as the whole prefix
    cut = kv0 + max(1, (min(prefix) - kv0) // 2)
    pre = torch.tensor(prefix, dtype=torch.int32, device="cuda")
    hi_lens, lo_lens = pre.clamp(min=cut), pre.clamp(max=cut)
    qg, cug, btg = pq.cuda(), cu.cuda(), pbt.cuda()
    mats = (cg.rotation, cg.qjl_projection, cg.key_centroids, cg.value_centroids, kb, qjl, vb)
    rest = [a.cuda() for a in pargs[7:11]]
    starts = torch.tensor([0, n0], dtype=torch.int32, device="cuda")
    serr = []
    for dec in (False, True):
        poison()
        extra = (dk, dv, starts + (cut - kv0)) if dec else (None, None, None)
        po, pl = torch.ops.turboquant.paged_prefill_prefix(qg, cug, cache_g, btg, hi_lens, *mats,
                                                           d ** -0.5, cut, *extra)
        extra = (dk, dv, starts) if dec else (None, None, None)
        got = torch.ops.turboquant.paged_prefill_attention(
            qg, pargs[1].cuda(), pargs[2].cuda(), cug, cache_g, btg, lo_lens, *rest, *mats,
            d ** -0.5, kv0, *extra, po, pl).float().cpu()
        serr.append(float((got - ref).abs().max() / ref.abs().max())
                    if torch.isfinite(got).all() else float("inf"))
    res["prefill_slabs_rel_err"] = serr
    res["prefill_ok"] = bool(res["prefill_ok"] and derr <= F32_RTOL + OUT_RTOL[torch.float16]
                             and derr32 <= F32_RTOL
                             and derr2 <= ATT_RTOL + 2 * OUT_RTOL[dt] + OUT_RTOL[torch.float16]
                             and serr[0] <= ATT_RTOL + 2 * OUT_RTOL[dt]
                             and serr[1] <= ATT_RTOL + 2 * OUT_RTOL[dt]
                             + OUT_RTOL[torch.float16])
    res["ok"] = bool(res["write_ok"] and res["decode_ok"] and res["prefill_ok"])
    return res


def run_codec_ops(c: dict) -> dict:
    from tq_ops import TQCodec, preset
    from tq_ops import reference as R

    d = c["d"]
    torch.manual_seed(d)
    res = {"name": c["name"]}
    ok = True
    for fmt in ("seed", "k3v3", "k4v4", "k3q1v3"):
        cfg = preset(fmt, head_dim=d)
        codec = TQCodec.build(cfg)
        cg = codec.to("cuda")
        kb, qjl, vb = cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            x = torch.randn(7, 33, d).to(dt)
            poison()
            rk = torch.ops.turboquant.encode_keys(x.cuda(), cg.rotation, cg.qjl_projection,
                                                  cg.key_centroids, kb, qjl).cpu()
            ref_k = R.encode_keys(x, codec.rotation, codec.qjl_projection, codec.key_centroids,
                                  kb, qjl)
            rv = torch.ops.turboquant.encode_values(x.cuda(), cg.rotation, cg.value_centroids,
                                                    vb).cpu()
            ref_v = R.encode_values(x, codec.rotation, codec.value_centroids, vb)
            qc, qn = torch.ops.turboquant.mse_quantize(x.cuda(), cg.rotation, cg.value_centroids, vb)
            rc, rn = R.mse_quantize(x, codec.rotation, codec.value_centroids, vb)
            y = R.rotate(R._normalize(x)[0], codec.rotation)
            # records: byte mismatches only where a coordinate is at a tie
            ck_g = R.parse_key_records(rk, d, kb, qjl)[0]
            ck_r = R.parse_key_records(ref_k, d, kb, qjl)[0]
            mids = (codec.key_centroids[1:] + codec.key_centroids[:-1]) / 2
            kbad = ck_g != ck_r
            ktie = float((y.unsqueeze(-1) - mids).abs().amin(-1)[kbad].max()) if kbad.any() else 0.0
            vbad = (R.parse_value_records(rv, d, vb)[0] != R.parse_value_records(ref_v, d, vb)[0])
            vm = (codec.value_centroids[1:] + codec.value_centroids[:-1]) / 2
            vtie = float((y.unsqueeze(-1) - vm).abs().amin(-1)[vbad].max()) if vbad.any() else 0.0
            cbad = (R.L.unpack_codes(qc.cpu(), d, vb) != R.L.unpack_codes(rc, d, vb))
            ctie = float((y.unsqueeze(-1) - vm).abs().amin(-1)[cbad].max()) if cbad.any() else 0.0
            nrel = float(((qn.cpu() - rn).abs() / rn.abs().clamp(min=1e-30)).max())
            key = f"{fmt}/{str(dt)[6:]}"
            res[key] = dict(key_tie=ktie, value_tie=vtie, codes_tie=ctie, norm_rel=nrel,
                            key_mismatch=int(kbad.sum()), value_mismatch=int(vbad.sum()))
            ok &= max(ktie, vtie, ctie) <= TIE and nrel <= F32_RTOL
        x = torch.randn(5, 9, d)
        xg = x.cuda()
        e1 = float((torch.ops.turboquant.rotate(xg, cg.rotation).cpu() - R.rotate(x, codec.rotation)).abs().max())
        e2 = float((torch.ops.turboquant.unrotate(xg, cg.rotation).cpu() - R.unrotate(x, codec.rotation)).abs().max())
        s1, g1 = torch.ops.turboquant.qjl_sketch(xg, cg.qjl_projection)
        s2, g2 = R.qjl_sketch(x, codec.qjl_projection)
        proj = x @ codec.qjl_projection.t()
        sb = R.L.unpack_signs(s1.cpu(), d) != R.L.unpack_signs(s2, d)
        srel = float((proj.abs() / torch.linalg.vector_norm(x, dim=-1, keepdim=True))[sb].max()) if sb.any() else 0.0
        rc, rn = R.mse_quantize(x, codec.rotation, codec.value_centroids, vb)
        dq = torch.ops.turboquant.mse_dequantize(rc.cuda(), rn.cuda(), cg.rotation,
                                                 cg.value_centroids, vb).cpu()
        dq_ref = R.mse_dequantize(rc, rn, codec.rotation, codec.value_centroids, vb)
        q = torch.randn(3, 6, d)
        krec = R.encode_keys(torch.randn(3, 70, d), codec.rotation, codec.qjl_projection,
                             codec.key_centroids, kb, qjl)
        sc = torch.ops.turboquant.key_scores(q.cuda(), krec.cuda(), cg.rotation, cg.qjl_projection,
                                             cg.key_centroids, kb, qjl).cpu()
        sc_ref = R.key_scores(q, krec, codec.rotation, codec.qjl_projection, codec.key_centroids,
                              kb, qjl)
        m = dict(rotate=e1 / float(x.abs().max()), unrotate=e2 / float(x.abs().max()),
                 sign_tie=srel, gamma=float(((g1.cpu() - g2).abs() / g2).max()),
                 dequantize=float((dq - dq_ref).abs().max() / dq_ref.abs().max()),
                 key_scores=float((sc - sc_ref).abs().max() / sc_ref.abs().max()))
        res[f"{fmt}/codec"] = m
        ok &= (m["sign_tie"] <= SIGN_TIE and max(m["rotate"], m["unrotate"], m["gamma"],
                                                  m["dequantize"], m["key_scores"]) <= F32_RTOL)
    # write_raw: strided K/V (fused qkv rows) into a NaN-poisoned pool of every dtype, a padding
    # token skipped; a copy or a round-to-nearest cast, so bit-identical to the reference
    hkv, t = 3, 9
    rows = torch.tensor([2, 0, 1, 2, 0, 1, 2, 3, 3])
    rslots = torch.tensor([0, 3, 1, 1, 2, 0, 0, 4, 2])
    paged = torch.tensor([5, 9, 0, 7, 3, 2, -1, 11, 4], dtype=torch.int32)
    same = True
    for src in (torch.float16, torch.bfloat16, torch.float32):
        for dst in (torch.float16, torch.bfloat16, torch.float32):
            qkv = torch.randn(t, 5 + 2 * hkv, d).to(src)
            k, v = qkv[:, 5:5 + hkv], qkv[:, 5 + hkv:]
            pools = [torch.full((4, 6, hkv, d), float("nan"), dtype=dst) for _ in range(2)]
            gpu = [p.cuda() for p in pools]
            torch.ops.turboquant.write_raw(k.cuda(), v.cuda(), gpu[0], gpu[1], rows.cuda(),
                                           rslots.cuda(), paged.cuda())
            R.write_raw(k, v, pools[0], pools[1], rows, rslots, paged)
            for got, want in zip(gpu, pools):
                got = got.cpu()
                same &= bool(torch.equal(got.isnan(), want.isnan())
                             and torch.equal(got.nan_to_num(), want.nan_to_num()))
    res["write_raw_equal"] = same
    ok &= same
    res["ok"] = bool(ok)
    return res


def run_opcheck(c: dict) -> dict:
    from tq_ops import TQCodec, preset

    cfg = preset("seed", head_dim=64)
    cg = TQCodec.build(cfg, "cuda")
    d, kb, qjl, vb = 64, 2, True, 3
    lay = cfg.layout
    dev = "cuda"
    x = torch.randn(3, 4, d, device=dev, dtype=torch.float16)
    rec = torch.ops.turboquant.encode_keys(x, cg.rotation, cg.qjl_projection, cg.key_centroids,
                                           kb, qjl)
    vrec = torch.ops.turboquant.encode_values(x, cg.rotation, cg.value_centroids, vb)
    codes, norms = torch.ops.turboquant.mse_quantize(x, cg.rotation, cg.value_centroids, vb)
    bs, hkv = 16, 2
    cache = torch.zeros(6, hkv, bs * lay.slot_bytes, dtype=torch.uint8, device=dev)
    bt = torch.arange(6, dtype=torch.int32, device=dev).reshape(2, 3)
    lens = torch.tensor([5, 40], dtype=torch.int32, device=dev)
    rk = torch.randn(2, 4, hkv, d, device=dev, dtype=torch.float16)
    ridx = torch.tensor([1, 0], dtype=torch.int32, device=dev)
    rl = torch.tensor([2, 0], dtype=torch.int32, device=dev)
    kv = torch.randn(9, hkv, d, device=dev, dtype=torch.float16)
    slots = torch.tensor([0, 1, 2, 3, 4, 16, 17, 18, -1], dtype=torch.int32, device=dev)
    samples = {
        "rotate": (x, cg.rotation), "unrotate": (x, cg.rotation),
        "mse_quantize": (x, cg.rotation, cg.value_centroids, vb),
        "mse_dequantize": (codes, norms, cg.rotation, cg.value_centroids, vb),
        "qjl_sketch": (x, cg.qjl_projection),
        "encode_keys": (x, cg.rotation, cg.qjl_projection, cg.key_centroids, kb, qjl),
        "encode_values": (x, cg.rotation, cg.value_centroids, vb),
        "key_scores": (x, rec, cg.rotation, cg.qjl_projection, cg.key_centroids, kb, qjl),
        "write_cache": (kv, kv, cache, slots, cg.rotation, cg.qjl_projection, cg.key_centroids,
                        cg.value_centroids, kb, qjl, vb),
        "paged_decode_attention": (torch.randn(2, 4, d, device=dev, dtype=torch.float16), cache,
                                   bt, lens, rk, rk, ridx, rl, cg.rotation, cg.qjl_projection,
                                   cg.key_centroids, cg.value_centroids, kb, qjl, vb, 0.125, 0),
        "paged_prefill_attention": (torch.randn(5, 4, d, device=dev, dtype=torch.float16),
                                    kv[:5], kv[:5], torch.tensor([0, 2, 5], dtype=torch.int32,
                                                                 device=dev),
                                    cache, bt, lens, rk, rk, ridx, rl, cg.rotation,
                                    cg.qjl_projection, cg.key_centroids, cg.value_centroids, kb,
                                    qjl, vb, 0.125, 0),
        "paged_dequantize": (cache, bt, lens, torch.tensor([0, 5], dtype=torch.int32,
                                                           device=dev), 45, cg.rotation,
                             cg.qjl_projection, cg.key_centroids, cg.value_centroids, kb, qjl,
                             vb, 0, torch.float16),
        "attention": (torch.randn(2, 4, d, device=dev, dtype=torch.float16), rec[0, :3, None]
                      .expand(3, 2, -1).contiguous(), vrec[0, :3, None].expand(3, 2, -1)
                      .contiguous(), rk[0, :1], rk[0, :1], rk[0, :2], rk[0, :2], cg.rotation,
                      cg.qjl_projection, cg.key_centroids, cg.value_centroids, kb, qjl, vb, 0.125,
                      True),
    }
    dk, dv = torch.ops.turboquant.paged_dequantize(*samples["paged_dequantize"])
    samples["paged_prefill_attention (decoded)"] = samples["paged_prefill_attention"] + (
        dk, dv, torch.tensor([0, 5], dtype=torch.int32, device=dev))
    pre = samples["paged_prefill_attention"]
    samples["paged_prefill_prefix"] = (pre[0], pre[3], cache, bt, lens, *pre[11:20])
    po, pl = torch.ops.turboquant.paged_prefill_prefix(*samples["paged_prefill_prefix"])
    samples["paged_prefill_prefix (decoded, prior)"] = samples["paged_prefill_prefix"] + (
        dk, dv, torch.tensor([0, 5], dtype=torch.int32, device=dev), po, pl)
    samples["paged_prefill_attention (decoded, prior)"] = samples[
        "paged_prefill_attention (decoded)"] + (po, pl)
    res = {"name": c["name"]}
    ok = True
    for name, args in samples.items():
        try:
            r = torch.library.opcheck(getattr(torch.ops.turboquant, name.split()[0]).default,
                                      args, raise_exception=False)
            bad = {k: str(v)[:300] for k, v in r.items() if v != "SUCCESS"}
            res[name] = bad or "SUCCESS"
            ok &= not bad
        except Exception as e:  # noqa: BLE001 - report, do not hide
            res[name] = f"{type(e).__name__}: {e}"[:300]
            ok = False
    res["ok"] = bool(ok)
    return res


def compiled_variants(kernel) -> int:
    """How many variants of a Triton kernel this process has compiled for the current device
    (its JIT cache: a new entry is a compile)."""
    return len(kernel.device_caches[torch.cuda.current_device()][0])


def run_recompile_check(c: dict) -> dict:
    """Serving changes token counts, sequence and split counts, and the offsets of sliced
    metadata from step to step; none of that may compile a new kernel variant (a mid-serving
    compile stalls a step for seconds: tq_ops.triton.launch).  Each op runs once, the compiled
    variants of every kernel are counted, the ops run again with other counts and with metadata
    slices at 4- and 8-byte offsets, and the counts must not change."""
    from tq_ops import TQCodec, preset
    from tq_ops.triton import decode as KD
    from tq_ops.triton import dequant as KQ
    from tq_ops.triton import encode as KE
    from tq_ops.triton import prefill as KP

    kernels = dict(prep=KD.query_prep_kernel, split=KD.decode_split_kernel,
                   merge=KD.decode_merge_kernel, merge_fallback=KD.decode_merge_fallback_kernel,
                   prefill=KP.prefill_kernel,
                   encode=KE.encode_kernel, encode_pair=KE.encode_pair_kernel,
                   dequantize=KQ.dequantize_pages_kernel)

    def variants():
        return {k: compiled_variants(fn) for k, fn in kernels.items()}

    torch.manual_seed(1)
    cfg = preset("seed", head_dim=128)
    cg = TQCodec.build(cfg, "cuda")
    hq, hkv, d, bs = 32, 8, 128, 16
    nblocks, mb = 200, 24
    cache = torch.randint(0, 256, (nblocks, hkv, bs * cfg.layout.slot_bytes), dtype=torch.uint8,
                          device="cuda")
    mats = (cg.rotation, cg.qjl_projection, cg.key_centroids, cg.value_centroids)
    fmt = (cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits)
    raw = torch.randn(8, 40, hkv, d, device="cuda", dtype=torch.float16)
    ints = lambda xs: torch.tensor(xs, dtype=torch.int32, device="cuda")  # noqa: E731

    def packed(*parts, shift=0):
        # int32 views at element offsets that follow the part lengths, as tq_vllm's segment plan
        # packs them (so their 16-byte alignment depends on the counts)
        flat = [0] * shift
        offs = []
        for part in parts:
            offs.append(len(flat))
            flat += list(part)
        buf = ints(flat)
        return [buf[o:o + len(p)] for o, p in zip(offs, parts)]

    def run(tokens, seqs, shift):
        slots_all = torch.randperm(nblocks * bs, device="cuda").to(torch.int32)
        kv = torch.randn(tokens, hkv, d, device="cuda", dtype=torch.float16)
        # a decode-sized write (pair kernel) and a bulk one, slot slices at odd offsets
        torch.ops.turboquant.write_cache(kv, kv, cache, slots_all[shift:shift + tokens], *mats,
                                         *fmt)
        big = torch.randn(129 + tokens, hkv, d, device="cuda", dtype=torch.float16)
        torch.ops.turboquant.write_cache(big, big, cache, slots_all[1 + shift:130 + shift + tokens],
                                         *mats, *fmt)
        bt = torch.randperm(nblocks, device="cuda")[:seqs * mb].reshape(seqs, mb).to(torch.int32)
        lens = [50 + 37 * i for i in range(seqs)]
        q = torch.randn(seqs, hq, d, device="cuda", dtype=torch.float16)
        kv_lens, raw_lens, raw_idx = packed(lens, [3] * seqs, list(range(seqs)), shift=shift)
        torch.ops.turboquant.paged_decode_attention(q, cache, bt, kv_lens, raw, raw, raw_idx,
                                                    raw_lens, *mats, *fmt, d ** -0.5, 0)
        cu = [0]
        for i in range(seqs):
            cu.append(cu[-1] + tokens + i)
        t = cu[-1]
        qs = torch.randn(t, hq, d, device="cuda", dtype=torch.float16)
        ks = torch.randn(t, hkv, d, device="cuda", dtype=torch.float16)
        cu_t, prefix, pool, idx = packed(cu, lens, [2] * seqs, list(range(seqs)), shift=shift)
        torch.ops.turboquant.paged_prefill_attention(qs, ks, ks, cu_t, cache, bt, prefix, raw,
                                                     raw, idx, pool, *mats, *fmt, d ** -0.5, 0)
        # the decoded path: rows packed per sequence, offsets sliced like the plan's
        (offs,) = packed([sum(lens[:i]) for i in range(seqs)], shift=shift)
        dk, dv = torch.ops.turboquant.paged_dequantize(cache, bt, prefix, offs, sum(lens), *mats,
                                                       *fmt, 0, torch.float16)
        torch.ops.turboquant.paged_prefill_attention(qs, ks, ks, cu_t, cache, bt, prefix, raw,
                                                     raw, idx, pool, *mats, *fmt, d ** -0.5, 0,
                                                     dk, dv, offs)
        torch.cuda.synchronize()

    run(8, 1, 0)
    first = variants()
    for tokens, seqs, shift in ((5, 2, 1), (13, 3, 2), (3, 5, 3), (1, 7, 1)):
        run(tokens, seqs, shift)
    after = variants()
    return {"name": c["name"], "ok": first == after, "variants_first": first,
            "variants_after": after}


def run_write_warm_check(c: dict) -> dict:
    """tq_ops.ops.write_cache.warm_up_write_cache as the vLLM backend calls it (bf16 K/V, int64
    slots, the codec's exact16 declaration, 16384 tokens, 128-token pages): it stores nothing
    (a poisoned cache keeps its bytes), and afterwards writes of any size up to the limit
    compile no kernel variant (each size on each side of a variant's first size, and random
    sizes, with fresh random K/V into distinct random slots)."""
    import importlib

    from tq_ops import TQCodec, preset
    from tq_ops.codec import exact16_matrices
    from tq_ops.triton import encode as KE

    W = importlib.import_module("tq_ops.ops.write_cache")
    kernels = (KE.encode_kernel, KE.encode_pair_kernel)

    def variants():
        return [compiled_variants(fn) for fn in kernels]

    torch.manual_seed(2)
    cfg = preset("seed", head_dim=128)
    cg = TQCodec.build(cfg, "cuda")
    exact = exact16_matrices(cg.rotation, cg.qjl_projection)
    hkv, d, bs, max_tokens = 8, 128, 128, 16384
    nblocks = max_tokens // bs + 1
    cache = torch.randint(0, 256, (nblocks, hkv, bs * cfg.layout.slot_bytes), dtype=torch.uint8,
                          device="cuda")
    before = cache.clone()
    mats = (cg.rotation, cg.qjl_projection, cg.key_centroids, cg.value_centroids)
    fmt = (cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits)
    first = variants()
    tokens = W.warm_up_write_cache(cache, *mats, *fmt, exact, max_tokens, torch.bfloat16,
                                   torch.int64)
    torch.cuda.synchronize()
    unchanged = bool(torch.equal(cache, before))
    warm = variants()
    sizes = sorted({max(1, min(max_tokens, t + o)) for t in tokens for o in (-1, 0, 1)}
                   | {int(x) for x in torch.randint(1, max_tokens + 1, (12,))} | {max_tokens})
    for t in sizes:
        kv = torch.randn(2, t, hkv, d, device="cuda", dtype=torch.bfloat16)
        slots = torch.randperm(nblocks * bs, device="cuda")[:t].to(torch.int64)
        torch.ops.turboquant.write_cache(kv[0], kv[1], cache, slots, *mats, *fmt, exact)
    torch.cuda.synchronize()
    after = variants()
    return {"name": c["name"], "ok": unchanged and after == warm and len(tokens) >= 3,
            "warm_up_tokens": list(tokens), "sizes_written": sizes, "cache_unchanged": unchanged,
            "variants_before": first, "variants_after_warm_up": warm, "variants_after": after}


def picked_cases(only: str) -> list[dict]:
    return [c for c in cases() if not only or any(o in c["name"] for o in only.split(","))]


def worker(index: int, count: int, only: str = "") -> None:
    picked = picked_cases(only)
    for i, c in enumerate(picked):
        if i % count != index:
            continue
        t0 = time.time()
        try:
            if c.get("codec_ops"):
                r = run_codec_ops(c)
            elif c.get("opcheck"):
                r = run_opcheck(c)
            elif c.get("recompiles"):
                r = run_recompile_check(c)
            elif c.get("write_warm"):
                r = run_write_warm_check(c)
            else:
                r = run_attention_case(c)
        except Exception:  # noqa: BLE001 - a crash is a failed check, reported in full
            r = {"name": c["name"], "ok": False, "error": traceback.format_exc()[-3000:]}
        finally:
            # a case that stopped half-way leaves no patch to the next (run_attention_case)
            mock.patch.stopall()
        r["seconds"] = round(time.time() - t0, 1)
        print("RESULT " + json.dumps(r), flush=True)


# -- compile and graphs ------------------------------------------------------------------------

def _step_inputs(batch=4, ctx=300, bs=16, mb=64):
    from tq_ops import TQCodec, preset

    cfg = preset("seed", head_dim=128)
    cg = TQCodec.build(cfg, "cuda")
    lay = cfg.layout
    nblocks = batch * mb + 1
    torch.manual_seed(0)
    cache = torch.zeros(nblocks, 8, bs * lay.slot_bytes, dtype=torch.uint8, device="cuda")
    bt = (torch.randperm(nblocks - 1, device="cuda")[:batch * mb] + 1).reshape(batch, mb).to(torch.int32)
    for b in range(batch):
        pos = torch.arange(ctx, device="cuda")
        sl = bt[b, pos // bs].long() * bs + pos % bs
        kk = torch.randn(ctx, 8, 128, device="cuda", dtype=torch.float16)
        torch.ops.turboquant.write_cache(kk, kk * 0.5, cache, sl, cg.rotation, cg.qjl_projection,
                                         cg.key_centroids, cg.value_centroids, 2, True, 3)
    st = dict(
        q=torch.randn(batch, 32, 128, device="cuda", dtype=torch.float16),
        k_new=torch.randn(batch, 8, 128, device="cuda", dtype=torch.float16),
        v_new=torch.randn(batch, 8, 128, device="cuda", dtype=torch.float16),
        slots=(bt[:, ctx // bs].long() * bs + ctx % bs).to(torch.int32),
        cache=cache, bt=bt, lens=torch.full((batch,), ctx + 1, dtype=torch.int32, device="cuda"),
        raw_k=torch.randn(batch, 16, 8, 128, device="cuda", dtype=torch.float16),
        raw_index=torch.arange(batch, dtype=torch.int32, device="cuda"),
        raw_lens=torch.full((batch,), 5, dtype=torch.int32, device="cuda"))
    return st, cg


def decode_step(q, k_new, v_new, slots, cache, bt, lens, raw_k, raw_index, raw_lens, rot, proj,
                kc, vc):
    torch.ops.turboquant.write_cache(k_new, v_new, cache, slots, rot, proj, kc, vc, 2, True, 3)
    return torch.ops.turboquant.paged_decode_attention(q, cache, bt, lens, raw_k, raw_k,
                                                       raw_index, raw_lens, rot, proj, kc, vc, 2,
                                                       True, 3, 128 ** -0.5, 0)


def side_step(side, q, k_new, v_new, slots, cache, bt, lens, raw_k, raw_index, raw_lens, rot,
              proj, kc, vc):
    """decode_step as the vLLM backend runs it on CUDA: the write forked to a side stream
    (tq_vllm.attend.SideStream) beside a decode that attends positions below the new token's
    (lens - 1), then joined.  side=None runs the same launches in sequence."""
    ctx = side.fork(q.device) if side is not None else contextlib.nullcontext()
    with ctx:
        torch.ops.turboquant.write_cache(k_new, v_new, cache, slots, rot, proj, kc, vc, 2, True, 3)
    out = torch.ops.turboquant.paged_decode_attention(q, cache, bt, lens - 1, raw_k, raw_k,
                                                      raw_index, raw_lens, rot, proj, kc, vc, 2,
                                                      True, 3, 128 ** -0.5, 0)
    if side is not None:
        side.join()
    return out


def _merges_in_tiles(batch: int, positions: int) -> bool:
    """Whether the decode op's merge takes 16-row tiles for decode_step's shapes (8 KV heads,
    head_dim 128, 16-token pages), its split count as the op computes it on this GPU."""
    import importlib

    from tq_ops.triton.launch import arch, sm_count

    P = importlib.import_module("tq_ops.ops.paged_decode_attention")
    dev = torch.device("cuda")
    cfg = P.decode_config(arch(dev), 128, 2)
    ns = P.num_splits(batch, 8, positions, sm_count(dev), cfg, tile=P.page_tile(16, cfg, 128))
    return P.merge_tiles(ns, 128)


def graphs(which: str) -> None:
    # "-tiles": a block table of 32 pages (512 positions), few enough splits that the merge
    # takes 16-row tiles (paged_decode_attention.merge_tiles); otherwise 64 pages, one merge
    # program per row
    tiles = which.endswith("-tiles")
    which = which.removesuffix("-tiles")
    mb = 32 if tiles else 64
    st, cg = _step_inputs(mb=mb)
    consts = (cg.rotation, cg.qjl_projection, cg.key_centroids, cg.value_centroids)
    names = ("q", "k_new", "v_new", "slots", "cache", "bt", "lens", "raw_k", "raw_index",
             "raw_lens")
    res = {"name": f"graphs/{which}{'-tiles' if tiles else ''}",
           "merge_tiles": _merges_in_tiles(st["q"].shape[0], mb * 16)}
    if which == "compile":
        from torch._dynamo import explain, mark_static_address, reset
        from torch._dynamo.utils import counters

        args = [st[n] for n in names] + list(consts)
        eager_cache = st["cache"].clone()
        eager = decode_step(*[eager_cache if n == "cache" else st[n] for n in names], *consts)
        ex = explain(decode_step)(*[st[n].clone() if n == "cache" else st[n]
                                                  for n in names], *consts)
        res["graph_count"], res["graph_break_count"] = ex.graph_count, ex.graph_break_count
        reset()
        mark_static_address(st["cache"])
        f = torch.compile(decode_step, fullgraph=True, mode="reduce-overhead")
        counters.clear()
        outs = []
        for _ in range(4):
            outs.append(f(*args).clone())
        torch.cuda.synchronize()
        res["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
        err = float((outs[-1].float() - eager.float()).abs().max() / eager.float().abs().max())
        res["rel_err_vs_eager"] = err
        res["cache_equal_vs_eager"] = bool(torch.equal(st["cache"], eager_cache))
        res["ok"] = (res["graph_count"] == 1 and res["graph_break_count"] == 0
                     and res["cudagraph_skips"] == 0 and err <= 2.0 ** -10
                     and res["cache_equal_vs_eager"] and res["merge_tiles"] == tiles)
    else:
        # "capture": decode_step; "side": side_step, the backend's side-stream write
        if which == "side":
            from tq_vllm.attend import SideStream

            side = SideStream()
            side.prepare(torch.device("cuda"))
            step = functools.partial(side_step, side)
            reference_step = functools.partial(side_step, None)
        else:
            step = reference_step = decode_step
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        work = {n: (st[n].clone() if n == "cache" else st[n]) for n in names}
        with torch.cuda.stream(s):
            for _ in range(3):
                step(*[work[n] for n in names], *consts)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = step(*[st[n] for n in names], *consts)
        # next step: new query/K/V, next slot, a longer sequence 0 moved to other pages
        bs = 16
        new_bt = st["bt"].roll(1, dims=1)
        lens2 = st["lens"] + 1
        lens2[0] = 17
        slots2 = (new_bt[:, (lens2 - 1) // bs].diagonal().long() * bs + (lens2 - 1) % bs).to(torch.int32)
        ref_state = {n: st[n].clone() for n in names}
        updates = dict(q=torch.randn_like(st["q"]), k_new=torch.randn_like(st["k_new"]),
                       v_new=torch.randn_like(st["v_new"]), slots=slots2, bt=new_bt, lens=lens2,
                       raw_lens=torch.tensor([0, 16, 3, 1], dtype=torch.int32, device="cuda"))
        for n, val in updates.items():
            st[n].copy_(val)        # in place: the graph reads these addresses
            ref_state[n] = val.clone()
        g.replay()
        torch.cuda.synchronize()
        eager = reference_step(*[ref_state[n] for n in names], *consts)
        err = float((out.float() - eager.float()).abs().max() / eager.float().abs().max())
        res["rel_err_vs_eager"] = err
        res["cache_equal_vs_eager"] = bool(torch.equal(st["cache"], ref_state["cache"]))
        res["ok"] = err == 0.0 and res["cache_equal_vs_eager"] and res["merge_tiles"] == tiles
    print("RESULT " + json.dumps(res), flush=True)


# -- benchmarks --------------------------------------------------------------------------------

def kernel_breakdown(fn, reps: int = 20) -> dict:
    """GPU microseconds per call of each kernel `fn` launches (torch.profiler, eager launches
    after a warm-up): where an op's time goes between its launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per: dict = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            per[e.name[:60]] = per.get(e.name[:60], 0.0) + e.device_time / reps
    return {k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}


# (prefix, chunk, segment): session 3's chunk of 2048 over a 30k prefix as one sequence, and
# the second 16k chunk of a 32k prompt as tq_vllm runs it (128-token flush groups)
PREFILL_SHAPES = [(30720, 2048, 2048), (16384, 16384, 128)]
# decoded-variant launch configs (BLOCK_Q, num_warps, key tile, stages) timed beside the
# table's; 0 = the launcher's default
PREFILL_DECODED_CONFIGS = [(16, 4, 0, 2), (16, 4, 0, 3), (32, 8, 0, 2), (32, 8, 0, 0),
                           (32, 8, 0, 4), (32, 8, 128, 2), (64, 8, 0, 0)]


class BenchRows(list):
    """The bench phase's rows: each one printed as it is measured and bench.json rewritten, so
    a call cut short (the device machines end a command at 10 minutes) keeps what it timed."""

    def __init__(self, out_dir: str | None):
        super().__init__()
        self.out_dir = out_dir

    def emit(self, row: dict) -> None:
        self.append(row)
        print("BENCH " + json.dumps(row), flush=True)
        if self.out_dir:
            with open(os.path.join(self.out_dir, "bench.json"), "w") as f:
                json.dump(list(self), f, indent=1)


def prefill_benchmarks(rows: BenchRows) -> BenchRows:
    """Prefill over a compressed prefix, ms: the op reading the pages (compressed), the decoded
    path (paged_dequantize once + the op over its output, and the op alone at each of
    PREFILL_DECODED_CONFIGS), and flash SDPA over fp16 K/V of the same request."""
    import common as C
    from tq_ops.ops.paged_prefill_attention import launch as prefill_launch
    from tq_ops.triton.prefill import prefill_config

    for prefix, chunk, segment in PREFILL_SHAPES:
        case = C.prefill_case(prefix, chunk, segment)
        sd_ms = C.gpu_ms(C.sdpa_prefill_case(prefix, chunk), rep=100)
        op = torch.ops.turboquant
        comp = lambda: op.paged_prefill_attention(*case.args)  # noqa: E731

        def decoded():
            dk, dv = op.paged_dequantize(*case.dequant_args)
            return op.paged_prefill_attention(*case.args, dk, dv, case.dstart)
        dk, dv = op.paged_dequantize(*case.dequant_args)
        want, got = comp().float(), decoded().float()
        row = dict(kind="prefill", prefix=prefix, chunk=chunk, segment=segment, sdpa_ms=sd_ms,
                   compressed_ms=C.gpu_ms(comp, rep=100), decoded_ms=C.gpu_ms(decoded, rep=100),
                   dequantize_ms=C.gpu_ms(lambda: op.paged_dequantize(*case.dequant_args)),
                   decoded_rel_err=float((got - want).abs().max() / want.abs().max()),
                   table_config=list(prefill_config(C.HEAD_DIM, True, C.HQ // C.HKV)),
                   configs={})
        for bq, w, bn, st in PREFILL_DECODED_CONFIGS:
            name = f"{bq}/{w}" + (f"/n{bn}" if bn else "") + (f"/s{st}" if st else "")
            try:
                row["configs"][name] = C.gpu_ms(lambda: prefill_launch(
                    *case.args, dk, dv, case.dstart, block_q=bq, num_warps=w,
                    block_n=bn or None, num_stages=st or None), rep=100)
            except Exception as e:  # a config that fails to compile is reported, not fatal
                row["configs"][name] = f"{type(e).__name__}: {str(e)[:200]}"
        del case, dk, dv
        torch.cuda.empty_cache()
        rows.emit(row)
    return rows


def benchmarks(out_dir: str | None, sustain_s: float = 0.0, prefill: bool = True) -> BenchRows:
    """The decode table, encode throughput and a decode step's write, then the decode variants
    and (prefill) the prefill rows, the longest part: the issue's rows come first.  sustain_s
    > 0 runs each timed function back to back for that long before its timing (C.keep_busy),
    so ours and SDPA are both timed at the clocks of a busy card; every decode row records the
    SM clock read right after its timing."""
    import common as C

    rows = BenchRows(out_dir)
    bw = C.copy_bandwidth()
    rows.emit(dict(kind="copy", bw=bw))
    for batch, ctx in C.DECODE_SHAPES:
        sd, sd_name = C.sdpa_case(batch, ctx)
        if sustain_s:
            C.keep_busy(sd, sustain_s)
        sd_ms = C.gpu_ms(sd)
        sd_clock = C.sm_clock()
        del sd
        torch.cuda.empty_cache()
        for bs in (16, 64):
            case = C.decode_case(batch, ctx, block_size=bs)
            if sustain_s:
                C.keep_busy(case.run, sustain_s)
            ms = C.gpu_ms(case.run)
            clock = C.sm_clock()
            # the op as the vLLM backend calls it: built-in codebooks declared, so the merge
            # skips its codebook check (timed right after the default)
            declared_ms = C.gpu_ms(lambda: torch.ops.turboquant.paged_decode_attention(
                *case.args, True))
            del case.run
            torch.cuda.empty_cache()
            floor_ms = case.bytes_read / bw * 1e3
            rows.emit(dict(kind="decode", batch=batch, ctx=ctx, bs=bs, ms=ms, sdpa_ms=sd_ms,
                           sdpa=sd_name, speedup=sd_ms / ms, floor_ms=floor_ms,
                           pct_copy=floor_ms / ms * 100, bytes=case.bytes_read,
                           sdpa_pct_copy=case.fp16_bytes / bw * 1e3 / sd_ms * 100,
                           clock=clock, sdpa_clock=sd_clock, sustain_s=sustain_s,
                           declared_ms=declared_ms))
    # the op's default, then exact16_matrices=True (the vLLM backend's call)
    for declared in (False, True):
        run, nbytes = C.encode_case(declared=declared)
        ms = C.gpu_ms(run, rep=300)
        rows.emit(dict(kind="encode", ms=ms, tbps=nbytes / ms * 1e-9, tokens=C.ENCODE_TOKENS,
                       declared=declared))
        del run
        # a decode step's write at batch 8: latency, not throughput
        run, _ = C.encode_case(tokens=8, declared=declared)
        ms = C.gpu_ms(run, rep=300)
        rows.emit(dict(kind="encode_small", ms=ms, tokens=8, declared=declared))
    # 32-token pages (vLLM's block size when TQ_FLUSH_INTERVAL is 32): 64-token tiles of two
    # pages (tq_ops.triton.decode.page_tile), the page-64 row of the same shape above
    case = C.decode_case(8, 32768, block_size=32)
    if sustain_s:
        C.keep_busy(case.run, sustain_s)
    ms = C.gpu_ms(case.run)
    del case.run
    torch.cuda.empty_cache()
    rows.emit(dict(kind="decode_page32", batch=8, ctx=32768, bs=32, ms=ms, clock=C.sm_clock()))
    # vLLM's decode steps attend over the flush buffer's exact tokens too (1..128 per sequence)
    case = C.decode_case(8, 32768, block_size=64, raw_tokens=64)
    ms = C.gpu_ms(case.run)
    kernels = kernel_breakdown(case.run)
    del case.run
    rows.emit(dict(kind="decode_raw", batch=8, ctx=32768, bs=64, raw_tokens=64, ms=ms,
                   kernels=kernels))
    if prefill:
        prefill_benchmarks(rows)
    return rows


def run_check_processes(cmds: list[list[str]], env: dict, out_dir: str | None,
                        t0: float) -> list[dict]:
    """Runs the check processes side by side and returns their results.  Each result is printed
    (a CHECK line) and checks.json rewritten the moment it arrives: a call cut short by its
    time limit still reports every check that finished (session 26 lost a whole 400 s run
    printed only at the end).  A process that exits non-zero or reports nothing adds a failed
    result with the tail of its stderr."""
    import tempfile
    import threading

    results: list[dict] = []
    lock = threading.Lock()

    def add(r: dict) -> None:
        with lock:
            results.append(r)
            print(f"CHECK {'ok  ' if r.get('ok') else 'FAIL'} {r['name']} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            if out_dir:
                with open(os.path.join(out_dir, "checks.json"), "w") as f:
                    json.dump(results, f, indent=1)

    def follow(cmd: list[str]) -> None:
        # stderr to a file: a pipe nobody reads would block a chatty process
        with tempfile.TemporaryFile(mode="w+") as err:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            got = 0
            for line in p.stdout:
                if line.startswith("RESULT "):
                    add(json.loads(line[7:]))
                    got += 1
            p.wait()
            if p.returncode != 0 or not got:
                err.seek(0)
                add({"name": " ".join(cmd[2:]), "ok": False, "rc": p.returncode,
                     "stderr": err.read()[-3000:]})

    threads = [threading.Thread(target=follow, args=(c,)) for c in cmds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", type=str)
    ap.add_argument("--graphs", type=str)
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--out", type=str, default=os.environ.get("OUT"))
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--prefill-bench-only", action="store_true",
                    help="bench: only the prefill rows")
    ap.add_argument("--skip-prefill-bench", action="store_true",
                    help="bench: no prefill rows (the decode table, encode and decode variants)")
    ap.add_argument("--sustain", type=float, default=0.0, metavar="SECONDS",
                    help="bench: keep the card busy with each timed function this long before "
                         "timing it (serving-like clocks; 0 = time a cool card at once)")
    ap.add_argument("--only", type=str, default="",
                    help="comma-separated name substrings: run only those checks")
    a = ap.parse_args()
    if a.worker:
        i, n = map(int, a.worker.split("/"))
        worker(i, n, a.only)
        return
    if a.graphs:
        graphs(a.graphs)
        return
    t0 = time.time()
    env = dict(os.environ)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    results = []
    if not a.skip_checks:
        # no more workers than cases: a worker that reports nothing counts as crashed
        n = min(a.workers, len(picked_cases(a.only)))
        cmds = [[sys.executable, HERE, "--worker", f"{i}/{n}", "--only", a.only]
                for i in range(n)]
        cmds += [[sys.executable, HERE, "--graphs", w]
                 for w in ("compile", "capture", "side", "compile-tiles", "capture-tiles")
                 if not a.only or "graphs" in a.only]
        results = run_check_processes(cmds, env, a.out, t0)
        for r in results:
            if not r.get("ok"):
                print("FAILED", json.dumps(r)[:3000])
    t_checks = time.time() - t0
    if a.skip_bench:
        rows = []
    elif a.prefill_bench_only:
        import common as C
        rows = BenchRows(a.out)
        rows.emit(dict(kind="copy", bw=C.copy_bandwidth()))
        prefill_benchmarks(rows)
    else:
        rows = benchmarks(a.out, a.sustain, prefill=not a.skip_prefill_bench)
    # -- the table, last
    dev = torch.cuda.get_device_name()
    print()
    print(f"card: {dev}; torch {torch.__version__}; date {datetime.date.today()}; "
          f"command: PYTHONPATH=. python perf/gpu_check.py")
    if results:
        npass = sum(bool(r.get("ok")) for r in results)
        print(f"checks: {npass}/{len(results)} passed ({t_checks:.0f} s)")
        for r in results:
            print(f"  {'ok  ' if r.get('ok') else 'FAIL'} {r['name']}"
                  + (f"  decode {r['decode_rel_err']:.1e} prefill {r['prefill_rel_err']:.1e}"
                     f" dequantize {r['dequantize_rel_err']:.1e}"
                     f" (fp32 {r['dequantize_fp32_rel_err']:.1e}) prefill decoded "
                     f"{r['prefill_decoded_rel_err']:.1e} slabs "
                     + "/".join(f"{e:.1e}" for e in r.get("prefill_slabs_rel_err", []))
                     if "decode_rel_err" in r else ""))
    if rows:
        bw = rows[0]["bw"]
        print(f"copy bandwidth (read+write): {bw / 1e12:.2f} TB/s")
        print(f"decode, seed format (K 2+1 bit, V 3 bit), 32/8 heads, D=128; "
              f"baseline {next((r['sdpa'] for r in rows if r['kind'] == 'decode'), '-')}")
        print(f"(each timing after {a.sustain:g} s of back-to-back runs of the same function; "
              f"SM MHz read right after it)" if a.sustain else
              "(timed at once, no sustained load before: a cool card's clocks; SM MHz read "
              "right after each timing)")
        print("(declared: the op with builtin_codebooks=True, as the vLLM backend calls it)")
        print(f"{'batch':>5} {'ctx':>7} {'block':>5} {'ours ms':>8} {'sdpa ms':>8} {'speedup':>7} "
              f"{'declared':>8} {'speedup':>7} "
              f"{'floor ms':>8} {'%copy':>6} {'sdpa %copy':>10} {'SM MHz':>6} {'sdpa MHz':>8}")
        for r in rows:
            if r["kind"] == "decode":
                mhz = (r.get("clock") or {}).get("sm_mhz", "?")
                sd_mhz = (r.get("sdpa_clock") or {}).get("sm_mhz", "?")
                print(f"{r['batch']:>5} {r['ctx']:>7} {r['bs']:>5} {r['ms']:>8.4f} {r['sdpa_ms']:>8.4f} "
                      f"{r['speedup']:>6.2f}x {r['declared_ms']:>8.4f} "
                      f"{r['sdpa_ms'] / r['declared_ms']:>6.2f}x "
                      f"{r['floor_ms']:>8.4f} {r['pct_copy']:>5.1f}% "
                      f"{r['sdpa_pct_copy']:>9.1f}% {mhz:>6} {sd_mhz:>8}")
        for r in rows:
            how = "declared exact16_matrices" if r.get("declared") else "default args"
            if r["kind"] == "encode":
                print(f"encode+write (seed, {r['tokens']} tokens x 8 heads, fp16 in, {how}): "
                      f"{r['ms']:.3f} ms, {r['tbps']:.2f} TB/s of fp16 input")
            elif r["kind"] == "encode_small":
                print(f"encode+write of {r['tokens']} tokens x 8 heads (a decode step's write, "
                      f"{how}): {r['ms'] * 1e3:.1f} us")
            elif r["kind"] == "prefill":
                cfgs = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} failed"
                                 for k, v in r["configs"].items())
                print(f"prefill, {r['chunk']} queries in segments of {r['segment']} over "
                      f"{r['prefix']} compressed: sdpa {r['sdpa_ms']:.3f} ms, compressed "
                      f"{r['compressed_ms']:.3f} ms ({r['compressed_ms'] / r['sdpa_ms']:.2f}x "
                      f"sdpa), decoded {r['decoded_ms']:.3f} ms "
                      f"({r['decoded_ms'] / r['sdpa_ms']:.2f}x sdpa; dequantize "
                      f"{r['dequantize_ms']:.3f}; rel. diff {r['decoded_rel_err']:.1e})")
                print(f"  decoded op alone by BLOCK_Q/warps[/key tile][/stages], table {r['table_config']}: "
                      + cfgs)
            elif r["kind"] == "decode_page32":
                print(f"decode ({r['batch']}, {r['ctx']}), page 32 (64-token tiles of 2 pages): "
                      f"{r['ms']:.4f} ms")
            elif r["kind"] == "decode_raw":
                print(f"decode ({r['batch']}, {r['ctx']}), page {r['bs']}, with {r['raw_tokens']} "
                      f"exact raw tokens per sequence: {r['ms']:.4f} ms")
                print("  its kernels (us per call, eager, torch.profiler): " + ", ".join(
                    f"{k} {v}" for k, v in r.get("kernels", {}).items()))


if __name__ == "__main__":
    main()
