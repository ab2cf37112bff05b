"""turboquant::write_cache: encode K/V and store them into the paged cache by slot mapping."""
from __future__ import annotations

from torch import Tensor
from torch.library import triton_op

from tq_ops import _checks, layout, reference


def check_cache(cache: Tensor, lay: layout.SlotLayout, num_kv_heads: int) -> int:
    """Validate a paged cache tensor and return its block size."""
    _checks.uint8("cache", cache, rank=3)
    if cache.shape[1] != num_kv_heads:
        _checks.fail(f"cache has {cache.shape[1]} KV heads, expected {num_kv_heads}")
    if cache.shape[2] % lay.slot_bytes:
        _checks.fail(f"cache page of {cache.shape[2]} bytes is not a whole number of "
                     f"{lay.slot_bytes}-byte slots")
    if not cache.is_contiguous():
        _checks.fail("cache must be contiguous")
    return cache.shape[2] // lay.slot_bytes


@triton_op("turboquant::write_cache", mutates_args={"cache"})
def write_cache(key: Tensor, value: Tensor, cache: Tensor, slot_mapping: Tensor, rotation: Tensor,
                projection: Tensor, key_centroids: Tensor, value_centroids: Tensor, key_bits: int,
                qjl: bool, value_bits: int) -> None:
    """Encode new tokens and write them into their slots of the paged cache, in place.

    Args:
        key, value: (T, Hkv, D) fp16/bf16/fp32.
        cache: (num_blocks, Hkv, block_size * slot_bytes) uint8, mutated (tq_ops.layout).
        slot_mapping: (T,) int32/int64, slot = block * block_size + offset; slots < 0 (padding)
            are skipped.  Two tokens must not share a slot.
        rotation, projection: (D, D) fp32.  key_centroids, value_centroids: fp32 codebooks.
        key_bits, qjl, value_bits: the format.
    Returns:
        None.  NaN/Inf or norms above 65504 are stored as in encode_keys / encode_values (NaN or
        +inf norms, not checked here).
    """
    d = _checks.rotation(rotation)
    _checks.projection(projection, d)
    lay = layout.SlotLayout(d, key_bits, qjl, value_bits)
    _checks.codebook("key", key_centroids, key_bits)
    _checks.codebook("value", value_centroids, value_bits)
    _checks.floats("key", key, rank=3)
    _checks.floats("value", value, rank=3)
    _checks.head_dim("key", key, d)
    if tuple(value.shape) != tuple(key.shape):
        _checks.fail(f"value {tuple(value.shape)} must have the shape of key {tuple(key.shape)}")
    _checks.ints("slot_mapping", slot_mapping, rank=1)
    if slot_mapping.shape[0] != key.shape[0]:
        _checks.fail(f"slot_mapping has {slot_mapping.shape[0]} entries for {key.shape[0]} tokens")
    check_cache(cache, lay, key.shape[1])
    _checks.same_device(key=key, value=value, cache=cache, slot_mapping=slot_mapping,
                        rotation=rotation, projection=projection, key_centroids=key_centroids,
                        value_centroids=value_centroids)
    reference.write_cache(key, value, cache, slot_mapping, rotation, projection, key_centroids,
                          value_centroids, key_bits, qjl, value_bits)
