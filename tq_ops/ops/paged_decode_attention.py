"""turboquant::paged_decode_attention: one query per sequence over a packed paged cache."""
from __future__ import annotations

from torch import Tensor
from torch.library import triton_op

from tq_ops import _checks, layout, reference
from tq_ops.ops.write_cache import check_cache


@triton_op("turboquant::paged_decode_attention", mutates_args=())
def paged_decode_attention(query: Tensor, cache: Tensor, block_table: Tensor, kv_lens: Tensor,
                           raw_key: Tensor, raw_value: Tensor, raw_index: Tensor, raw_lens: Tensor,
                           rotation: Tensor,
                           projection: Tensor, key_centroids: Tensor, value_centroids: Tensor,
                           key_bits: int, qjl: bool, value_bits: int, scale: float,
                           kv_start: int) -> Tensor:
    """Decode attention: compressed pages plus exact raw tokens in one softmax.

    Args:
        query: (B, Hq, D) fp16/bf16/fp32, one token per sequence.
        cache: (num_blocks, Hkv, block_size * slot_bytes) uint8 (tq_ops.layout).
        block_table: (B, max_blocks) int32, page ids of each sequence.
        kv_lens: (B,) int32; sequence b attends page positions kv_start .. kv_lens[b]-1.
        raw_key, raw_value: (N, R, Hkv, D), a pool of exact tokens (sinks and the recent buffer);
            sequence b owns row raw_index[b], whose first raw_lens[b] tokens are valid.
        raw_index: (B,) int32.  raw_lens: (B,) int32.
        rotation, projection: (D, D) fp32.  key_centroids, value_centroids: fp32 codebooks.
        key_bits, qjl, value_bits: the format.  scale: softmax scale.
        kv_start: first page position attended (e.g. the sink count when sinks are kept raw).
    Returns:
        (B, Hq, D) in query.dtype; a sequence with no valid token gets zeros.
    """
    d = _checks.rotation(rotation)
    _checks.projection(projection, d)
    lay = layout.SlotLayout(d, key_bits, qjl, value_bits)
    _checks.codebook("key", key_centroids, key_bits)
    _checks.codebook("value", value_centroids, value_bits)
    _checks.floats("query", query, rank=3)
    _checks.head_dim("query", query, d)
    hkv = cache.shape[1] if cache.dim() == 3 else 0
    check_cache(cache, lay, hkv)
    _checks.gqa(query.shape[1], hkv)
    b = query.shape[0]
    _checks.ints("block_table", block_table, rank=2)
    _checks.ints("kv_lens", kv_lens, rank=1)
    _checks.ints("raw_lens", raw_lens, rank=1)
    _checks.ints("raw_index", raw_index, rank=1)
    if (block_table.shape[0] != b or kv_lens.shape[0] != b or raw_lens.shape[0] != b
            or raw_index.shape[0] != b):
        _checks.fail(f"block_table, kv_lens, raw_index and raw_lens need {b} rows (one per query)")
    for name, t in (("raw_key", raw_key), ("raw_value", raw_value)):
        _checks.floats(name, t, rank=4)
        if t.shape[2] != hkv or t.shape[3] != d or t.shape != raw_key.shape:
            _checks.fail(f"{name} must be (N, R, {hkv}, {d}) like raw_key, got {tuple(t.shape)}")
    if kv_start < 0:
        _checks.fail(f"kv_start={kv_start} must be >= 0")
    _checks.same_device(query=query, cache=cache, block_table=block_table, kv_lens=kv_lens,
                        raw_key=raw_key, raw_value=raw_value, raw_index=raw_index,
                        raw_lens=raw_lens, rotation=rotation, projection=projection,
                        key_centroids=key_centroids, value_centroids=value_centroids)
    return reference.paged_decode_attention(query, cache, block_table, kv_lens, raw_key, raw_value,
                                            raw_index, raw_lens, rotation, projection, key_centroids,
                                            value_centroids, key_bits, qjl, value_bits, scale,
                                            kv_start)
