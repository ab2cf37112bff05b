"""turboquant::qjl_sketch: the 1-bit QJL sketch of a rotated-domain residual."""
from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from tq_ops import _checks, reference
from tq_ops.triton.codec import COLS, NUM_WARPS, ROWS, qjl_sketch_kernel


def launch_qjl_sketch(residual: Tensor, projection: Tensor,
                      raw: bool = False) -> tuple[Tensor, Tensor]:
    """Triton body of qjl_sketch."""
    d = projection.shape[0]
    rows = residual.reshape(-1, d)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    signs = torch.empty((rows.shape[0], d // 8), dtype=torch.uint8, device=residual.device)
    gamma = torch.empty((rows.shape[0],), dtype=torch.float32, device=residual.device)
    kernel = qjl_sketch_kernel if raw else wrap_triton(qjl_sketch_kernel)
    kernel[(triton.cdiv(rows.shape[0], ROWS),)](
        rows, projection, signs, gamma, rows.shape[0], D=d,
        DP=max(COLS, triton.next_power_of_2(d)), RB=ROWS, JB=COLS, num_warps=NUM_WARPS)
    return signs.reshape(*residual.shape[:-1], d // 8), gamma.reshape(residual.shape[:-1])


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
    if residual.device.type == "cuda":
        return launch_qjl_sketch(residual, projection)
    return reference.qjl_sketch(residual, projection)
