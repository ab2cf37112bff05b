"""Monte Carlo measurements of algorithm.md section 7, through the turboquant ops on CPU.

Shared by the property tests (which assert) and tests/report_statistics.py (which prints the
same numbers next to theory).  Each function returns (measured, standard error) or arrays of
estimates; seeds are fixed, so results are reproducible.  Randomness over (Pi, S') means
rotation_matrix(d, seed) / qjl_matrix(d, seed) for many seeds: exactly what TQCodec.build draws.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from tq_ops import codebooks
from tq_ops.codec import hadamard, qjl_matrix, rotation_matrix

tq = torch.ops.turboquant

# Test data seeds stay apart from rotation seeds.  The codec salts its generator streams, but before
# it did, data drawn from Generator().manual_seed(rot_seed) started with the very Gaussian rows whose
# QR is Pi (non-power-of-two dims), which Pi maps to sparse vectors: 17x the b=4 MSE.  Rotation
# seeds used here are < 10**6.
DATA_SEED = 10**6


def unit_rows(gen: torch.Generator, n: int, d: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).float()


def mean_se(v) -> tuple[float, float]:
    v = np.asarray(v, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def slope_se(x, y) -> tuple[float, float]:
    """Least-squares slope of y on x (with intercept) and its standard error."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc = x - x.mean()
    slope = float(xc @ (y - y.mean()) / (xc @ xc))
    resid = y - y.mean() - slope * xc
    se = math.sqrt(float(resid @ resid) / (x.size - 2) / float(xc @ xc))
    return slope, se


def mse_roundtrip(x: torch.Tensor, rotation: torch.Tensor, bits: int) -> torch.Tensor:
    """||x - DeQuant(Quant(x))||^2 per row, through mse_quantize / mse_dequantize."""
    d = rotation.shape[0]
    cen = codebooks.centroids(d, bits)
    codes, norms = tq.mse_quantize(x, rotation, cen, bits)
    xh = tq.mse_dequantize(codes, norms, rotation, cen, bits)
    return ((x.double() - xh.double()) ** 2).sum(-1)


# -- 7.3 and 7.4 -------------------------------------------------------------------------------

def mse_random(d: int, bits: int, n: int = 10000, seed: int = DATA_SEED, rot_seed: int = 0):
    """Mean ||x - x~||^2 over n random unit vectors, one rotation."""
    x = unit_rows(torch.Generator().manual_seed(seed), n, d)
    return mean_se(mse_roundtrip(x, rotation_matrix(d, rot_seed), bits).numpy())


