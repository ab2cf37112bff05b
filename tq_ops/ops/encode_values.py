"""turboquant::encode_values: fused value encode (norm, rotate, quantize, pack)."""
from __future__ import annotations

from torch import Tensor
from torch.library import triton_op

from tq_ops import _checks, reference


@triton_op("turboquant::encode_values", mutates_args=())
def encode_values(value: Tensor, rotation: Tensor, centroids: Tensor, bits: int) -> Tensor:
    """Encode values into packed value records.

    Args:
        value: (..., D) fp16/bf16/fp32.
        rotation: (D, D) fp32, Pi.
        centroids: (2**bits,) fp32, the value codebook.
        bits: 1..4.
    Returns:
        (..., value_bytes) uint8 records: codes | norm fp16 (tq_ops.layout).
    """
    d = _checks.rotation(rotation)
    _checks.floats("value", value)
    _checks.head_dim("value", value, d)
    _checks.codebook("encode_values", centroids, bits)
    _checks.same_device(value=value, rotation=rotation, centroids=centroids)
    return reference.encode_values(value, rotation, centroids, bits)
