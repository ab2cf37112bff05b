"""turboquant::rotate and turboquant::unrotate: apply Pi or Pi^T to head vectors."""
from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from tq_ops import _checks, reference
from tq_ops.triton.codec import COLS, NUM_WARPS, ROWS, rotate_kernel


def launch_rotate(x: Tensor, rotation: Tensor, inverse: bool, raw: bool = False) -> Tensor:
    """Triton body of rotate (inverse=False) and unrotate (inverse=True)."""
    d = rotation.shape[0]
    rows = x.reshape(-1, d)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.float32, device=x.device)
    kernel = rotate_kernel if raw else wrap_triton(rotate_kernel)
    kernel[(triton.cdiv(rows.shape[0], ROWS),)](
        rows, rotation, out, rows.shape[0], D=d, DP=max(COLS, triton.next_power_of_2(d)), RB=ROWS,
        JB=COLS, INVERSE=inverse, num_warps=NUM_WARPS)
    return out.reshape(x.shape)


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
    if x.device.type == "cuda":
        return launch_rotate(x, rotation, inverse=False)
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
    if y.device.type == "cuda":
        return launch_rotate(y, rotation, inverse=True)
    return reference.unrotate(y, rotation)
