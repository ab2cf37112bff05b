"""turboquant::encode_keys: fused key encode (norm, rotate, quantize, pack, QJL residual sketch)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from tq_ops import _checks, layout, reference
from tq_ops.ops.write_cache import launch_encode, triton_encode_supported


def launch_encode_keys(key: Tensor, rotation: Tensor, projection: Tensor, centroids: Tensor,
                       bits: int, qjl: bool, raw: bool = False) -> Tensor:
    """Triton body: every key is a one-token page of a record tensor (tq_ops.layout)."""
    d = key.shape[-1]
    lay = layout.SlotLayout(d, bits, qjl, 1)
    x = key.reshape(-1, 1, d)
    out = torch.empty((x.shape[0], lay.key_bytes), dtype=torch.uint8, device=key.device)
    offs = dict(OFF_C=lay.record_offset("k_codes"), OFF_N=lay.record_offset("k_norm"))
    if qjl:
        offs.update(OFF_S=lay.record_offset("k_signs"), OFF_G=lay.record_offset("k_gamma"))
    launch_encode(x, rotation, projection, centroids, bits, qjl, out, offs, 1, lay.key_bytes, 0,
                  raw=raw)
    return out.reshape(*key.shape[:-1], lay.key_bytes)


@triton_op("turboquant::encode_keys", mutates_args=())
def encode_keys(key: Tensor, rotation: Tensor, projection: Tensor, centroids: Tensor, bits: int,
                qjl: bool) -> Tensor:
    """Encode keys into packed key records.

    Args:
        key: (..., D) fp16/bf16/fp32.
        rotation: (D, D) fp32, Pi.  projection: (D, D) fp32, S' (ignored when qjl is False).
        centroids: (2**bits,) fp32, the key codebook.
        bits: MSE bits 1..4.  qjl: add the 1-bit residual sketch (TurboQuant_prod).
    Returns:
        (..., key_bytes) uint8 records: codes | signs | norm fp16 | gamma fp16 (tq_ops.layout).
        Values are not checked (that would need a device sync): a key with NaN/Inf gets a NaN
        norm or gamma and a norm above 65504 is stored as +inf (fp16), so every score and
        attention output that uses the token is NaN/inf, never silently finite.
        TurboQuantAttentionImpl.forward raises TQInputError for both in eager mode.
    """
    d = _checks.rotation(rotation)
    _checks.projection(projection, d)
    _checks.floats("key", key)
    _checks.head_dim("key", key, d)
    _checks.codebook("encode_keys", centroids, bits)
    _checks.same_device(key=key, rotation=rotation, projection=projection, centroids=centroids)
    if key.device.type == "cuda" and triton_encode_supported(d):
        return launch_encode_keys(key, rotation, projection, centroids, bits, qjl)
    return reference.encode_keys(key, rotation, projection, centroids, bits, qjl)
