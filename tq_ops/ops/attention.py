"""turboquant::attention: queries over sinks, an encoded cache and a raw recent buffer."""
from __future__ import annotations

from torch import Tensor
from torch.library import triton_op

from tq_ops import _checks, layout, reference


def check_attention_args(query, key_records, value_records, sink_key, sink_value, recent_key,
                         recent_value, rotation, projection, key_centroids, value_centroids,
                         key_bits, qjl, value_bits) -> None:
    d = _checks.rotation(rotation)
    _checks.projection(projection, d)
    lay = layout.SlotLayout(d, key_bits, qjl, value_bits)
    _checks.floats("query", query, rank=3)
    _checks.head_dim("query", query, d)
    _checks.codebook("key", key_centroids, key_bits)
    _checks.codebook("value", value_centroids, value_bits)
    _checks.records("key_records", key_records, lay.key_bytes)
    _checks.records("value_records", value_records, lay.value_bytes)
    _checks.uint8("key_records", key_records, rank=3)
    _checks.uint8("value_records", value_records, rank=3)
    hkv = key_records.shape[1]
    _checks.gqa(query.shape[1], hkv)
    if tuple(value_records.shape[:2]) != tuple(key_records.shape[:2]):
        _checks.fail(f"value_records {tuple(value_records.shape)} and key_records "
                     f"{tuple(key_records.shape)} must agree on (tokens, heads)")
    for name, t in (("sink_key", sink_key), ("sink_value", sink_value),
                    ("recent_key", recent_key), ("recent_value", recent_value)):
        _checks.floats(name, t, rank=3)
        if t.shape[1] != hkv or t.shape[2] != d:
            _checks.fail(f"{name} must be (tokens, {hkv}, {d}), got {tuple(t.shape)}")
    if sink_key.shape[0] != sink_value.shape[0] or recent_key.shape[0] != recent_value.shape[0]:
        _checks.fail("raw keys and values must have the same number of tokens")
    total = sink_key.shape[0] + key_records.shape[0] + recent_key.shape[0]
    if total == 0 and query.shape[0] > 0:
        _checks.fail("attention needs at least one key (sinks, compressed or recent)")
    if query.shape[0] > total:
        _checks.fail(f"{query.shape[0]} queries but only {total} keys: the queries must be the "
                     f"last positions of the sequence")
    _checks.same_device(query=query, key_records=key_records, value_records=value_records,
                        sink_key=sink_key, sink_value=sink_value, recent_key=recent_key,
                        recent_value=recent_value, rotation=rotation, projection=projection,
                        key_centroids=key_centroids, value_centroids=value_centroids)


@triton_op("turboquant::attention", mutates_args=())
def attention(query: Tensor, key_records: Tensor, value_records: Tensor, sink_key: Tensor,
              sink_value: Tensor, recent_key: Tensor, recent_value: Tensor, rotation: Tensor,
              projection: Tensor, key_centroids: Tensor, value_centroids: Tensor, key_bits: int,
              qjl: bool, value_bits: int, scale: float, causal: bool) -> Tensor:
    """Attention of queries over one sequence: exact sinks, compressed middle, exact recent tokens,
    all in one softmax.

    Args:
        query: (Tq, Hq, D) fp16/bf16/fp32; the last Tq positions of the sequence.
        key_records: (Tc, Hkv, key_bytes) uint8; value_records: (Tc, Hkv, value_bytes) uint8.
        sink_key, sink_value: (S, Hkv, D), the first S tokens, exact.
        recent_key, recent_value: (R, Hkv, D), the newest R tokens, exact.
        rotation, projection: (D, D) fp32.  key_centroids, value_centroids: fp32 codebooks.
        key_bits, qjl, value_bits: the format.  scale: softmax scale (usually 1/sqrt(D)).
        causal: query i (at position S+Tc+R-Tq+i) sees only keys at positions <= its own.
    Returns:
        (Tq, Hq, D) in query.dtype.  Query head h reads KV head h // (Hq / Hkv).
    """
    check_attention_args(query, key_records, value_records, sink_key, sink_value, recent_key,
                         recent_value, rotation, projection, key_centroids, value_centroids,
                         key_bits, qjl, value_bits)
    return reference.attention(query, key_records, value_records, sink_key, sink_value,
                               recent_key, recent_value, rotation, projection, key_centroids,
                               value_centroids, key_bits, qjl, value_bits, scale, causal)