def adversarial_inputs(d: int) -> dict[str, torch.Tensor]:
    """The fixed unit inputs of algorithm.md 7.4 (the Hadamard row only for powers of two)."""
    out = {}
    e = torch.zeros(d, dtype=torch.float64)
    e[d // 3] = 1
    out["one-hot"] = e
    out["constant 1/sqrt(d)"] = torch.full((d,), 1 / math.sqrt(d), dtype=torch.float64)
    if d & (d - 1) == 0:
        out["Hadamard row"] = hadamard(d)[5] / math.sqrt(d)
    spike = torch.zeros(d, dtype=torch.float64)
    spike[[1, d // 4, d // 2, d - 2]] = torch.tensor([0.5, -0.5, 0.5, 0.5], dtype=torch.float64)
    out["4-spike"] = spike
    g = torch.randn(d, generator=torch.Generator().manual_seed(DATA_SEED + 1), dtype=torch.float64)
    g[[3, d - 7]] *= 20
    out["bulk + 2 outliers at 20x"] = g / g.norm()
    return {k: v.float() for k, v in out.items()}


def mse_adversarial(d: int, bits_list=(1, 2, 3, 4), seeds=range(300)):
    """{(name, bits): per-seed MSE array} for each fixed adversarial input, one rotation per seed."""
    inputs = adversarial_inputs(d)
    x = torch.stack(list(inputs.values()))
    per = {(name, b): [] for name in inputs for b in bits_list}
    for s in seeds:
        rot = rotation_matrix(d, s)
        for b in bits_list:
            err = mse_roundtrip(x, rot, b).numpy()
            for i, name in enumerate(inputs):
                per[(name, b)].append(err[i])
    return {k: np.array(v) for k, v in per.items()}


# -- 7.6 ---------------------------------------------------------------------------------------

def correlated_pairs(gen: torch.Generator, n: int, d: int, rho=None):
    """Unit x and unit y with <x, y> = rho (uniform in [-1, 1] when rho is None)."""
    x = unit_rows(gen, n, d).double()
    w = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = w - (w * x).sum(-1, keepdim=True) * x
    w = w / w.norm(dim=-1, keepdim=True)
    r = (torch.rand(n, 1, generator=gen, dtype=torch.float64) * 2 - 1) if rho is None else \
        torch.full((n, 1), float(rho), dtype=torch.float64)
    y = r * x + torch.sqrt(1 - r * r) * w
    return x.float(), y.float()


def mse_bias_slope(d: int, bits: int, n: int = 8000, seed: int = DATA_SEED + 2,
                   rot_seed: int = 0):
    """Slope of <y, x~_mse> on <y, x> for unit x and correlated y, one rotation; x~ from
    mse_quantize / mse_dequantize."""
    x, y = correlated_pairs(torch.Generator().manual_seed(seed), n, d)
    rot = rotation_matrix(d, rot_seed)
    cen = codebooks.centroids(d, bits)
    codes, norms = tq.mse_quantize(x, rot, cen, bits)
    xh = tq.mse_dequantize(codes, norms, rot, cen, bits)
    return slope_se((x.double() * y.double()).sum(-1).numpy(),
                    (xh.double() * y.double()).sum(-1).numpy())


# -- TurboQuant_prod: b total bits = (b - 1) MSE bits + 1 QJL bit ---------------------------

def prod_codebook(d: int, total_bits: int) -> tuple[torch.Tensor, int]:
    """Key codebook and MSE bits for b total bits.  b = 1 has no MSE stage (x~_mse = 0), which
    TQConfig cannot express (key_mse_bits >= 1); it is run through the same ops with the
    degenerate 1-bit codebook {0, 0}: every code reconstructs to 0, the residual is the whole
    rotated unit vector, gamma = 1, and key_scores returns exactly n * sqrt(pi/2)/D * gamma *
    <S' Pi q, sign(S' Pi u)>.  (Storage is then 1 bit too many; only the estimator is tested.)"""
    if total_bits == 1:
        return torch.zeros(2), 1
    return codebooks.centroids(d, total_bits - 1), total_bits - 1


def prod_estimates(x: torch.Tensor, y: torch.Tensor, total_bits: int, rotation, projection):
    """est(y_i, x_i) for paired rows: encode_keys (QJL on) then key_scores, batched over pairs."""
    d = x.shape[-1]
    cen, mb = prod_codebook(d, total_bits)
    rec = tq.encode_keys(x, rotation, projection, cen, mb, True)
    return tq.key_scores(y[:, None, :], rec[:, None, :], rotation, projection, cen, mb,
                         True)[:, 0, 0]


def prod_over_seeds(x: torch.Tensor, y: torch.Tensor, bits_list, seeds) -> dict[int, np.ndarray]:
    """{b: (M, P) estimates} of fixed pairs (x_i, y_i), one (Pi, S') per seed."""
    d = x.shape[-1]
    out = {b: [] for b in bits_list}
    for s in seeds:
        rot, proj = rotation_matrix(d, s), qjl_matrix(d, s)
        for b in bits_list:
            out[b].append(prod_estimates(x, y, b, rot, proj).double().numpy())
    return {b: np.stack(v) for b, v in out.items()}


def fixed_pairs(d: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """algorithm.md 7.7: a random pair, a correlated pair (<x,y> = 0.8) and an adversarial
    one-hot key (with a correlated query, so the one-hot direction matters)."""
    gen = torch.Generator().manual_seed(DATA_SEED + 3)
    xr, yr = unit_rows(gen, 1, d), unit_rows(gen, 1, d)
    xc, yc = correlated_pairs(gen, 1, d, rho=0.8)
    e = torch.zeros(1, d)
    e[0, 7] = 1
    _, ye = correlated_pairs(gen, 1, d, rho=0.8)
    ye = 0.8 * e + 0.6 * (ye - (ye @ e.T) * e) / (ye - (ye @ e.T) * e).norm()
    return {"random": (xr, yr), "correlated 0.8": (xc, yc), "one-hot key": (e, ye)}


def prod_variance(d: int, total_bits: int, n_per_seed: int = 2000, seeds=range(10)):
    """d * E[(est - <x,y>)^2] for independent random unit x, y, over several (Pi, S')."""
    gen = torch.Generator().manual_seed(DATA_SEED + 10 + total_bits)
    errs = []
    for s in seeds:
        x, y = unit_rows(gen, n_per_seed, d), unit_rows(gen, n_per_seed, d)
        est = prod_estimates(x, y, total_bits, rotation_matrix(d, s), qjl_matrix(d, s))
        errs.append((est.double() - (x.double() * y.double()).sum(-1)).numpy())
    e2 = d * np.concatenate(errs) ** 2
    return mean_se(e2)


def prod_slope(d: int, total_bits: int, n_per_seed: int = 1000, seeds=range(8)):
    """Regression slope of est on <x, y> over correlated pairs (<x,y> uniform in [-1, 1])."""
    gen = torch.Generator().manual_seed(DATA_SEED + 20 + total_bits)
    true, est = [], []
    for s in seeds:
        x, y = correlated_pairs(gen, n_per_seed, d)
        est.append(prod_estimates(x, y, total_bits, rotation_matrix(d, s),
                                  qjl_matrix(d, s)).double().numpy())
        true.append((x.double() * y.double()).sum(-1).numpy())
    return slope_se(np.concatenate(true), np.concatenate(est))


# -- 7.9 -------------------------------------------------------------------------------------

def qjl_term_slope(d: int = 128, mse_bits: int = 2, n: int = 4000, seed: int = DATA_SEED + 4,
                   rot_seed: int = 0, transposed_query: bool = False):
    """Slope of the QJL term on <q, r> with ONE (Pi, S') fixed.

    Keys: n random unit vectors; r = x - x~_mse their MSE residual.  Queries are drawn with
    <q, r>/||r|| uniform in +-[0.3, 1] so the regression is well conditioned.  The QJL term is
    key_scores(prod records) - key_scores(MSE-only records) (same codes and norm).  With
    transposed_query=True the query side is recomputed here with S'^T (the seed's transpose bug)
    from the stored signs and gamma: a negative control, expected slope ~ 1/d.
    """
    gen = torch.Generator().manual_seed(seed)
    rot, proj = rotation_matrix(d, rot_seed), qjl_matrix(d, rot_seed)
    cen = codebooks.centroids(d, mse_bits)
    x = unit_rows(gen, n, d)
    codes, norms = tq.mse_quantize(x, rot, cen, mse_bits)
    r = (x.double() - tq.mse_dequantize(codes, norms, rot, cen, mse_bits).double())
    rhat = r / r.norm(dim=-1, keepdim=True)
    w = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = w - (w * rhat).sum(-1, keepdim=True) * rhat
    w = w / w.norm(dim=-1, keepdim=True)
    a = (0.3 + 0.7 * torch.rand(n, 1, generator=gen, dtype=torch.float64)) * \
        torch.where(torch.rand(n, 1, generator=gen) < 0.5, -1.0, 1.0).double()
    q = (a * rhat + torch.sqrt(1 - a * a) * w).float()
    prod = tq.encode_keys(x, rot, proj, cen, mse_bits, True)
    mse = tq.encode_keys(x, rot, proj, cen, mse_bits, False)
    est_mse = tq.key_scores(q[:, None], mse[:, None], rot, proj, cen, mse_bits, False)[:, 0, 0]
    if transposed_query:
        import oracle  # the signs and gamma as stored, read by the independent parser
        _, pos, nrm, gamma = oracle.parse_key_record(prod.numpy(), d, mse_bits, True)
        z = torch.from_numpy(np.where(pos, 1.0, -1.0))
        q_rot = q.double() @ rot.double().T
        u_wrong = q_rot @ proj.double()            # S'^T q_rot instead of S' q_rot
        term = math.sqrt(math.pi / 2) / d * torch.from_numpy(gamma * nrm) * (u_wrong * z).sum(-1)
    else:
        est = tq.key_scores(q[:, None], prod[:, None], rot, proj, cen, mse_bits, True)[:, 0, 0]
        term = est.double() - est_mse.double()
    true = (q.double() * x.double()).sum(-1) - est_mse.double()  # <q, r> with the stored norm
    return slope_se(true.numpy(), term.numpy())
