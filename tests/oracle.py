"""NumPy float64 oracle of TurboQuant, written from the paper and the layout spec.  It imports
nothing from tq_ops: it is an independent reading that guards against a misunderstanding shared by
the reference and the kernels.

Sources:
  * TurboQuant (arXiv 2504.19874): Algorithm 1 (MSE quantizer), Algorithm 2 (inner-product
    quantizer), Lemma 1 (the coordinate marginal of a uniform unit vector);
  * QJL (arXiv 2406.03482) Lemma 3.2 for the sqrt(pi/2)/m constant with N(0,1) rows;
  * the byte layout as *described in prose* in the docstring of tq_ops/layout.py (bit planes of
    widths 4, 2, 1; coordinate j of a w-bit plane at byte (j*w)//8, bit (j*w)%8, LSB first; sign
    bit 1 = projection >= 0; fp16 little-endian scalars; slot = key record then value record;
    component-major pages).  The code below re-implements that prose with explicit loops.

Randomness is data: the rotation Pi (D, D) and the QJL matrix S' (D, D) come in as arrays.  The
residual is sketched in the rotated domain, r = Pi u - c[code], with S' = S Pi^T (algorithm.md 2.1
step 5), so the score of a query q is
    n * ( <Pi q, c[code]> + gamma * sqrt(pi/2)/D * <S' Pi q, z> ),   z = +-1.
Every other number (codebooks, codes, packing, norms, scores, softmax) is computed here in float64.
Names follow `oracle_<op>`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import integrate, special

# ---------------------------------------------------------------------------------------------
# Codebooks: Lloyd-Max on a 1-D density by numeric quadrature
# ---------------------------------------------------------------------------------------------

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(160)
_GAUSS_EDGE = 14.0  # N(0,1) tail mass beyond 14 is ~1e-44: the outer cells are cut there


def gaussian_density(t):
    return np.exp(-0.5 * np.asarray(t, dtype=np.float64) ** 2) / math.sqrt(2 * math.pi)


def sphere_density(t, m: int):
    """Density of t = sqrt(m) * x, x one coordinate of a uniform unit vector in R^m.

    Lemma 1: f_x(x) = Gamma(m/2) / (sqrt(pi) Gamma((m-1)/2)) (1 - x^2)^((m-3)/2) on [-1, 1];
    in t units divide by sqrt(m).  Unit variance; tends to N(0, 1).
    """
    t = np.asarray(t, dtype=np.float64)
    log_c = special.gammaln(m / 2) - 0.5 * math.log(math.pi) - special.gammaln((m - 1) / 2)
    inside = np.clip(1.0 - t * t / m, 0.0, None)
    return np.exp(log_c) * inside ** ((m - 3) / 2) / math.sqrt(m)


def _density_and_edge(marginal):
    if marginal == "gaussian":
        return gaussian_density, _GAUSS_EDGE
    m = int(marginal)
    return (lambda t: sphere_density(t, m)), math.sqrt(m)


def _cell_integrals(density, lo, hi):
    """Gauss-Legendre mass, first and second moment of each cell [lo_i, hi_i]."""
    half = (hi - lo)[:, None] / 2
    t = (hi + lo)[:, None] / 2 + half * _GL_NODES[None, :]
    w = half * _GL_WEIGHTS[None, :] * density(t)
    return w.sum(1), (w * t).sum(1), (w * t * t).sum(1)


@dataclass(frozen=True)
class Codebook:
    """Lloyd-Max codebook in units of the marginal's standard deviation (1/sqrt(m) on the sphere).

    centroids: (2**b,) ascending; boundaries: (2**b - 1,) midpoints; mse: expected squared error
    per unit variance, which is D_mse of a unit vector (paper Thm 1 proof: D = m * C(f, b)).
    """

    bits: int
    marginal: object
    centroids: np.ndarray
    boundaries: np.ndarray
    mse: float
    iterations: int


@functools.lru_cache(maxsize=None)
def lloyd_max(bits: int, marginal="gaussian", tol: float = 1e-13, max_iter: int = 100000) -> Codebook:
    """Continuous Lloyd-Max ("boundaries = midpoints; centroid = conditional mean of its cell")
    started at the Gaussian quantiles, iterated until no centroid moves by more than `tol`.

    marginal: "gaussian" for N(0,1), or an int m for the exact sphere marginal at dimension m.
    Only the non-negative half is solved and mirrored, so the codebook is exactly symmetric and
    the middle boundary is exactly 0.
    """
    density, edge = _density_and_edge(marginal)
    n = 2 ** bits
    half = n // 2
    # Gaussian quantiles of the upper half: Phi^-1((half + i + 0.5) / n).
    pos = special.ndtri((half + np.arange(half) + 0.5) / n)
    it = 0
    for it in range(1, max_iter + 1):
        full = np.concatenate([-pos[::-1], pos])
        mids = (full[1:] + full[:-1]) / 2
        lo = np.concatenate([[0.0], mids[half:]])
        hi = np.concatenate([mids[half:], [edge]])
        mass, first, _ = _cell_integrals(density, lo, hi)
        new = first / mass
        moved = np.max(np.abs(new - pos))
        pos = new
        if moved < tol:
            break
    centroids = np.concatenate([-pos[::-1], pos])
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    boundaries[half - 1] = 0.0
    lo = np.concatenate([[-edge], boundaries])
    hi = np.concatenate([boundaries, [edge]])
    mass, first, second = _cell_integrals(density, lo, hi)
    mse = float(np.sum(second - 2 * centroids * first + centroids**2 * mass))
    return Codebook(bits, marginal, centroids, boundaries, mse, it)


def quad_cell_stats(bits: int, marginal, centroids, boundaries):
    """Adaptive-quadrature (scipy.integrate.quad) conditional means of every cell and the MSE:
    an independent check of a codebook, not used by the solver."""
    density, edge = _density_and_edge(marginal)
    lo = np.concatenate([[-edge], boundaries])
    hi = np.concatenate([boundaries, [edge]])
    means, mse = [], 0.0
    for a, b, c in zip(lo, hi, centroids):
        kw = dict(epsabs=1e-14, epsrel=1e-12, limit=200)
        p = integrate.quad(density, a, b, **kw)[0]
        m1 = integrate.quad(lambda t: t * density(t), a, b, **kw)[0]
        m2 = integrate.quad(lambda t: (t - c) ** 2 * density(t), a, b, **kw)[0]
        means.append(m1 / p)
        mse += m2
    return np.array(means), mse


def centroids_for(dim: int, bits: int, marginal="sphere") -> np.ndarray:
    """(2**bits,) centroids for rotated unit vectors in R^dim, already scaled by 1/sqrt(dim)."""
    cb = lloyd_max(bits, dim if marginal == "sphere" else "gaussian")
    return cb.centroids / math.sqrt(dim)


# ---------------------------------------------------------------------------------------------
# Algorithm 1: the MSE quantizer
# ---------------------------------------------------------------------------------------------

def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def oracle_normalize(x):
    """(..., D) -> unit (..., D), norm (...,).  The zero vector keeps u = 0 and n = 0."""
    x = f64(x)
    norm = np.sqrt(np.sum(x * x, axis=-1))
    safe = np.where(norm > 0, norm, 1.0)
    return x / safe[..., None], norm


def oracle_rotate(x, rotation):
    """y = Pi x for row vectors: (..., D) @ Pi^T."""
    return f64(x) @ f64(rotation).T


def oracle_unrotate(y, rotation):
    """x = Pi^T y for row vectors: (..., D) @ Pi."""
    return f64(y) @ f64(rotation)


def oracle_quantize_rotated(y, centroids):
    """Code of each rotated coordinate: the number of midpoints strictly below it (Voronoi cells;
    a coordinate exactly on a midpoint goes to the lower cell)."""
    c = f64(centroids)
    mids = (c[1:] + c[:-1]) / 2
    y = f64(y)
    codes = np.zeros(y.shape, dtype=np.int64)
    for mid in mids:
        codes += (y > mid)
    return codes


def distance_to_midpoint(y, centroids):
    """Distance of each rotated coordinate to its nearest midpoint (to recognise ties)."""
    c = f64(centroids)
    mids = (c[1:] + c[:-1]) / 2
    return np.min(np.abs(f64(y)[..., None] - mids), axis=-1)


def oracle_mse_quantize(x, rotation, centroids):
    """Algorithm 1 Quant: codes (..., D) int64, norms (...,), and the rotated unit vector y."""
    unit, norm = oracle_normalize(x)
    y = oracle_rotate(unit, rotation)
    return oracle_quantize_rotated(y, centroids), norm, y


def oracle_mse_dequantize(codes, norms, rotation, centroids):
    """Algorithm 1 DeQuant: n * Pi^T c[code]."""
    return oracle_unrotate(f64(centroids)[codes], rotation) * f64(norms)[..., None]


# ---------------------------------------------------------------------------------------------
# QJL and Algorithm 2
# ---------------------------------------------------------------------------------------------

def qjl_constant(m: int) -> float:
    """sqrt(pi/2)/m for m projections with i.i.d. N(0,1) rows (QJL Lemma 3.2)."""
    return math.sqrt(math.pi / 2) / m


def oracle_qjl_sketch(residual, projection):
    """Signs z = sign(S' r) as booleans (True = +1, i.e. projection >= 0), gamma = ||r||, and the
    projection itself (to recognise sign ties)."""
    r = f64(residual)
    proj = r @ f64(projection).T
    return proj >= 0, np.sqrt(np.sum(r * r, axis=-1)), proj


def oracle_prod_estimate(q, codes, positive, norm, gamma, rotation, projection, centroids):
    """Algorithm 2 inner-product estimate for matching rows of q (..., D) and an encoded key.

    est = n * (<Pi q, c[code]> + gamma sqrt(pi/2)/D <S' Pi q, z>); positive=None means MSE only.
    """
    q_rot = oracle_rotate(q, rotation)
    est = np.sum(q_rot * f64(centroids)[codes], axis=-1)
    if positive is not None:
        d = q_rot.shape[-1]
        z = np.where(positive, 1.0, -1.0)
        u = q_rot @ f64(projection).T
        est = est + qjl_constant(d) * f64(gamma) * np.sum(u * z, axis=-1)
    return f64(norm) * est


# ---------------------------------------------------------------------------------------------
# Byte layout, from the prose spec, with explicit loops
# ---------------------------------------------------------------------------------------------

def plane_widths(bits: int) -> list[int]:
    """b-bit codes are split into planes of widths 4, 2, 1 (largest first; b=3 -> 2 then 1)."""
    widths, left = [], bits
    for w in (4, 2, 1):
        if left >= w:
            widths.append(w)
            left -= w
    assert left == 0, bits
    return widths


def oracle_pack_codes(codes, bits: int) -> np.ndarray:
    """(..., D) ints in [0, 2**bits) -> (..., D*bits/8) uint8.  Plane p (width w) holds the code
    bits above the planes before it; coordinate j sits in byte (j*w)//8 of the plane at bit
    (j*w)%8, least significant bit first."""
    codes = np.asarray(codes, dtype=np.int64)
    d = codes.shape[-1]
    out = np.zeros(codes.shape[:-1] + (d * bits // 8,), dtype=np.int64)
    start, shift = 0, 0
    for w in plane_widths(bits):
        for j in range(d):
            part = (codes[..., j] >> shift) & ((1 << w) - 1)
            out[..., start + (j * w) // 8] |= part << ((j * w) % 8)
        start += d * w // 8
        shift += w
    return out.astype(np.uint8)


def oracle_unpack_codes(packed, d: int, bits: int) -> np.ndarray:
    packed = np.asarray(packed, dtype=np.int64)
    codes = np.zeros(packed.shape[:-1] + (d,), dtype=np.int64)
    start, shift = 0, 0
    for w in plane_widths(bits):
        for j in range(d):
            part = (packed[..., start + (j * w) // 8] >> ((j * w) % 8)) & ((1 << w) - 1)
            codes[..., j] |= part << shift
        start += d * w // 8
        shift += w
    return codes


def fp16_bytes(x) -> np.ndarray:
    """(...,) -> (..., 2) uint8: the value rounded to IEEE fp16, little-endian."""
    h = np.asarray(x, dtype=np.float64).astype("<f2")
    return h.view(np.uint8).reshape(h.shape + (2,))


def fp16_from_bytes(b) -> np.ndarray:
    b = np.ascontiguousarray(np.asarray(b, dtype=np.uint8))
    return b.view("<f2")[..., 0].astype(np.float64)


def key_components(d: int, bits: int, qjl: bool) -> list[tuple[str, int]]:
    comps = [("k_codes", d * bits // 8)]
    if qjl:
        comps.append(("k_signs", d // 8))
    comps.append(("k_norm", 2))
    if qjl:
        comps.append(("k_gamma", 2))
    return comps


def value_components(d: int, bits: int) -> list[tuple[str, int]]:
    return [("v_codes", d * bits // 8), ("v_norm", 2)]


def key_record_bytes(d: int, bits: int, qjl: bool) -> int:
    """ceil(m*b/8) + 2 (+ ceil(m/8) + 2 with QJL), algorithm.md 7.11."""
    return math.ceil(d * bits / 8) + 2 + ((math.ceil(d / 8) + 2) if qjl else 0)


def value_record_bytes(d: int, bits: int) -> int:
    return math.ceil(d * bits / 8) + 2


def split_record(record, comps) -> dict[str, np.ndarray]:
    out, off = {}, 0
    for name, size in comps:
        out[name] = np.asarray(record)[..., off:off + size]
        off += size
    return out


# ---------------------------------------------------------------------------------------------
# Encoded records
# ---------------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """An oracle encoding of (..., D) vectors plus what is needed to recognise ties."""

    codes: np.ndarray          # (..., D) int64
    y: np.ndarray              # (..., D) rotated unit vectors
    norm: np.ndarray           # (...,) float64, before fp16 rounding
    positive: np.ndarray | None = None   # (..., D) bool sign bits
    proj: np.ndarray | None = None       # (..., D) S' r
    gamma: np.ndarray | None = None      # (...,) float64
    record: np.ndarray | None = None     # (..., record_bytes) uint8


def oracle_encode_keys(key, rotation, projection, centroids, bits: int, qjl: bool,
                       codes=None, positive=None, norm16=None, gamma16=None) -> Encoded:
    """Key records: codes | signs | norm fp16 | gamma fp16 (signs and gamma only with QJL).

    The keyword overrides substitute choices at ties (see tests/tolerances.py): codes (..., D),
    positive (..., D) bool, norm16 / gamma16 (..., 2) uint8.
    """
    c = f64(centroids)
    own_codes, norm, y = oracle_mse_quantize(key, rotation, c)
    codes = own_codes if codes is None else np.asarray(codes, dtype=np.int64)
    parts = [oracle_pack_codes(codes, bits)]
    enc = Encoded(codes=codes, y=y, norm=norm)
    if qjl:
        pos, gamma, proj = oracle_qjl_sketch(y - c[codes], projection)
        enc.positive = pos if positive is None else np.asarray(positive, dtype=bool)
        enc.proj, enc.gamma = proj, gamma
        parts.append(oracle_pack_codes(enc.positive.astype(np.int64), 1))
    parts.append(fp16_bytes(norm) if norm16 is None else np.asarray(norm16, dtype=np.uint8))
    if qjl:
        parts.append(fp16_bytes(enc.gamma) if gamma16 is None else np.asarray(gamma16, np.uint8))
    enc.record = np.concatenate(parts, axis=-1)
    return enc


def oracle_encode_values(value, rotation, centroids, bits: int, codes=None, norm16=None) -> Encoded:
    """Value records: codes | norm fp16."""
    own_codes, norm, y = oracle_mse_quantize(value, rotation, centroids)
    codes = own_codes if codes is None else np.asarray(codes, dtype=np.int64)
    n16 = fp16_bytes(norm) if norm16 is None else np.asarray(norm16, dtype=np.uint8)
    return Encoded(codes=codes, y=y, norm=norm,
                   record=np.concatenate([oracle_pack_codes(codes, bits), n16], axis=-1))


def parse_key_record(record, d: int, bits: int, qjl: bool):
    """-> codes (..., D), positive (..., D) bool or None, norm (...,), gamma (...,) or None."""
    f = split_record(record, key_components(d, bits, qjl))
    codes = oracle_unpack_codes(f["k_codes"], d, bits)
    norm = fp16_from_bytes(f["k_norm"])
    if not qjl:
        return codes, None, norm, None
    positive = oracle_unpack_codes(f["k_signs"], d, 1).astype(bool)
    return codes, positive, norm, fp16_from_bytes(f["k_gamma"])


def parse_value_record(record, d: int, bits: int):
    f = split_record(record, value_components(d, bits))
    return oracle_unpack_codes(f["v_codes"], d, bits), fp16_from_bytes(f["v_norm"])


# ---------------------------------------------------------------------------------------------
# Scores and attention
# ---------------------------------------------------------------------------------------------

def oracle_key_scores(query, key_records, rotation, projection, centroids, bits: int, qjl: bool):
    """query (B, Tq, D), key_records (B, Tk, kb) -> (B, Tq, Tk) estimates from the stored record
    (fp16 norm and gamma as stored)."""
    q = f64(query)
    d = q.shape[-1]
    codes, positive, norm, gamma = parse_key_record(key_records, d, bits, qjl)
    b, tq, tk = q.shape[0], q.shape[1], codes.shape[1]
    out = np.zeros((b, tq, tk))
    for i in range(b):
        for j in range(tk):
            out[i, :, j] = oracle_prod_estimate(
                q[i], codes[i, j], None if positive is None else positive[i, j], norm[i, j],
                None if gamma is None else gamma[i, j], rotation, projection, centroids)
    return out


def oracle_decode_values(value_records, rotation, centroids, bits: int):
    """(..., vb) -> (..., D): n Pi^T c[code] with the stored fp16 norm."""
    d = f64(rotation).shape[0]
    codes, norm = parse_value_record(value_records, d, bits)
    return oracle_mse_dequantize(codes, norm, rotation, centroids)


def oracle_attention(query, key_records, value_records, sink_key, sink_value, recent_key,
                     recent_value, rotation, projection, key_centroids, value_centroids,
                     key_bits: int, qjl: bool, value_bits: int, scale: float, causal: bool):
    """Single-sequence attention.  The sequence is [sinks (exact) | compressed | recent (exact)],
    L tokens; the Tq queries are its last Tq positions; one softmax over all keys; query head h
    reads KV head h // (Hq / Hkv).  Returns (Tq, Hq, D) float64."""
    q = f64(query)
    tq, hq, d = q.shape
    hkv = np.asarray(key_records).shape[1]
    g = hq // hkv
    n_s, n_c, n_r = len(sink_key), np.asarray(key_records).shape[0], len(recent_key)
    total = n_s + n_c + n_r
    out = np.zeros((tq, hq, d))
    if n_c:
        values_c = oracle_decode_values(value_records, rotation, value_centroids, value_bits)
    for h in range(hq):
        kv = h // g
        for i in range(tq):
            logits = np.empty(total)
            vals = np.empty((total, d))
            for t in range(n_s):
                logits[t] = f64(sink_key)[t, kv] @ q[i, h]
                vals[t] = f64(sink_value)[t, kv]
            if n_c:
                codes, positive, norm, gamma = parse_key_record(
                    np.asarray(key_records)[:, kv], d, key_bits, qjl)
                logits[n_s:n_s + n_c] = oracle_prod_estimate(
                    np.broadcast_to(q[i, h], (n_c, d)), codes, positive, norm, gamma, rotation,
                    projection, key_centroids)
                vals[n_s:n_s + n_c] = values_c[:, kv]
            for t in range(n_r):
                logits[n_s + n_c + t] = f64(recent_key)[t, kv] @ q[i, h]
                vals[n_s + n_c + t] = f64(recent_value)[t, kv]
            logits *= scale
            if causal:
                pos = total - tq + i
                logits[pos + 1:] = -np.inf
            if total == 0 or np.all(np.isneginf(logits)):
                continue
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[i, h] = p @ vals
    return out


def exact_attention(query, key, value, scale: float, causal: bool):
    """Uncompressed float64 attention: query (Tq, Hq, D), key/value (L, Hkv, D)."""
    q, k, v = f64(query), f64(key), f64(value)
    tq, hq, d = q.shape
    g = hq // k.shape[1]
    total = k.shape[0]
    out = np.zeros((tq, hq, d))
    for h in range(hq):
        logits = q[:, h] @ k[:, h // g].T * scale
        if causal:
            pos = total - tq + np.arange(tq)
            logits = np.where(np.arange(total)[None, :] > pos[:, None], -np.inf, logits)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, h] = p @ v[:, h // g]
    return out


# ---------------------------------------------------------------------------------------------
# Paged cache, from the prose spec
# ---------------------------------------------------------------------------------------------

def slot_components(d: int, key_bits: int, qjl: bool, value_bits: int):
    return key_components(d, key_bits, qjl) + value_components(d, value_bits)


def slot_bytes(d: int, key_bits: int, qjl: bool, value_bits: int) -> int:
    return sum(s for _, s in slot_components(d, key_bits, qjl, value_bits))


def oracle_write_cache(cache, key_records, value_records, slot_mapping, d, key_bits, qjl,
                       value_bits):
    """Store token i's records at slot slot_mapping[i] (block = slot // bs, offset = slot % bs) of
    cache (NB, Hkv, bs * slot_bytes) uint8, in place; slots < 0 are skipped.  Inside one
    (block, head) page, component c of the token at offset t starts at byte
    bs * slot_offset(c) + t * size(c)."""
    comps = slot_components(d, key_bits, qjl, value_bits)
    sb = sum(s for _, s in comps)
    bs = cache.shape[2] // sb
    kcomps, vcomps = key_components(d, key_bits, qjl), value_components(d, value_bits)
    for i, slot in enumerate(np.asarray(slot_mapping).tolist()):
        if slot < 0:
            continue
        blk, t = slot // bs, slot % bs
        for h in range(cache.shape[1]):
            fields = {**split_record(key_records[i, h], kcomps),
                      **split_record(value_records[i, h], vcomps)}
            slot_off = 0
            for name, size in comps:
                start = bs * slot_off + t * size
                cache[blk, h, start:start + size] = fields[name]
                slot_off += size
    return cache


def oracle_read_page_slot(cache, blk: int, t: int, d, key_bits, qjl, value_bits):
    """-> key record (Hkv, kb), value record (Hkv, vb) of the token at offset t of block blk."""
    comps = slot_components(d, key_bits, qjl, value_bits)
    bs = cache.shape[2] // sum(s for _, s in comps)
    fields, slot_off = {}, 0
    for name, size in comps:
        start = bs * slot_off + t * size
        fields[name] = cache[blk, :, start:start + size]
        slot_off += size
    krec = np.concatenate([fields[n] for n, _ in key_components(d, key_bits, qjl)], axis=-1)
    vrec = np.concatenate([fields[n] for n, _ in value_components(d, value_bits)], axis=-1)
    return krec, vrec
