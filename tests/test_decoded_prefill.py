"""The decoded-prefix path of paged_prefill_attention (turboquant::paged_dequantize's output as
the compressed prefix) on CPU: the same attention as reading the pages, and clear errors for
inconsistent arguments.  The Triton kernels of both are checked in test_kernels_interpret.py
(interpreter) and perf/gpu_check.py (GPU)."""
from __future__ import annotations

import pytest
import torch

from helpers import decoded_prefix
from op_samples import samples
from tq_ops import reference as R
from tq_ops._checks import TQInputError

tq = torch.ops.turboquant
KV_START = 1  # the samples' kv_start


@pytest.mark.parametrize("i", [0, 3], ids=["d64-k2q1v3-fp32", "d96-k3v2-fp16"])
def test_decoded_prefix_is_the_compressed_prefix(i):
    # fp32 decoded K/V: the same logits and values as the pages give, up to fp32 reordering;
    # an fp16 output's final rounding may then land one ulp (2^-10 relative) apart
    args = samples("paged_prefill_attention")[i][:20]
    want = tq.paged_prefill_attention(*args).float()
    got = tq.paged_prefill_attention(*args, *decoded_prefix(args, torch.float32)).float()
    ulp = 2.0 ** -10 if args[0].dtype == torch.float16 else 0.0
    assert (got - want).abs().max() <= (1e-5 + ulp) * want.abs().max()


def test_dequantize_matches_decode_keys_and_values():
    args = samples("paged_dequantize")[0]
    cache, table, lens, offsets, n, rot, proj, kc, vc, kb, qjl, vb, kv0, dtype = args
    dk, dv = tq.paged_dequantize(*args)
    keys, values = R.gather_pages(cache, table, rot.shape[0], kb, qjl, vb)
    for r in range(table.shape[0]):
        for p in range(kv0, int(lens[r])):
            row = int(offsets[r]) + p - kv0
            # the same fp32 products, batched differently
            k = R.decode_keys(keys[r, p], rot, proj, kc, kb, qjl)
            v = R.decode_values(values[r, p], rot, vc, vb)
            assert (dk[row].float() - k).abs().max() <= 1e-6 * k.abs().max()
            assert (dv[row].float() - v).abs().max() <= 1e-6 * v.abs().max()
    covered = sum(max(0, int(x) - kv0) for x in lens)
    assert covered == n and dk.shape[0] == n


def test_decoded_arguments_go_together():
    args = list(samples("paged_prefill_attention")[1])
    base, (dk, dv, start) = args[:20], args[20:]
    with pytest.raises(TQInputError, match="go together"):
        tq.paged_prefill_attention(*base, dk, None, start)
    with pytest.raises(TQInputError, match="decoded_value"):
        tq.paged_prefill_attention(*base, dk, dv[:, :, :-1], start)
    assert dk.dtype == torch.float32
    with pytest.raises(TQInputError, match="decoded_value is torch.float16.*one dtype"):
        tq.paged_prefill_attention(*base, dk, dv.half(), start)
    with pytest.raises(TQInputError, match="decoded_start"):
        tq.paged_prefill_attention(*base, dk, dv, start[:-1])
    with pytest.raises(TQInputError, match="decoded_key.*contiguous"):
        tq.paged_prefill_attention(*base, dk.transpose(0, 1).contiguous().transpose(0, 1), dv,
                                   start)
