"""turboquant::mse_dequantize: codes and norms back to vectors (tests, baselines, HF fallback)."""
from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from tq_ops import _checks, layout, reference
from tq_ops.triton.codec import COLS, NUM_WARPS, ROWS, mse_dequantize_kernel
from tq_ops.triton.unpack import group_width


def launch_mse_dequantize(codes: Tensor, norms: Tensor, rotation: Tensor, centroids: Tensor,
                          bits: int, raw: bool = False) -> Tensor:
    """Triton body of mse_dequantize."""
    d = rotation.shape[0]
    c = codes.reshape(-1, codes.shape[-1])
    if not c.is_contiguous():
        c = c.contiguous()
    n = norms.reshape(-1)
    out = torch.empty((c.shape[0], d), dtype=torch.float32, device=codes.device)
    kernel = mse_dequantize_kernel if raw else wrap_triton(mse_dequantize_kernel)
    kernel[(triton.cdiv(c.shape[0], ROWS),)](
        c, n, rotation, centroids, out, c.shape[0], D=d, DG=group_width(d),
        DP=max(COLS, triton.next_power_of_2(d)), RB=ROWS, JB=COLS, BITS=bits,
        num_warps=NUM_WARPS)
    return out.reshape(*codes.shape[:-1], d)


@triton_op("turboquant::mse_dequantize", mutates_args=())
def mse_dequantize(codes: Tensor, norms: Tensor, rotation: Tensor, centroids: Tensor,
                   bits: int) -> Tensor:
    """Reconstruct x_hat = n Pi^T c[code].

    Args:
        codes: (..., D*bits/8) uint8 from mse_quantize.
        norms: (...,) fp16/bf16/fp32.
        rotation: (D, D) fp32.
        centroids: (2**bits,) fp32.
        bits: 1..4.
    Returns:
        (..., D) fp32.
    """
    d = _checks.rotation(rotation)
    _checks.codebook("mse_dequantize", centroids, bits)
    _checks.records("codes", codes, layout.code_bytes(d, bits))
    _checks.floats("norms", norms, min_rank=0)
    if tuple(norms.shape) != tuple(codes.shape[:-1]):
        _checks.fail(f"norms shape {tuple(norms.shape)} must equal codes.shape[:-1] "
                     f"{tuple(codes.shape[:-1])}")
    _checks.same_device(codes=codes, norms=norms, rotation=rotation, centroids=centroids)
    if codes.device.type == "cuda":
        return launch_mse_dequantize(codes, norms, rotation, centroids, bits)
    return reference.mse_dequantize(codes, norms, rotation, centroids, bits)
