"""algorithm.md 7.7-7.9: TurboQuant_prod (b total bits = b-1 MSE bits + 1 QJL bit) through
encode_keys + key_scores.  b = 1 (no MSE stage) runs the same ops with the degenerate codebook
{0, 0}: see tests/stats.py `prod_codebook`."""
from __future__ import annotations

import math

import numpy as np
import pytest

import stats as S
from helpers import BITS
from paper_tables import PROD_VARIANCE_128, d_mse

D = 128
M_SEEDS = 2000


@pytest.fixture(scope="module")
def fixed_pair_estimates():
    pairs = S.fixed_pairs(D)
    import torch
    x = torch.cat([p[0] for p in pairs.values()])
    y = torch.cat([p[1] for p in pairs.values()])
    est = S.prod_over_seeds(x, y, BITS, range(M_SEEDS))
    true = (x.double() * y.double()).sum(-1).numpy()
    return list(pairs), true, est


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_prod_unbiased_for_fixed_pairs(fixed_pair_estimates, bits):
    """For each fixed (x, y) (random, <x,y> = 0.8, one-hot key), over M = 2000 seeds of
    (Pi, S'): |mean(est) - <x,y>| <= 4 SE, SE from the measured spread; and the spread agrees
    with Var <= (pi/(2d)) ||y||^2 D_mse(b-1) (+10%)."""
    names, true, est = fixed_pair_estimates
    e = est[bits]
    lines, failures = [], []
    bound = math.pi / (2 * D) * (1.0 if bits == 1 else d_mse(D, bits - 1))
    for i, name in enumerate(names):
        mean, se = S.mean_se(e[:, i])
        var = float(np.var(e[:, i], ddof=1))
        lines.append(f"{name}: mean {mean:.5f} vs <x,y> {true[i]:.5f}, diff {mean - true[i]:+.2e}"
                     f" (4 SE = {4 * se:.2e}); Var {var:.3e} vs bound {bound:.3e}")
        if abs(mean - true[i]) > 4 * se or var > 1.1 * bound:
            failures.append(lines[-1])
    assert not failures, f"b={bits}, {M_SEEDS} seeds:\n" + "\n".join(failures)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_prod_regression_slope_is_one(bits):
    slope, se = S.prod_slope(D, bits)
    assert abs(slope - 1) <= 0.01, f"b={bits}: slope {slope:.4f} +- {se:.4f}, theory 1 (+-0.01)"
    assert 4 * se < 0.01, f"sample too small: SE {se:.4f}"


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_prod_variance(bits):
    """d E[(est - <x,y>)^2] for random unit x, y within 10% of 1.56 / 0.567 / 0.182 / 0.0534
    (20 000 pairs over 10 (Pi, S'): relative SE ~1%)."""
    got, se = S.prod_variance(D, bits)
    theory = PROD_VARIANCE_128[bits]
    assert abs(got / theory - 1) <= 0.10, (
        f"b={bits}: d E[err^2] = {got:.4f} +- {se:.4f} vs theory {theory} (+-10%)")
    assert 4 * se < 0.10 * theory, f"sample too small: SE {se:.4f}"


@pytest.mark.parametrize("mse_bits", (1, 2, 3), ids=lambda b: f"mse{b}")
def test_qjl_term_slope_with_one_fixed_projection(mse_bits):
    """7.9, the regression test for the seed's transpose bug: with one S' fixed, the QJL term
    regressed on <q, r> over 4000 residuals has slope 1 +- 0.02."""
    slope, se = S.qjl_term_slope(D, mse_bits)
    assert abs(slope - 1) <= 0.02, f"QJL slope {slope:.4f} +- {se:.4f}, theory 1 (+-0.02)"
    assert 4 * se < 0.02, f"sample too small: SE {se:.4f}"


def test_qjl_slope_detects_transposed_projection():
    """Negative control: the same measurement with S'^T on the query side (the seed's bug) gives
    a slope near 1/d, so the test above can fail."""
    slope, se = S.qjl_term_slope(D, 2, transposed_query=True)
    assert abs(slope) < 0.05, f"transposed S' gave slope {slope:.4f} +- {se:.4f}; expected ~1/d"
