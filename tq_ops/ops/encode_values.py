"""turboquant::encode_values: fused value encode (norm, rotate, quantize, pack)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from tq_ops import _checks, layout, reference
from tq_ops.ops.write_cache import launch_encode, triton_encode_supported


def launch_encode_values(value: Tensor, rotation: Tensor, centroids: Tensor, bits: int,
                         raw: bool = False) -> Tensor:
    """Triton body: every value is a one-token page of a record tensor (tq_ops.layout)."""
    d = value.shape[-1]
    lay = layout.SlotLayout(d, 1, False, bits)
    x = value.reshape(-1, 1, d)
    out = torch.empty((x.shape[0], lay.value_bytes), dtype=torch.uint8, device=value.device)
    offs = dict(OFF_C=lay.record_offset("v_codes"), OFF_N=lay.record_offset("v_norm"))
    launch_encode(x, rotation, rotation, centroids, bits, False, out, offs, 1, lay.value_bytes, 0,
                  raw=raw)
    return out.reshape(*value.shape[:-1], lay.value_bytes)


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
        Values are not checked (that would need a device sync): a value with NaN/Inf gets a NaN
        norm and a norm above 65504 is stored as +inf (fp16), so every attention
        output that uses the token is NaN/inf, never silently finite.
        TurboQuantAttentionImpl.forward raises TQInputError for both in eager mode.
    """
    d = _checks.rotation(rotation)
    _checks.floats("value", value)
    _checks.head_dim("value", value, d)
    _checks.codebook("encode_values", centroids, bits)
    _checks.same_device(value=value, rotation=rotation, centroids=centroids)
    if value.device.type == "cuda" and triton_encode_supported(d):
        return launch_encode_values(value, rotation, centroids, bits)
    return reference.encode_values(value, rotation, centroids, bits)
