"""turboquant::mse_quantize: norm, rotate, Lloyd-Max quantize and bit-pack (TurboQuant_mse)."""
from __future__ import annotations

from torch import Tensor
from torch.library import triton_op

from tq_ops import _checks, reference


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
    return reference.mse_quantize(x, rotation, centroids, bits)
