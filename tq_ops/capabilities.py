"""What tq_ops supports, declared once, with the reason for everything it refuses.

Tests are parametrised from these declarations; configs and ops call the `*_problems` helpers so
that a refusal always says why.
"""
from __future__ import annotations

import torch

# Head dims with stored codebooks (scripts/generate_codebooks.py).  Any multiple of 16 in 32..256
# works; the list below is what the tests sweep.
TESTED_HEAD_DIMS = (64, 80, 96, 112, 128, 256)
MSE_BITS_RANGE = (1, 4)
QJL_BITS = (0, 1)
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def head_dim_problems(head_dim: int) -> list[str]:
    from tq_ops.codebooks import codebook_dims

    if head_dim <= 0:
        return [f"head_dim={head_dim} must be positive"]
    if head_dim % 16:
        return [f"head_dim={head_dim} must be a multiple of 16 (codes are packed in whole bytes "
                f"per bit plane and scalars must stay 2-byte aligned)"]
    if head_dim not in codebook_dims():
        return [f"head_dim={head_dim} has no stored codebook; supported: {codebook_dims()}"]
    return []
