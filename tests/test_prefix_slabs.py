"""A compressed prefix attended in slabs (turboquant::paged_prefill_prefix, then
paged_prefill_attention with the prior) is the prefix attended whole, on CPU; clear errors for
inconsistent prior arguments.  The kernel's variants are checked in test_kernels_interpret.py
(interpreter) and perf/gpu_check.py (GPU)."""
from __future__ import annotations

import pytest
import torch

from helpers import decoded_prefix
from op_samples import samples
from tq_ops._checks import TQInputError

tq = torch.ops.turboquant


def _in_slabs(args, bounds, decoded):
    """args' prefill with its compressed positions cut at `bounds` (increasing, past kv_start):
    the slabs past the first through paged_prefill_prefix, each the prior of the one before,
    then the first slab, raw pool and chunk through paged_prefill_attention."""
    (q, k, v, cu, cache, table, prefix, rk, rv, ridx, rl, rot, proj, kc, vc, kb, qjl, vb, scale,
     kv0) = args
    dec = decoded_prefix(args, torch.float32) if decoded else None
    prior = ()
    edges = [kv0, *bounds, int(prefix.max()) + 1]
    for lo, hi in reversed(list(zip(edges[1:-1], edges[2:]))):
        lens = prefix.clamp(min=lo, max=hi)
        # the same decoded rows, entered at the slab's first position
        extra = (dec[0], dec[1], dec[2] + (lo - kv0)) if decoded else (None, None, None)
        prior = tq.paged_prefill_prefix(q, cu, cache, table, lens, rot, proj, kc, vc, kb, qjl, vb,
                                        scale, lo, *extra, *prior)
    first = prefix.clamp(max=edges[1])
    extra = dec if decoded else (None, None, None)
    return tq.paged_prefill_attention(q, k, v, cu, cache, table, first, rk, rv, ridx, rl, rot,
                                      proj, kc, vc, kb, qjl, vb, scale, kv0, *extra, *prior)


@pytest.mark.parametrize("decoded", [False, True], ids=["pages", "decoded"])
@pytest.mark.parametrize("bounds", [[3], [2, 4], [5]], ids=["one-cut", "two-cuts", "cut-at-end"])
@pytest.mark.parametrize("i", [0, 3], ids=["d64-k2q1v3-fp32", "d96-k3v2-fp16"])
def test_slabs_are_the_whole_prefix(i, bounds, decoded):
    # the samples' prefixes are 5, 0 and 3 positions from kv_start 1: cuts inside both, at a
    # sequence's end, and past one (an empty slab for it)
    args = samples("paged_prefill_attention")[i][:20]
    whole = args if not decoded else args + decoded_prefix(args, torch.float32)
    want = tq.paged_prefill_attention(*whole).float()
    got = _in_slabs(args, bounds, decoded).float()
    # fp32 partials merged in fp32; an fp16 output's final rounding may land one ulp apart
    ulp = 2.0 ** -10 if args[0].dtype == torch.float16 else 0.0
    assert (got - want).abs().max() <= (1e-5 + ulp) * want.abs().max()


def test_prefix_without_keys_is_empty():
    args = samples("paged_prefill_prefix")[0]
    q, cu, cache, table, lens = args[:5]
    out, lse = tq.paged_prefill_prefix(q, cu, cache, table, torch.zeros_like(lens), *args[5:])
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    # a prior alone comes back unchanged
    po, pl = torch.randn_like(out), torch.randn_like(lse)
    out, lse = tq.paged_prefill_prefix(q, cu, cache, table, torch.zeros_like(lens), *args[5:],
                                       None, None, None, po, pl)
    torch.testing.assert_close(out, po)
    torch.testing.assert_close(lse, pl)


def test_prefix_lse_is_the_log_partition():
    # lse = log sum exp(scale q . k) over the keys: one key of value v gives out = v
    args = samples("paged_prefill_prefix")[0]
    q, cu, cache, table, lens, rot, proj, kc, vc, kb, qjl, vb, scale, kv0 = args
    one = torch.where(lens > kv0, kv0 + 1, 0).to(torch.int32)
    out, lse = tq.paged_prefill_prefix(q, cu, cache, table, one, rot, proj, kc, vc, kb, qjl, vb,
                                       scale, kv0)
    seq = torch.searchsorted(cu[1:].long(), torch.arange(q.shape[0]), right=True)
    has = one[seq] > 0
    assert torch.isfinite(lse[has]).all() and torch.isneginf(lse[~has]).all()
    # two queries of the same sequence attend the same single key: the same value
    assert has[0] and has[1] and seq[0] == seq[1]
    torch.testing.assert_close(out[0], out[1])


def test_prior_arguments_go_together():
    args = list(samples("paged_prefill_attention")[2])
    base, (dk, dv, start, po, pl) = args[:20], args[20:]
    with pytest.raises(TQInputError, match="prior_out and prior_lse go together"):
        tq.paged_prefill_attention(*base, dk, dv, start, po, None)
    with pytest.raises(TQInputError, match="prior_lse must be"):
        tq.paged_prefill_attention(*base, dk, dv, start, po, pl[:, :-1])
    with pytest.raises(TQInputError, match="prior_out must be.*float16 or bfloat16"):
        tq.paged_prefill_attention(*base, dk, dv, start, po.double(), pl)
    with pytest.raises(TQInputError, match="prior_out must be"):
        tq.paged_prefill_attention(*base, dk, dv, start, po[:, :-1], pl)
    with pytest.raises(TQInputError, match="prior_lse must be.*float32"):
        tq.paged_prefill_attention(*base, dk, dv, start, po, pl.half())
    # 16-bit values are valid (FlashAttention's partial, tq_vllm), and give the fp32 result
    # up to their rounding
    p16 = tq.paged_prefill_attention(*base, dk, dv, start, po.half(), pl)
    p32 = tq.paged_prefill_attention(*base, dk, dv, start, po.float(), pl)
    torch.testing.assert_close(p16.float(), p32.float(), rtol=0,
                               atol=2.0 ** -11 * float(po.float().nan_to_num().abs().max()))
    pargs = samples("paged_prefill_prefix")[1]
    with pytest.raises(TQInputError, match="prior_out and prior_lse go together"):
        tq.paged_prefill_prefix(*pargs[:17], None, pargs[18])
