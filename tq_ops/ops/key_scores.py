"""turboquant::key_scores: the inner-product estimator of queries against encoded keys."""
from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from tq_ops import _checks, layout, reference
from tq_ops.codec import qjl_scale
from tq_ops.triton.codec import NUM_WARPS, key_scores_kernel
from tq_ops.triton.decode import query_prep_kernel
from tq_ops.triton.unpack import group_width

QUERY_TILE = 16
KEY_TILE = 32


def launch_key_scores(query: Tensor, key_records: Tensor, rotation: Tensor, projection: Tensor,
                      centroids: Tensor, bits: int, qjl: bool, raw: bool = False) -> Tensor:
    """Triton body of key_scores: q_rot and u by the decode prep kernel, then the estimator."""
    b, tq, d = query.shape
    tk = key_records.shape[1]
    lay = layout.SlotLayout(d, bits, qjl, 1)
    q = query.reshape(b * tq, d).contiguous()
    rec = key_records.contiguous()
    qr = torch.empty((b * tq, d), dtype=torch.float32, device=query.device)
    u = torch.empty((b * tq, d), dtype=torch.float32, device=query.device) if qjl else qr
    out = torch.empty((b, tq, tk), dtype=torch.float32, device=query.device)
    prep = query_prep_kernel if raw else wrap_triton(query_prep_kernel)
    scores = key_scores_kernel if raw else wrap_triton(key_scores_kernel)
    dp = max(32, triton.next_power_of_2(d))
    # no plane operands: qr stands in for their buffers
    prep[(triton.cdiv(b * tq, 16),)](q, rotation, projection, qr, u, qr, qr, b * tq, 1.0,
                                     qjl_scale(d), D=d, DP=dp, RB=16, JB=32, QJL=qjl,
                                     PLANES=False, KT0=0, KT1=0, q8_ptr=qr,
                                     INT8_KEYS=False, G=1, GP=1)
    scores[(b, triton.cdiv(tq, QUERY_TILE), triton.cdiv(tk, KEY_TILE))](
        qr, u, rec, centroids, out, tq, tk, D=d, DG=group_width(d), TQB=QUERY_TILE,
        TKB=KEY_TILE, BITS=bits, QJL=qjl, KEY_BYTES=lay.key_bytes,
        OFF_S=lay.record_offset("k_signs") if qjl else 0, OFF_N=lay.record_offset("k_norm"),
        OFF_G=lay.record_offset("k_gamma") if qjl else 0, num_warps=NUM_WARPS)
    return out


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
    if query.device.type == "cuda":
        return launch_key_scores(query, key_records, rotation, projection, centroids, bits, qjl)
    return reference.key_scores(query, key_records, rotation, projection, centroids, bits, qjl)
