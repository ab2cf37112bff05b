"""TQCodec: the random rotation, the QJL matrix and the codebooks of a TQConfig, as tensors.

Randomness is data: these tensors are drawn once on the CPU from seeded generators and passed to
every op, so ops are deterministic and CPU and GPU produce identical codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tq_ops import codebooks
from tq_ops.config import TQConfig

# Separate generator streams, so changing the rotation kind never changes the QJL matrix, and so a
# caller who draws test data from torch.Generator().manual_seed(seed) never gets the rotation's
# own Gaussian rows back as "random" inputs (they would be adversarial for that rotation).
_ROTATION_STREAM = 0x2545F4914F6CDD1D
_QJL_STREAM = 0x5DEECE66D


def hadamard(n: int) -> torch.Tensor:
    """(n, n) fp64 Sylvester Hadamard matrix with entries +-1 (n a power of two)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation_matrix(dim: int, seed: int) -> torch.Tensor:
    """(dim, dim) fp32 orthogonal Pi; the rotated vector is Pi @ x.

    Power-of-two dims: three randomized Hadamard passes (H D3)(H D2)(H D1) / dim^1.5.  One pass is
    not enough: a one-hot (outlier-channel) input keeps all coordinates at +-1/sqrt(d) and gets
    2.25x the theoretical 2-bit MSE; three passes match a Haar rotation (algorithm.md 1.2).
    Other dims: a Haar rotation, the QR of a Gaussian matrix with the sign(diag R) fix.
    Never padded, so no rotated coordinate is ever dropped and no bits are spent on padding.
    """
    gen = torch.Generator().manual_seed(seed ^ _ROTATION_STREAM)
    if dim & (dim - 1) == 0:
        h = hadamard(dim)
        pi = torch.eye(dim, dtype=torch.float64)
        for _ in range(3):
            signs = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64) * 2 - 1
            pi = h @ (signs.to(torch.float64)[:, None] * pi)
        pi = pi / dim**1.5
    else:
        g = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        pi = q * torch.sign(torch.diagonal(r))[None, :]
    return pi.to(torch.float32).contiguous()


def qjl_matrix(dim: int, seed: int) -> torch.Tensor:
    """(dim, dim) fp32 S' with i.i.d. N(0, 1) entries rounded to fp16 values, applied in the
    rotated domain.

    The paper sketches the residual r with S; here the residual lives in the rotated domain, so we
    draw S' = S Pi^T directly (again i.i.d. Gaussian) and project the rotated query with it.
    Gaussian rows are what makes the estimator exactly unbiased (algorithm.md 2.2, 8.3).  Each
    entry is rounded to the nearest fp16 value (a relative change of at most 2^-11, far below
    the sketch's own noise; tests/stats.py measures the estimator on these matrices) so that one
    fp16 tensor-core operand holds S' exactly: the encode kernel then needs no hi + lo split of
    it (exact16_matrices).
    """
    gen = torch.Generator().manual_seed(seed ^ _QJL_STREAM)
    s = torch.randn(dim, dim, generator=gen, dtype=torch.float32)
    return s.to(torch.float16).to(torch.float32)


# exact16_matrices' bounds, shared with the encode kernel's own check (tq_ops.triton.encode):
# |dim^1.5 Pi| at most 2048 (every integer up to it is an fp16 value), and dim^1.5 Pi integer to
# within fp32 rounding (a few ulp of each entry)
EXACT16_MAX_INT = 2048
EXACT16_RTOL = 2.0 ** -20


def exact16_matrices(rotation: torch.Tensor, projection: torch.Tensor) -> bool:
    """True when one fp16 operand each holds the rotation and the QJL matrix exactly, up to one
    scale: dim^1.5 * rotation is an integer matrix with entries of magnitude at most 2048 (to
    within fp32 rounding, 2^-20 relative) and every projection entry is an fp16 value.

    rotation_matrix and qjl_matrix give such a pair for every power-of-two dim up to 256 (the
    three Hadamard passes make dim^1.5 Pi an integer matrix; its largest entry is 1336 at dim 256
    over seeds 0..49).  A caller that knows this declares it to write_cache (exact16_matrices=
    True), whose bulk encodes then rotate with one MMA instead of a split-precision pair (and
    the key encode fits twice the programs per SM).  Reads the tensors' values: call it once
    per codec, not per step (a host sync on CUDA).
    """
    d = rotation.shape[-1]
    scaled = rotation.detach().to("cpu", torch.float64) * float(d) ** 1.5
    whole = scaled.round()
    proj = projection.detach().to("cpu", torch.float32)
    return bool(((scaled - whole).abs() <= whole.abs() * EXACT16_RTOL).all()
                and whole.abs().max() <= EXACT16_MAX_INT
                and torch.equal(proj.to(torch.float16).to(torch.float32), proj))


def qjl_scale(dim: int) -> float:
    """sqrt(pi/2)/m for m = dim Gaussian projections (QJL Lemma 3.2)."""
    return math.sqrt(math.pi / 2) / dim


@dataclass(frozen=True, eq=False)
class TQCodec:
    """The tensors a TQConfig needs at run time, on one device.

    Attributes:
        config: the format.
        rotation: (D, D) fp32, Pi.
        qjl_projection: (D, D) fp32, S' (used only when config.use_qjl).
        key_centroids: (2**key_mse_bits,) fp32 ascending, already scaled by 1/sqrt(D).
        value_centroids: (2**value_bits,) fp32 ascending.
    """

    config: TQConfig
    rotation: torch.Tensor
    qjl_projection: torch.Tensor
    key_centroids: torch.Tensor
    value_centroids: torch.Tensor

    @classmethod
    def build(cls, config: TQConfig, device: torch.device | str = "cpu") -> "TQCodec":
        d = config.head_dim
        return cls(
            config=config,
            rotation=rotation_matrix(d, config.rotation_seed).to(device),
            qjl_projection=qjl_matrix(d, config.rotation_seed).to(device),
            key_centroids=codebooks.centroids(d, config.key_mse_bits).to(device),
            value_centroids=codebooks.centroids(d, config.value_bits).to(device),
        )

    def to(self, device: torch.device | str) -> "TQCodec":
        return TQCodec(self.config, self.rotation.to(device), self.qjl_projection.to(device),
                       self.key_centroids.to(device), self.value_centroids.to(device))

    @property
    def device(self) -> torch.device:
        return self.rotation.device
