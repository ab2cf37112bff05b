"""algorithm.md 7.2: the rotation Pi (TQCodec.rotation / tq_ops.codec.rotation_matrix)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import HEAD_DIMS, codec
from stats import unit_rows
from tq_ops.codec import rotation_matrix

tq = torch.ops.turboquant


@pytest.mark.parametrize("seed", (0, 1, 12345), ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_rotation_is_orthogonal(d, seed):
    pi = codec(d, seed=seed).rotation
    assert pi.dtype == torch.float32 and pi.shape == (d, d)
    err = (pi.T @ pi - torch.eye(d)).abs().max().item()   # in fp32, as the ops use it
    assert err <= 1e-5, f"||Pi^T Pi - I||_max = {err:.2e} > 1e-5"
    err = (pi @ pi.T - torch.eye(d)).abs().max().item()
    assert err <= 1e-5, f"||Pi Pi^T - I||_max = {err:.2e} > 1e-5"


@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_rotate_unrotate_roundtrip_preserves_norms_and_inner_products(d):
    c = codec(d)
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(64, d, generator=gen) * torch.logspace(-3, 3, 64)[:, None]
    y = torch.randn(64, d, generator=gen)
    rx, ry = tq.rotate(x, c.rotation), tq.rotate(y, c.rotation)
    back = tq.unrotate(rx, c.rotation)
    rel = ((back - x).norm(dim=-1) / x.norm(dim=-1)).max().item()
    assert rel <= 1e-5, f"unrotate(rotate(x)) relative error {rel:.2e} > 1e-5"
    nrel = ((rx.norm(dim=-1) - x.norm(dim=-1)).abs() / x.norm(dim=-1)).max().item()
    assert nrel <= 1e-5, f"norm not preserved: {nrel:.2e}"
    ip_true = (x.double() * y.double()).sum(-1)
    ip_rot = (rx.double() * ry.double()).sum(-1)
    scale = x.double().norm(dim=-1) * y.double().norm(dim=-1)
    ierr = ((ip_rot - ip_true).abs() / scale).max().item()
    assert ierr <= 1e-5, f"inner products not preserved: {ierr:.2e} (relative to |x||y|)"


@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_rotated_coordinates_mean_and_variance(d):
    """Rotated coordinates of N random unit vectors have mean 0 +- 4/sqrt(N d) and variance
    (1/d)(1 +- 0.02).  4/sqrt(N d) is 4 standard errors of one coordinate's mean; taking the
    worst of d coordinates needs a family-wise bound, 5/sqrt(N d) (P(any of 256 exceeds) < 2e-4),
    and the pooled mean is held to the 4 SE bound.  N = 102400 makes 2% about 4.5 standard
    errors of one coordinate's variance (relative SE sqrt(2/N))."""
    n, chunk = 102400, 12800
    pi = codec(d).rotation
    gen = torch.Generator().manual_seed(7)
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, dtype=torch.float64)
    for _ in range(n // chunk):
        y = tq.rotate(unit_rows(gen, chunk, d), pi).double()
        s1 += y.sum(0)
        s2 += (y * y).sum(0)
    mean = s1 / n
    var = s2 / n - mean ** 2
    se = 1 / math.sqrt(n * d)
    pooled = mean.mean().abs().item()
    assert pooled <= 4 * se, f"|mean of all coordinates| {pooled:.2e} > {4 * se:.2e} (theory 0)"
    worst = mean.abs().max().item()
    assert worst <= 5 * se, f"max |coordinate mean| {worst:.2e} > {5 * se:.2e} (theory 0)"
    rel = (var * d - 1).abs().max().item()
    assert rel <= 0.02, (f"coordinate variance x d ranges {float(var.min() * d):.4f}.."
                         f"{float(var.max() * d):.4f}, theory 1 +- 0.02")


def test_rotation_kinds():
    """Powers of two use three randomized Hadamard passes (fast on GPU), other dims a Haar QR
    rotation; neither pads, so Pi is exactly d x d.  Distinct seeds give distinct rotations."""
    for d in HEAD_DIMS:
        a, b = rotation_matrix(d, 0), rotation_matrix(d, 1)
        assert a.shape == (d, d) and not torch.equal(a, b)
        if d & (d - 1) == 0:
            # entries of (H D)^3 / d^1.5 are multiples of d^-1.5
            scaled = a.double() * d ** 1.5
            assert np.allclose(scaled.numpy(), np.round(scaled.numpy()), atol=1e-3)
