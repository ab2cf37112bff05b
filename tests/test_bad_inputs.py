"""Bad inputs to every op and public function give a clear error (TQInputError / TQConfigError
naming the argument) or the documented result, never a crash deep inside or a silent wrong
answer.  Device mixes are simulated with the 'meta' device."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import oracle as O
from helpers import codec
from op_samples import samples
from tq_ops import (TQConfig, TQConfigError, TurboQuantAttentionImpl, TurboQuantConfig,
                    codebooks, preset)
from tq_ops._checks import TQInputError
from tq_ops.ops import __all__ as OPS

tq = torch.ops.turboquant


def arg_names(op: str) -> list[str]:
    return [a.name for a in getattr(tq, op).default._schema.arguments]


# Mutations that are *valid* calls, with the reason (they are not bad inputs).
VALID = {
    ("rank+1", n): "(..., D) inputs take any leading dims"
    for n in ("x", "y", "key@encode_keys", "value@encode_values", "residual")
} | {("last-1", "block_table@paged_decode_attention"): "a narrower block table is valid",
     ("last-1", "block_table@paged_prefill_attention"): "a narrower block table is valid",
     ("last-1", "block_table@paged_prefill_prefix"): "a narrower block table is valid",
     ("last-1", "block_table@paged_dequantize"): "a narrower block table is valid"}


def _mutations(t: torch.Tensor):
    if t.is_floating_point():
        yield "int32", t.to(torch.int32)
        yield "float64", t.double()
    else:
        yield "float32", t.float()
    yield "meta", t.to("meta")
    yield "rank+1", t[None]
    yield "rank0", t.reshape(-1)[:1].reshape(())
    if t.dim() and t.shape[-1] > 1:
        yield "last-1", t[..., :-1]


def _cases():
    for op in sorted(OPS):
        args = samples(op)[0]
        for i, (name, a) in enumerate(zip(arg_names(op), args)):
            if not isinstance(a, torch.Tensor):
                continue
            for kind, _ in _mutations(a):
                if (kind, name) in VALID or (kind, f"{name}@{op}") in VALID:
                    continue
                yield pytest.param(op, i, name, kind, id=f"{op}-{name}-{kind}")


@pytest.mark.parametrize("op,i,name,kind", list(_cases()))
def test_bad_tensor_argument_names_it(op, i, name, kind):
    args = list(samples(op)[0])
    args[i] = dict(_mutations(args[i]))[kind]
    with pytest.raises(TQInputError) as err:
        getattr(tq, op)(*args)
    msg = str(err.value)
    assert name in msg, f"the error does not name {name!r}: {msg}"
    if kind == "meta":
        assert "device" in msg, msg


def _int_params(op):
    return [(i, n) for i, (n, a) in enumerate(zip(arg_names(op), samples(op)[0]))
            if n.endswith("bits")]


@pytest.mark.parametrize("bad", (0, 5, 9, -1))
@pytest.mark.parametrize("op,i,name", [(op, i, n) for op in sorted(OPS)
                                       for i, n in _int_params(op)],
                         ids=lambda v: str(v))
def test_bits_out_of_range(op, i, name, bad):
    args = list(samples(op)[0])
    args[i] = bad
    with pytest.raises(TQInputError, match=rf"{name}={bad} is outside 1\.\.4"):
        getattr(tq, op)(*args)


@pytest.mark.parametrize("d,why", [(72, "multiple of 16"), (272, "no stored codebook")])
def test_unsupported_head_dim(d, why):
    rot = torch.eye(d)
    with pytest.raises(TQInputError, match=f"rotation.*{why}"):
        tq.rotate(torch.randn(2, d), rot)
    cen = torch.zeros(4)
    with pytest.raises(TQInputError, match=f"rotation.*{why}"):
        tq.encode_keys(torch.randn(2, d), rot, rot, cen, 2, True)
    with pytest.raises(TQConfigError, match=why):
        TQConfig(head_dim=d)


def test_records_of_another_format_are_refused():
    c = codec(64, 2, True, 3)
    rec = tq.encode_keys(torch.randn(1, 4, 64), c.rotation, c.qjl_projection, c.key_centroids,
                         2, True)
    with pytest.raises(TQInputError, match="key_records last dim must be 18 bytes"):
        tq.key_scores(torch.randn(1, 2, 64), rec, c.rotation, c.qjl_projection,
                      c.key_centroids, 2, False)


def test_gqa_and_kv_start_errors():
    args = list(samples("paged_decode_attention")[0])   # Hq = 4, Hkv = 2
    bad = list(args)
    bad[0] = args[0][:, :3]
    with pytest.raises(TQInputError, match=r"query heads \(3\) must be a positive multiple"):
        tq.paged_decode_attention(*bad)
    bad = list(args)
    bad[-1] = -1
    with pytest.raises(TQInputError, match="kv_start=-1"):
        tq.paged_decode_attention(*bad)
    args = list(samples("attention")[0])
    args[0] = torch.randn(9, 4, 64)  # 9 queries, 2 + 4 + 1 keys
    with pytest.raises(TQInputError, match="9 queries but only 7 keys"):
        tq.attention(*args)


def test_declared_builtin_codebooks():
    """builtin_codebooks=True changes nothing with TQCodec's codebooks and is refused off CUDA
    with other ones (on CUDA it cannot be checked without a sync: perf/gpu_check.py checks that
    the outputs are NaN there)."""
    args = list(samples("paged_decode_attention")[0])
    want = tq.paged_decode_attention(*args)
    assert torch.equal(tq.paged_decode_attention(*args, True), want)
    other = list(args)
    other[11] = args[11] * 1.01   # value centroids
    tq.paged_decode_attention(*other)   # undeclared: any codebook is served
    with pytest.raises(TQInputError, match="value centroids are not the built-in 3-bit"):
        tq.paged_decode_attention(*other, True)


def test_declared_exact16_matrices():
    """exact16_matrices=True changes nothing with TQCodec's matrices (power-of-two head_dim) and
    is refused off CUDA with others (on CUDA it cannot be checked without a sync:
    perf/gpu_check.py and the interpreter tests check that the key norms are NaN there)."""
    args = list(samples("write_cache")[0])     # head_dim 64, TQCodec's matrices
    fresh = args[2].clone()
    tq.write_cache(*args)
    declared = list(args)
    declared[2] = fresh.clone()
    tq.write_cache(*declared, True)
    assert torch.equal(declared[2], args[2])
    off_grid = list(args)
    off_grid[2] = fresh.clone()
    off_grid[5] = args[5] * (1 + 2 ** -12)   # projection entries off the fp16 grid
    tq.write_cache(*off_grid)                # undeclared: any matrix is served
    with pytest.raises(TQInputError, match="exact16_matrices=True"):
        tq.write_cache(*off_grid, True)


def test_exact16_matrix_check():
    from tq_ops.codec import exact16_matrices, qjl_matrix, rotation_matrix

    for d in (16, 32, 64, 128, 256):
        for seed in (0, 1, 12345):
            rot, proj = rotation_matrix(d, seed), qjl_matrix(d, seed)
            assert exact16_matrices(rot, proj), (d, seed)
            assert not exact16_matrices(rot * (1 + 2 ** -18), proj), (d, seed)
            assert not exact16_matrices(rot, proj * (1 + 2 ** -12)), (d, seed)
    # a Haar rotation (head dims that are not powers of two) never qualifies
    assert not exact16_matrices(rotation_matrix(96, 0), qjl_matrix(96, 0))
    # integers above 2048 are not all fp16 values
    big = torch.eye(4) * 4097 / 4 ** 1.5
    assert not exact16_matrices(big, torch.zeros(4, 4))


def test_builtin_codebook_check():
    from tq_ops import codebooks

    c = codebooks.centroids(64, 2)
    assert codebooks.is_builtin(c, 64, 2) and codebooks.is_builtin(c.double(), 64, 2)
    assert not codebooks.is_builtin(c * (1 + 2 ** -20), 64, 2)
    assert not codebooks.is_builtin(c, 128, 2)      # another head_dim's table
    assert not codebooks.is_builtin(c, 63, 2)       # no table at all


# -- empty inputs: documented, shape-correct results ------------------------------------------

def test_empty_inputs_give_empty_results():
    c = codec(64, 2, True, 3)
    rot, proj, kc, vc = c.rotation, c.qjl_projection, c.key_centroids, c.value_centroids
    e = torch.zeros(0, 64)
    assert tq.rotate(e, rot).shape == (0, 64) and tq.unrotate(e, rot).shape == (0, 64)
    codes, norms = tq.mse_quantize(e, rot, vc, 3)
    assert codes.shape == (0, 24) and norms.shape == (0,)
    assert tq.mse_dequantize(codes, norms, rot, vc, 3).shape == (0, 64)
    signs, gamma = tq.qjl_sketch(e, proj)
    assert signs.shape == (0, 8) and gamma.shape == (0,)
    krec = tq.encode_keys(e, rot, proj, kc, 2, True)
    assert krec.shape == (0, 28) and tq.encode_values(e, rot, vc, 3).shape == (0, 26)
    assert tq.key_scores(torch.zeros(2, 0, 64), torch.zeros(2, 5, 28, dtype=torch.uint8), rot,
                         proj, kc, 2, True).shape == (2, 0, 5)
    assert tq.key_scores(torch.zeros(2, 3, 64), torch.zeros(2, 0, 28, dtype=torch.uint8), rot,
                         proj, kc, 2, True).shape == (2, 3, 0)
    z = torch.zeros(0, 2, 64)
    zr = lambda n: torch.zeros(0, 2, n, dtype=torch.uint8)  # noqa: E731
    out = tq.attention(torch.zeros(0, 4, 64), zr(28), zr(26), z, z, z, z, rot, proj, kc, vc, 2,
                       True, 3, 0.125, True)
    assert out.shape == (0, 4, 64)
    with pytest.raises(TQInputError, match="at least one key"):
        tq.attention(torch.zeros(1, 4, 64), zr(28), zr(26), z, z, z, z, rot, proj, kc, vc, 2,
                     True, 3, 0.125, True)
    # write_cache with no tokens leaves the cache alone
    args = list(samples("write_cache")[0])
    cache = args[2].clone()
    tq.write_cache(args[0][:0], args[1][:0], cache, args[3][:0], *args[4:])
    assert torch.equal(cache, args[2])
    # paged decode with no sequences; paged prefill with no tokens
    args = list(samples("paged_decode_attention")[0])
    for j in (0, 2, 3, 6, 7):
        args[j] = args[j][:0]
    assert tq.paged_decode_attention(*args).shape == (0, 4, 64)
    args = list(samples("paged_prefill_attention")[0])
    for j in (0, 1, 2):
        args[j] = args[j][:0]
    args[3] = torch.zeros(4, dtype=torch.int32)
    assert tq.paged_prefill_attention(*args).shape == (0, 4, 64)


# -- non-finite inputs and norms above the fp16 range: the documented result ------------------

@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_nonfinite_and_huge_keys_are_stored_nonfinite(dtype):
    """encode_keys docstring: NaN/Inf give a NaN norm or gamma, a norm above 65504 is stored as
    +inf; every score using that token is then non-finite, other tokens are untouched."""
    c = codec(64, 2, True, 3)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    x[3] = 1e4    # norm 8e4 > 65504 (finite in every input dtype)
    x = x.to(dtype)
    rec = tq.encode_keys(x, c.rotation, c.qjl_projection, c.key_centroids, 2, True)
    _, _, norm, gamma = O.parse_key_record(rec.numpy(), 64, 2, True)
    assert np.isfinite(norm[0]) and np.isfinite(gamma[0])
    assert np.isnan(norm[1]) and not np.isfinite(gamma[2]) and norm[3] == np.inf
    s = tq.key_scores(torch.randn(1, 3, 64), rec[None], c.rotation, c.qjl_projection,
                      c.key_centroids, 2, True)[0]
    assert torch.isfinite(s[:, 0]).all() and not torch.isfinite(s[:, 1:]).any()
    ref = tq.encode_keys(x[:1], c.rotation, c.qjl_projection, c.key_centroids, 2, True)
    assert torch.equal(rec[:1], ref), "a bad row changed another row's record"
    v = tq.encode_values(x, c.rotation, c.value_centroids, 3)
    _, vnorm = O.parse_value_record(v.numpy(), 64, 3)
    assert np.isfinite(vnorm[0]) and np.isnan(vnorm[1]) and vnorm[3] == np.inf


# -- public Python API ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(head_dim=0), "head_dim=0 must be positive"),
    (dict(head_dim=72), "head_dim=72 must be a multiple of 16"),
    (dict(head_dim=128.0), "head_dim must be an int"),
    (dict(key_mse_bits=5), "key_mse_bits=5 is outside 1..4"),
    (dict(key_mse_bits=0), "key_mse_bits=0 is outside 1..4"),
    (dict(key_qjl_bits=2), "key_qjl_bits=2 must be one of"),
    (dict(value_bits=9), "value_bits=9 is outside 1..4"),
    (dict(rotation_seed=-1), "rotation_seed=-1 must be >= 0"),
    (dict(sink_tokens=-2), "sink_tokens=-2 must be >= 0"),
    (dict(flush_interval=-1), "flush_interval=-1 must be >= 0"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_tqconfig_errors(kwargs, match):
    with pytest.raises(TQConfigError, match=match):
        TQConfig(**kwargs)


def test_preset_and_codebook_errors():
    with pytest.raises(TQConfigError, match="unknown preset 'nope'"):
        preset("nope")
    with pytest.raises(TQConfigError, match="head_dim=72"):
        preset("seed", head_dim=72)
    with pytest.raises(ValueError, match="dim=72, bits=2"):
        codebooks.centroids(72, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(b_mse=9), "key_mse_bits=9 is outside 1..4"),
    (dict(num_heads=32, num_kv_heads=5), "num_heads=32 is not divisible by num_kv_heads=5"),
    (dict(head_dim=0), "head_dim=0 must be positive"),
    (dict(num_kv_heads=0), "num_kv_heads=0 must be >= 1"),
    (dict(num_layers="32"), "num_layers must be an int"),
    (dict(device="tpu"), "device='tpu'"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_turboquant_config_errors(kwargs, match):
    with pytest.raises(TQConfigError, match=match):
        TurboQuantConfig(**kwargs)


@pytest.fixture
def impl():
    cfg = TurboQuantConfig(num_heads=4, num_kv_heads=2, head_dim=64, device="cpu")
    return TurboQuantAttentionImpl(4, 64, 0.125, 2, cfg)


@pytest.mark.parametrize("case,match", [
    ("query heads", r"query must be \(T, 256\) or \(T, 4, 64\), got \(3, 3, 64\)"),
    ("key flat", r"key must be \(T, 128\) or \(T, 2, 64\), got \(3, 250\)"),
    ("rank 1", r"query must be .* got \(64,\)"),
    ("tokens", "same number of tokens, got 3, 2, 3"),
    ("int", "query must be float16, bfloat16 or float32, got torch.int32"),
    ("float64", "query must be float16, bfloat16 or float32, got torch.float64"),
    ("mixed dtype", "share one dtype"),
    ("meta", "query is on meta but this layer's cache is on cpu"),
    ("nan key", "key contains NaN or Inf"),
    ("inf value", "value contains NaN or Inf"),
    ("huge key", "a key norm exceeds 65504"),
    ("huge value", "a value norm exceeds 65504"),
    ("dtype change", "differs from the torch.float32 this sequence started with"),
])
def test_attention_impl_bad_inputs_leave_state_unchanged(impl, case, match):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, 64, generator=g) for h in (4, 2, 2))
    impl.forward(q, k, v)                       # a valid prefill first
    before = impl._states[0]
    bad = {"query heads": (torch.randn(3, 3, 64), k, v), "key flat": (q, torch.randn(3, 250), v),
           "rank 1": (q[0, 0], k[0, 0], v[0, 0]), "tokens": (q, k[:2], v),
           "int": (q.int(), k.int(), v.int()), "float64": (q.double(), k.double(), v.double()),
           "mixed dtype": (q.half(), k, v), "meta": (q.to("meta"), k, v),
           "nan key": (q, k.clone().fill_(float("nan")), v),
           "inf value": (q, k, v.clone().fill_(float("inf"))), "huge key": (q, k * 1e4, v),
           "huge value": (q, k, v * 1e4), "dtype change": (q.half(), k.half(), v.half())}[case]
    with pytest.raises(TQInputError, match=match):
        impl.forward(*bad)
    assert impl._states[0] is before, "a failed call replaced the sequence state"
    for t in (before.sink_key, before.buffer_key):
        assert t.dtype == torch.float32
    # and the sequence still works
    out = impl.forward(q[:1], k[:1], v[:1])
    assert out.shape == (1, 4, 64) and torch.isfinite(out).all()


def test_attention_impl_empty_call(impl):
    out = impl.forward(torch.zeros(0, 256), torch.zeros(0, 128), torch.zeros(0, 128))
    assert out.shape == (0, 256) and impl.num_tokens() == 0


def test_attention_impl_constructor_errors():
    with pytest.raises(TQInputError, match=r"query heads \(4\) must be a positive multiple"):
        TurboQuantAttentionImpl(4, 64, 0.125, 3, TurboQuantConfig(num_heads=4, num_kv_heads=2,
                                                                  head_dim=64, device="cpu"))
    with pytest.raises(TQConfigError, match="head_dim=72"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            TurboQuantAttentionImpl(4, 72, 0.125, 2)
