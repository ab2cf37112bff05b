"""turboquant::write_raw: copy exact tokens into a raw pool by (row, slot)."""
from __future__ import annotations

import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from tq_ops import _checks, reference
from tq_ops.ops.write_cache import check_raw_pool
from tq_ops.triton.raw_pool import write_raw_kernel


def launch_write_raw(key: Tensor, value: Tensor, raw_key: Tensor, raw_value: Tensor,
                     rows: Tensor, slots: Tensor, slot_mapping: Tensor, raw: bool = False) -> None:
    """The Triton body of write_raw: one program per token.  raw=True launches the bare kernel
    (the interpreter tests run it on CPU tensors)."""
    t, h, d = key.shape
    if t == 0:
        return
    h, d = int(h), int(d)
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    kernel = write_raw_kernel if raw else wrap_triton(write_raw_kernel)
    kernel[(t,)](key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                 raw_key, raw_value, rows, slots, slot_mapping, t, raw_key.stride(0),
                 raw_key.stride(1), H=h, D=d, HP=triton.next_power_of_2(h),
                 DP=triton.next_power_of_2(d), num_warps=4)


@triton_op("turboquant::write_raw", mutates_args={"raw_key", "raw_value"})
def write_raw(key: Tensor, value: Tensor, raw_key: Tensor, raw_value: Tensor, rows: Tensor,
              slots: Tensor, slot_mapping: Tensor) -> None:
    """Copy exact tokens into a raw pool (the sinks and recent tokens kept beside a paged cache),
    in place: raw_key[rows[i], slots[i]] = key[i] and likewise for values.

    Args:
        key, value: (T, Hkv, D) fp16/bf16/fp32, any strides with the last dim contiguous.
        raw_key, raw_value: (N, R, Hkv, D) fp16/bf16/fp32, contiguous, mutated; values are
            converted to their dtype.
        rows, slots: (T,) int32/int64, each token's pool row in [0, N) and slot in [0, R).  Two
            written tokens must not share a (row, slot), or which one lands is unspecified.
        slot_mapping: (T,) int32/int64, the tokens' paged-cache slots (write_cache's argument):
            tokens with a negative slot (padding) are not written.
    Returns:
        None.  rows/slots out of range are not checked (device values): as with index_put on a
        GPU, they write outside the pool.
    """
    _checks.floats("key", key, rank=3)
    _checks.floats("value", value, rank=3)
    if tuple(value.shape) != tuple(key.shape):
        _checks.fail(f"value {tuple(value.shape)} must have the shape of key {tuple(key.shape)}")
    check_raw_pool(raw_key, raw_value, key.shape[1], key.shape[2], kv_start=0)
    for name, pool in (("raw_key", raw_key), ("raw_value", raw_value)):
        if not pool.is_contiguous():
            _checks.fail(f"{name} must be contiguous")
    if raw_value.dtype != raw_key.dtype:
        _checks.fail(f"raw_value is {raw_value.dtype}, raw_key {raw_key.dtype}: one dtype")
    for name, idx in (("rows", rows), ("slots", slots), ("slot_mapping", slot_mapping)):
        _checks.ints(name, idx, rank=1)
        if idx.shape[0] != key.shape[0]:
            _checks.fail(f"{name} has {idx.shape[0]} entries for {key.shape[0]} tokens")
    _checks.same_device(key=key, value=value, raw_key=raw_key, raw_value=raw_value, rows=rows,
                        slots=slots, slot_mapping=slot_mapping)
    if key.device.type == "cuda":
        launch_write_raw(key, value, raw_key, raw_value, rows, slots, slot_mapping)
        return
    reference.write_raw(key, value, raw_key, raw_value, rows, slots, slot_mapping)
