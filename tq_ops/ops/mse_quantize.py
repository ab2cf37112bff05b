"""turboquant::mse_quantize: norm, rotate, Lloyd-Max quantize and bit-pack (TurboQuant_mse)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from tq_ops import _checks, layout, reference
from tq_ops.ops.write_cache import launch_encode, triton_encode_supported


def launch_mse_quantize(x: Tensor, rotation: Tensor, centroids: Tensor, bits: int,
                        raw: bool = False) -> tuple[Tensor, Tensor]:
    """Triton body: codes as one-token records holding only the code planes, fp32 norms apart."""
    d = x.shape[-1]
    nbytes = layout.code_bytes(d, bits)
    rows = x.reshape(-1, 1, d)
    codes = torch.empty((rows.shape[0], nbytes), dtype=torch.uint8, device=x.device)
    norms = torch.empty((rows.shape[0],), dtype=torch.float32, device=x.device)
    launch_encode(rows, rotation, rotation, centroids, bits, False, codes, dict(OFF_C=0), 1,
                  nbytes, 0, norms=norms, raw=raw)
    return codes.reshape(*x.shape[:-1], nbytes), norms.reshape(x.shape[:-1])


@triton_op("turboquant::mse_quantize", mutates_args=())
def mse_quantize(x: Tensor, rotation: Tensor, centroids: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Quantize vectors to b-bit Lloyd-Max codes of their rotated unit direction.

    Args:
        x: (..., D) fp16/bf16/fp32.  A zero vector gets norm 0 (and decodes to 0); NaN/Inf
            propagate into the norm.
        rotation: (D, D) fp32, Pi.
        centroids: (2**bits,) fp32 ascending, scaled by 1/sqrt(D).
        bits: 1..4.
    Returns:
        codes: (..., D*bits/8) uint8, bit planes as in tq_ops.layout.
        norms: (...,) fp32, ||x|| computed in fp32.
    """
    d = _checks.rotation(rotation)
    _checks.floats("x", x)
    _checks.head_dim("x", x, d)
    _checks.codebook("mse_quantize", centroids, bits)
    _checks.same_device(x=x, rotation=rotation, centroids=centroids)
    if x.device.type == "cuda" and triton_encode_supported(d):
        return launch_mse_quantize(x, rotation, centroids, bits)
    return reference.mse_quantize(x, rotation, centroids, bits)
