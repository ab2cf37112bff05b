"""algorithm.md 7.1: the Lloyd-Max codebooks (stored tables in tq_ops) against the paper's
Table 1a / 1b and against the oracle's independent solver and adaptive quadrature."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import oracle as O
from helpers import BITS, HEAD_DIMS, codec
from paper_tables import BETA_128_CENTROIDS, TABLE_1A, TABLE_1B
from tq_ops import codebooks

tq = torch.ops.turboquant
MARGINALS = ("gaussian",) + HEAD_DIMS


def table(marginal, bits) -> np.ndarray:
    """The stored codebook in units of the marginal's standard deviation (float64 table)."""
    from tq_ops.codebook_tables import CENTROIDS
    return np.array(CENTROIDS[(marginal, bits)], dtype=np.float64)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("source", ("tq_ops table", "oracle solver"))
def test_gaussian_codebook_matches_table_1a(source, bits):
    cent = table("gaussian", bits) if source == "tq_ops table" else O.lloyd_max(bits).centroids
    want_c, want_b, want_mse = TABLE_1A[bits]
    half = cent[2 ** (bits - 1):]
    bounds = ((cent[1:] + cent[:-1]) / 2)[2 ** (bits - 1) - 1:]
    assert np.max(np.abs(half - want_c)) <= 1e-4, (half, want_c)
    assert np.max(np.abs(bounds - want_b)) <= 1e-4, (bounds, want_b)
    _, mse = O.quad_cell_stats(bits, "gaussian", cent, (cent[1:] + cent[:-1]) / 2)
    # Table 1a prints 6 decimals: 5e-7 rounding, well inside the 1e-5 tolerance.
    assert abs(mse - want_mse) <= 1e-5, f"quadrature MSE {mse:.7f} vs Table 1a {want_mse}"


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("marginal", MARGINALS, ids=lambda m: m if m == "gaussian" else f"d{m}")
def test_stored_codebook_matches_oracle_lloyd_max(marginal, bits):
    """Both converge to 1e-12; the tables print 15 digits."""
    mine = O.lloyd_max(bits, marginal)
    np.testing.assert_allclose(table(marginal, bits), mine.centroids, rtol=0, atol=1e-9)
    from tq_ops.codebook_tables import MSE
    assert abs(MSE[(marginal, bits)] - mine.mse) <= 1e-9, (MSE[(marginal, bits)], mine.mse)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("marginal", MARGINALS, ids=lambda m: m if m == "gaussian" else f"d{m}")
def test_codebook_symmetric_and_conditional_means(marginal, bits):
    cent = table(marginal, bits)
    assert np.all(np.diff(cent) > 0), "centroids ascending"
    assert np.max(np.abs(cent + cent[::-1])) <= 1e-7, "c_i = -c_(2^b+1-i)"
    bounds = (cent[1:] + cent[:-1]) / 2
    means, mse = O.quad_cell_stats(bits, marginal, cent, bounds)
    assert np.max(np.abs(means - cent)) <= 1e-6, f"centroid != conditional mean: {means - cent}"
    if marginal != "gaussian":
        want = TABLE_1B[int(marginal)][0][bits - 1]
        assert abs(mse - want) <= 1e-5, f"quadrature MSE {mse:.6f} vs Table 1b {want}"
        from tq_ops.codebook_tables import MSE
        assert abs(MSE[(marginal, bits)] - mse) <= 1e-8


@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_table_1b_largest_centroid(d):
    assert abs(table(d, 4)[-1] - TABLE_1B[d][1]) <= 5e-4 + 1e-9  # Table 1b prints 3 decimals


@pytest.mark.parametrize("bits", (2, 3, 4), ids=lambda b: f"b{b}")
def test_d128_beta_centroids(bits):
    half = table(128, bits)[2 ** (bits - 1):]
    assert np.max(np.abs(half - BETA_128_CENTROIDS[bits])) <= 5e-5 + 1e-9  # 4 decimals printed


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
def test_codebook_scaled_by_one_over_sqrt_m(d, bits):
    """The op codebook is the unit-variance table / sqrt(m), m = head_dim (never padded)."""
    c = codec(d, key_bits=bits, value_bits=bits)
    want = torch.from_numpy(table(d, bits) / math.sqrt(d)).float()
    assert torch.equal(c.key_centroids, want) and torch.equal(c.value_centroids, want)
    assert codebooks.centroids(d, bits).dtype == torch.float32


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_decision_boundaries_are_midpoints(bits):
    """With an identity rotation the rotated coordinates are the unit vector itself: a
    coordinate 2e-6 below a midpoint gets the lower code, 2e-6 above the upper one."""
    d = 128
    cen = codebooks.centroids(d, bits).double()
    mids = ((cen[1:] + cen[:-1]) / 2)
    k = len(mids)
    y = torch.zeros(d, dtype=torch.float64)
    y[:k], y[k:2 * k] = mids - 2e-6, mids + 2e-6
    # Fill the rest so that ||y|| = 1 exactly enough that normalising moves nothing by 1e-7.
    rest = math.sqrt(1 - float((y ** 2).sum())) / math.sqrt(d - 2 * k)
    y[2 * k:] = rest
    codes, norms = tq.mse_quantize(y.float()[None], torch.eye(d), cen.float(), bits)
    got = O.oracle_unpack_codes(codes.numpy(), d, bits)[0]
    assert list(got[:k]) == list(range(k)) and list(got[k:2 * k]) == list(range(1, k + 1))
    assert abs(float(norms[0]) - 1) < 1e-6
