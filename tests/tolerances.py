"""Comparison helpers with the tolerance policy of style.md B3, stated once.

* Codes: exact, except a flip to an adjacent code where the oracle's rotated coordinate lies within
  CODE_TIE of a midpoint.  fp32 rotation differs from the float64 one by <= 2.2e-7 (measured over
  every tested head dim and input dtype), so 1e-6 is a 4x margin.
* QJL sign bits: exact, except where |(S' r)_j| <= SIGN_TIE * gamma * sqrt(D): the fp32 projection
  sums D products of size ~gamma, so its rounding error is ~eps32 * gamma * sqrt(D) (measured
  flips at |S' r| ~ 1e-7).
* fp16 scalars (norm, gamma): the same bytes, or neighbouring fp16 values when the float64 value
  lies within FP16_TIE (relative) of the rounding midpoint between them: the reference rounds an
  fp32 value, the oracle a float64 one.
* Floats: float32 arithmetic over D-term sums, see `fp32_tol`.

`reconcile_keys` / `reconcile_values` check those rules and return the oracle encoding with the
reference's choice substituted at the allowed ties only, so downstream comparisons (scores,
attention) stay strict.
"""
from __future__ import annotations

import numpy as np
import torch

import oracle as O

CODE_TIE = 1e-6
SIGN_TIE = 1e-5
FP16_TIE = 1e-5


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        return (t.double() if t.is_floating_point() else t).numpy()
    return np.asarray(t)


def check_codes(ref_codes, enc: O.Encoded, centroids, what: str) -> np.ndarray:
    """Assert ref_codes == oracle codes up to allowed ties; return the mask of tie flips."""
    ref_codes = _np(ref_codes)
    flips = ref_codes != enc.codes
    if flips.any():
        dist = O.distance_to_midpoint(enc.y, centroids)
        bad = flips & ((dist >= CODE_TIE) | (np.abs(ref_codes - enc.codes) != 1))
        assert not bad.any(), (
            f"{what}: {int(bad.sum())} code(s) differ away from a midpoint tie; first at "
            f"{np.argwhere(bad)[0].tolist()}: reference {ref_codes[bad][0]}, oracle "
            f"{enc.codes[bad][0]}, y={enc.y[bad][0]:.9g}, distance to midpoint {dist[bad][0]:.3g}")
    return flips


def check_fp16(ref_bytes, value64, what: str) -> np.ndarray:
    """Assert fp16 scalar bytes match the oracle's rounding of value64 up to ties; returns the
    bytes to use (the reference's at ties)."""
    ref_bytes = np.ascontiguousarray(_np(ref_bytes).astype(np.uint8))
    mine = O.fp16_bytes(value64)
    differ = (ref_bytes != mine).any(-1)
    if differ.any():
        a, b = O.fp16_from_bytes(ref_bytes), O.fp16_from_bytes(mine)
        v = np.asarray(value64, dtype=np.float64)
        # Norms and gammas are >= 0, where adjacent fp16 values have adjacent bit patterns.
        bits_ref = ref_bytes.view("<u2")[..., 0].astype(np.int64)
        bits_mine = mine.view("<u2")[..., 0].astype(np.int64)
        neighbours = np.abs(bits_ref - bits_mine) == 1
        with np.errstate(invalid="ignore"):
            near = np.abs(v - (a + b) / 2) <= FP16_TIE * np.abs(v)
        bad = differ & ~(neighbours & near)
        assert not bad.any(), (
            f"{what}: fp16 bytes differ beyond a rounding tie at {np.argwhere(bad)[0].tolist()}: "
            f"reference {a[bad][0]!r}, oracle {b[bad][0]!r}, float64 value {v[bad][0]!r}")
    return ref_bytes


def reconcile_keys(ref_records, key, rotation, projection, centroids, bits: int, qjl: bool,
                   what: str = "keys") -> O.Encoded:
    """Check reference key records (..., kb) against the oracle; return the reconciled oracle
    encoding whose .record equals ref_records byte for byte when everything is right."""
    ref_records = _np(ref_records)
    d = np.asarray(rotation).shape[0]
    key64, rot, proj = _np(key).astype(np.float64), _np(rotation), _np(projection)
    enc = O.oracle_encode_keys(key64, rot, proj, centroids, bits, qjl)
    ref_codes, ref_pos, _, _ = O.parse_key_record(ref_records, d, bits, qjl)
    flips = check_codes(ref_codes, enc, centroids, what)
    if flips.any():  # at a tie the residual follows the chosen code: redo the sketch with it
        enc = O.oracle_encode_keys(key64, rot, proj, centroids, bits, qjl, codes=ref_codes)
    f = O.split_record(ref_records, O.key_components(d, bits, qjl))
    norm16 = check_fp16(f["k_norm"], enc.norm, f"{what} norm")
    positive = gamma16 = None
    if qjl:
        sflip = ref_pos != enc.positive
        if sflip.any():
            window = SIGN_TIE * enc.gamma[..., None] * np.sqrt(d)
            bad = sflip & (np.abs(enc.proj) > window)
            assert not bad.any(), (
                f"{what}: QJL sign differs away from a tie at {np.argwhere(bad)[0].tolist()}: "
                f"(S' r)_j = {enc.proj[bad][0]:.6g}")
        positive = ref_pos
        gamma16 = check_fp16(f["k_gamma"], enc.gamma, f"{what} gamma")
    enc = O.oracle_encode_keys(key64, rot, proj, centroids, bits, qjl, codes=enc.codes,
                               positive=positive, norm16=norm16, gamma16=gamma16)
    np.testing.assert_array_equal(ref_records, enc.record, err_msg=f"{what}: record bytes")
    return enc


def reconcile_values(ref_records, value, rotation, centroids, bits: int,
                     what: str = "values") -> O.Encoded:
    ref_records = _np(ref_records)
    d = np.asarray(rotation).shape[0]
    v64, rot = _np(value).astype(np.float64), _np(rotation)
    enc = O.oracle_encode_values(v64, rot, centroids, bits)
    ref_codes, _ = O.parse_value_record(ref_records, d, bits)
    check_codes(ref_codes, enc, centroids, what)
    f = O.split_record(ref_records, O.value_components(d, bits))
    norm16 = check_fp16(f["v_norm"], enc.norm, f"{what} norm")
    enc = O.oracle_encode_values(v64, rot, centroids, bits, codes=ref_codes, norm16=norm16)
    np.testing.assert_array_equal(ref_records, enc.record, err_msg=f"{what}: record bytes")
    return enc


def fp32_tol(d: int) -> float:
    """Relative tolerance of an fp32 result built from D-term dot products against float64:
    eps32 * sqrt(D) * 8.  Measured: key_scores errors reach 3% of it (relative to |q| n) over
    d = 64..256, b = 1..4, QJL on/off; the constant leaves room for other inputs, and a real
    bug (a wrong constant, mask or head mapping) is O(1) relative."""
    return 1.2e-7 * np.sqrt(d) * 8


def assert_close_verbose(actual, expected, atol, rtol, what: str) -> None:
    """np.testing-style closeness with the worst element reported (Liger's assert_verbose_allclose)."""
    a, e = _np(actual).astype(np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    err = np.abs(a - e)
    bound = atol + rtol * np.abs(e)
    bad = ~(err <= bound)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.size} elements out of tolerance (atol={atol:.3g}, "
            f"rtol={rtol:.3g}); worst |diff|={np.max(np.where(np.isnan(err), np.inf, err)):.3g}; "
            f"first at {[int(j) for j in i]}: "
            f"actual {a[i]!r} vs expected {e[i]!r}")
