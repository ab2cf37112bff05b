"""turboquant::mse_dequantize: codes and norms back to vectors (tests, baselines, HF fallback)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from tq_ops import _checks, layout, reference


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
    return reference.mse_dequantize(codes, norms, rotation, centroids, bits)
