"""turboquant::key_scores: the inner-product estimator of queries against encoded keys."""
from __future__ import annotations

from torch import Tensor
from torch.library import triton_op

from tq_ops import _checks, layout, reference


@triton_op("turboquant::key_scores", mutates_args=())
def key_scores(query: Tensor, key_records: Tensor, rotation: Tensor, projection: Tensor,
               centroids: Tensor, bits: int, qjl: bool) -> Tensor:
    """Estimate <q, k> for every (query, key) pair of each batch entry (e.g. each KV head).

    est = n (<Pi q, c[code]> + gamma sqrt(pi/2)/D <S' Pi q, z>), unbiased over (Pi, S') when qjl.

    Args:
        query: (B, Tq, D) fp16/bf16/fp32.
        key_records: (B, Tk, key_bytes) uint8 from encode_keys with the same bits/qjl.
        rotation, projection: (D, D) fp32.  centroids: (2**bits,) fp32.
    Returns:
        (B, Tq, Tk) fp32.
    """
    d = _checks.rotation(rotation)
    _checks.projection(projection, d)
    _checks.floats("query", query, rank=3)
    _checks.head_dim("query", query, d)
    _checks.codebook("key_scores", centroids, bits)
    _checks.records("key_records", key_records, layout.SlotLayout(d, bits, qjl, 1).key_bytes)
    _checks.uint8("key_records", key_records, rank=3)
    if key_records.shape[0] != query.shape[0]:
        _checks.fail(f"query batch {query.shape[0]} != key_records batch {key_records.shape[0]}")
    _checks.same_device(query=query, key_records=key_records, rotation=rotation,
                        projection=projection, centroids=centroids)
    return reference.key_scores(query, key_records, rotation, projection, centroids, bits, qjl)
