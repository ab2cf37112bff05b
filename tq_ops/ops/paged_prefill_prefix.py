"""turboquant::paged_prefill_prefix: the compressed-prefix part of paged_prefill_attention alone,
as a softmax partial with its log-sum-exp, so that a prefix too long for one decoded scratch can
be attended in slabs and merged exactly (the last slab through paged_prefill_attention's
prior_out / prior_lse)."""
from __future__ import annotations

from torch import Tensor
from torch.library import triton_op

from tq_ops import _checks, reference
from tq_ops.ops.paged_prefill_attention import check_prefix_args, launch


@triton_op("turboquant::paged_prefill_prefix", mutates_args=())
def paged_prefill_prefix(query: Tensor, cu_seqlens_q: Tensor, cache: Tensor, block_table: Tensor,
                         prefix_lens: Tensor, rotation: Tensor, projection: Tensor,
                         key_centroids: Tensor, value_centroids: Tensor, key_bits: int,
                         qjl: bool, value_bits: int, scale: float, kv_start: int,
                         decoded_key: Tensor | None = None,
                         decoded_value: Tensor | None = None,
                         decoded_start: Tensor | None = None,
                         prior_out: Tensor | None = None,
                         prior_lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each query of sequence b over compressed positions kv_start .. prefix_lens[b]-1 only (no
    raw pool, no chunk tokens), merged with an optional prior partial.

    Args: as paged_prefill_attention's, without key, value and the raw pool (prior_out in
        fp32, fp16 or bf16).  kv_start here is
        the first position of the slab attended (sinks are paged_prefill_attention's business),
        and decoded rows, when given, map as there: position p of sequence b is row
        decoded_start[b] + p - kv_start.
    Returns:
        out (T, Hq, D) fp32: the softmax-weighted values over those keys (and the prior's);
        lse (T, Hq) fp32: the log-sum-exp of scale * q . k over the same keys (natural log).
        A query with no key and no prior has out 0 and lse -inf.  Merging two partials (o1, l1)
        and (o2, l2) gives l = logaddexp(l1, l2), o = o1 exp(l1 - l) + o2 exp(l2 - l); passing
        one as the other's prior does exactly that on the GPU.
    """
    d = check_prefix_args(query, cu_seqlens_q, cache, block_table, prefix_lens, rotation,
                          key_centroids, value_centroids, key_bits, qjl, value_bits,
                          decoded_key, decoded_value, decoded_start, prior_out, prior_lse)
    _checks.projection(projection, d)
    _checks.same_device(query=query, projection=projection)
    if query.device.type == "cuda":
        # the chunk K/V and raw-pool arguments are not read in the kernel's partial variant
        return launch(query, query, query, cu_seqlens_q, cache, block_table, prefix_lens, query,
                      query, prefix_lens, prefix_lens, rotation, projection, key_centroids,
                      value_centroids, key_bits, qjl, value_bits, scale, kv_start, decoded_key,
                      decoded_value, decoded_start, prior_out, prior_lse, partial=True)
    return reference.paged_prefill_prefix(
        query, cu_seqlens_q, cache, block_table, prefix_lens, rotation, projection, key_centroids,
        value_centroids, key_bits, qjl, value_bits, scale, kv_start, decoded_key, decoded_value,
        decoded_start, prior_out, prior_lse)
