"""turboquant::rotate and turboquant::unrotate: apply Pi or Pi^T to head vectors."""
from __future__ import annotations

from torch import Tensor
from torch.library import triton_op

from tq_ops import _checks, reference


@triton_op("turboquant::rotate", mutates_args=())
def rotate(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate head vectors: y = Pi x.

    Args:
        x: (..., D) fp16/bf16/fp32.
        rotation: (D, D) fp32, Pi (TQCodec.rotation).
    Returns:
        (..., D) fp32.
    """
    d = _checks.rotation(rotation)
    _checks.floats("x", x)
    _checks.head_dim("x", x, d)
    _checks.same_device(x=x, rotation=rotation)
    return reference.rotate(x, rotation)


@triton_op("turboquant::unrotate", mutates_args=())
def unrotate(y: Tensor, rotation: Tensor) -> Tensor:
    """Inverse rotation: x = Pi^T y.

    Args:
        y: (..., D) fp16/bf16/fp32, rotated-domain vectors.
        rotation: (D, D) fp32, Pi.
    Returns:
        (..., D) fp32.
    """
    d = _checks.rotation(rotation)
    _checks.floats("y", y)
    _checks.head_dim("y", y, d)
    _checks.same_device(y=y, rotation=rotation)
    return reference.unrotate(y, rotation)
