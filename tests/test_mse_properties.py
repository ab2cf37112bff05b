"""algorithm.md 7.3-7.6: distortion of TurboQuant_mse on random and adversarial inputs,
idempotence and scale invariance, and the multiplicative inner-product bias (1 - D_mse).

Measurements go through torch.ops.turboquant.mse_quantize / mse_dequantize (tests/stats.py);
theory comes from tests/paper_tables.py.  Every assertion message prints measured and theory.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracle as O
import stats as S
from helpers import BITS, HEAD_DIMS, codec
from paper_tables import d_mse, mse_bounds
from tolerances import CODE_TIE

tq = torch.ops.turboquant


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_mse_on_random_unit_vectors(d, bits):
    """N = 10 000 random unit vectors, one rotation: within 2% of Table 1b (relative SE
    0.08-0.25%), and strictly between the bounds 4^-b and (sqrt(3) pi / 2) 4^-b."""
    mean, se = S.mse_random(d, bits, n=10000)
    theory = d_mse(d, bits)
    lo, hi = mse_bounds(bits)
    assert abs(mean / theory - 1) <= 0.02, (
        f"d={d} b={bits}: MSE {mean:.5f} +- {se:.5f} vs theory {theory} (+-2%)")
    assert lo < mean < hi, f"d={d} b={bits}: MSE {mean:.5f} outside ({lo:.5f}, {hi:.5f})"


# d = 128 is the acceptance setting: b = 1..4 over 1000 seeds (at b = 4 the per-seed spread is
# ~22-34% of the mean, so 1000 seeds keep the standard error under 1.5% as 7.4 asks).  The other
# head dims run b = 1..3 over 600 seeds (300 gave standard errors of 1.5-1.7% at b = 3, d <= 80).
ADVERSARIAL = [(128, b, 1000) for b in BITS] + [(d, b, 600) for d in HEAD_DIMS if d != 128
                                                 for b in (1, 2, 3)]


@pytest.fixture(scope="module")
def adversarial_results():
    cache = {}

    def get(d, n_seeds):
        if (d, n_seeds) not in cache:
            bits = BITS if d == 128 else (1, 2, 3)
            cache[(d, n_seeds)] = S.mse_adversarial(d, bits, range(n_seeds))
        return cache[(d, n_seeds)]
    return get


@pytest.mark.parametrize("d,bits,n_seeds", ADVERSARIAL,
                         ids=[f"d{d}-b{b}-{n}seeds" for d, b, n in ADVERSARIAL])
def test_mse_on_adversarial_inputs(adversarial_results, d, bits, n_seeds):
    """One-hot, constant 1/sqrt(d), a Hadamard row, 4-spike and bulk + 2 outliers at 20x: the
    average over independent rotation seeds is <= 1.06 x theory with a standard error < 1.5%
    (a single HD pass gives 2.25x on one-hot at b=2; two passes +9% at b=3)."""
    theory = d_mse(d, bits)
    per = adversarial_results(d, n_seeds)
    lines, failures = [], []
    for (name, b), errs in per.items():
        if b != bits:
            continue
        mean, se = S.mean_se(errs)
        lines.append(f"{name}: {mean:.5f} = {mean / theory:.3f} x theory {theory} "
                     f"(SE {se / mean:.2%})")
        if mean > 1.06 * theory or se / mean >= 0.015:
            failures.append(lines[-1])
    assert not failures, f"d={d} b={bits}, {n_seeds} seeds:\n" + "\n".join(failures)


@settings(max_examples=40)
@given(d=st.sampled_from(HEAD_DIMS), bits=st.sampled_from(BITS), seed=st.integers(0, 2**31 - 1),
       rs=st.integers(0, 3), n=st.integers(1, 16))
def test_idempotence_and_scale_invariance(d, bits, seed, rs, n):
    """7.5: Quant(Pi^T c[idx]) = idx; Quant(DeQuant(Quant(x))) = idx with norm ||x~||;
    Quant(alpha x) = Quant(x) with norm alpha ||x|| (exact for powers of two; other alphas
    only move coordinates within CODE_TIE of a midpoint)."""
    c = codec(d, key_bits=bits, seed=rs)
    rot, cen = c.rotation, c.key_centroids
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * 3
    codes, norms = tq.mse_quantize(x, rot, cen, bits)
    idx = O.oracle_unpack_codes(codes.numpy(), d, bits)
    # centroid vector
    cvec = tq.unrotate(cen[torch.from_numpy(idx)], rot)
    codes2, _ = tq.mse_quantize(cvec, rot, cen, bits)
    assert torch.equal(codes2, codes), "Quant(Pi^T c[idx]) != idx"
    # requantize the reconstruction
    xh = tq.mse_dequantize(codes, norms, rot, cen, bits)
    codes3, norms3 = tq.mse_quantize(xh, rot, cen, bits)
    assert torch.equal(codes3, codes), "Quant(DeQuant(Quant(x))) != Quant(x)"
    torch.testing.assert_close(norms3, xh.norm(dim=-1), rtol=1e-6, atol=0)
    # scale invariance
    for alpha in (2.0 ** -20, 0.25, 1024.0):
        ca, na = tq.mse_quantize(x * alpha, rot, cen, bits)
        assert torch.equal(ca, codes), f"codes changed under x -> {alpha} x"
        assert torch.equal(na, norms * alpha)
    for alpha in (1e-3, 3.7, 77.0):
        ca, na = tq.mse_quantize(x * alpha, rot, cen, bits)
        ia = O.oracle_unpack_codes(ca.numpy(), d, bits)
        if not np.array_equal(ia, idx):
            y = O.oracle_rotate(O.oracle_normalize(x.double().numpy())[0], rot.double().numpy())
            dist = O.distance_to_midpoint(y, cen.double().numpy())
            assert (dist[ia != idx] < CODE_TIE).all(), f"alpha={alpha}: codes changed off a tie"
        # two fp32 roundings of a D-term norm: a few ulp
        torch.testing.assert_close(na, norms * alpha, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_zero_vector(d, bits):
    c = codec(d, key_bits=bits)
    codes, norms = tq.mse_quantize(torch.zeros(3, d), c.rotation, c.key_centroids, bits)
    xh = tq.mse_dequantize(codes, norms, c.rotation, c.key_centroids, bits)
    assert torch.equal(norms, torch.zeros(3)) and torch.equal(xh, torch.zeros(3, d))


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_mse_inner_product_bias_is_one_minus_dmse(bits):
    """7.6: slope of <y, x~_mse> on <y, x> is 1 - D_mse(b) +- 0.01 (0.639 / 0.884 / 0.966 /
    0.991 at d=128): catches accidental renormalisation (which gives ~sqrt(1 - D))."""
    slope, se = S.mse_bias_slope(128, bits)
    theory = 1 - d_mse(128, bits)
    assert abs(slope - theory) <= 0.01, (
        f"b={bits}: slope {slope:.4f} +- {se:.4f} vs theory 1 - D_mse = {theory:.4f} (+-0.01)")
    assert 4 * se < 0.01, f"sample too small: SE {se:.4f}"
