"""turboquant::qjl_sketch: the 1-bit QJL sketch of a rotated-domain residual."""
from __future__ import annotations

from torch import Tensor
from torch.library import triton_op

from tq_ops import _checks, reference


@triton_op("turboquant::qjl_sketch", mutates_args=())
def qjl_sketch(residual: Tensor, projection: Tensor) -> tuple[Tensor, Tensor]:
    """Signs of S' r and the residual norm gamma.

    Args:
        residual: (..., D) fp16/bf16/fp32, r = Pi u - c[code] in the rotated domain.
        projection: (D, D) fp32, S' with i.i.d. N(0,1) entries (TQCodec.qjl_projection).
    Returns:
        signs: (..., D/8) uint8, bit j%8 of byte j//8 is 1 when (S' r)_j >= 0 (z_j = +1).
        gamma: (...,) fp32, ||r||.
    """
    d = _checks.rotation(projection, "projection")
    _checks.floats("residual", residual)
    _checks.head_dim("residual", residual, d)
    _checks.same_device(residual=residual, projection=projection)
    return reference.qjl_sketch(residual, projection)
