"""Helpers shared by several test files: cached codecs, input generators, readable ids."""
from __future__ import annotations

import functools
import importlib
from pathlib import Path

import numpy as np
import torch

from tq_ops import TQCodec, TQConfig, capabilities

HEAD_DIMS = capabilities.TESTED_HEAD_DIMS
BITS = tuple(range(capabilities.MSE_BITS_RANGE[0], capabilities.MSE_BITS_RANGE[1] + 1))
DTYPES = capabilities.INPUT_DTYPES
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@functools.lru_cache(maxsize=64)
def codec(head_dim: int, key_bits: int = 2, qjl: bool = True, value_bits: int = 3,
          seed: int = 0) -> TQCodec:
    return TQCodec.build(TQConfig(head_dim=head_dim, key_mse_bits=key_bits,
                                  key_qjl_bits=int(qjl), value_bits=value_bits,
                                  rotation_seed=seed))


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


KINDS = ("gauss", "heavy", "outliers", "scaled", "with_zero_rows", "onehot", "constant")


def vectors(rng: np.random.Generator, shape: tuple[int, ...], kind: str,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Test vectors (..., D) of a given structure, as a tensor of `dtype` (float64 generation,
    then one rounding, so the oracle sees exactly the values the reference sees)."""
    d = shape[-1]
    if kind == "gauss":
        x = rng.standard_normal(shape)
    elif kind == "heavy":
        x = rng.standard_t(3, size=shape)
    elif kind == "outliers":  # a Gaussian bulk plus two channels at 20x (algorithm.md 7.4)
        x = rng.standard_normal(shape)
        x[..., rng.choice(d, 2, replace=False)] *= 20
    elif kind == "scaled":  # per-row magnitudes across six decades
        x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 2, size=shape[:-1] + (1,))
    elif kind == "with_zero_rows":
        x = rng.standard_normal(shape)
        x[rng.random(shape[:-1]) < 0.3] = 0
    elif kind == "onehot":
        x = np.zeros(shape)
        idx = rng.integers(0, d, size=shape[:-1])
        np.put_along_axis(x, idx[..., None], rng.uniform(0.5, 3, size=shape[:-1] + (1,)), -1)
    elif kind == "constant":
        x = np.ones(shape) * rng.choice([-1.0, 1.0], size=shape[:-1] + (1,))
    else:
        raise ValueError(kind)
    return torch.from_numpy(x).to(dtype)


def random_unit(gen: torch.Generator, n: int, d: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).float()


def decoded_prefix(args, dtype: torch.dtype):
    """paged_dequantize of a paged_prefill_attention sample's prefixes (its first 20 arguments),
    one row range per sequence: (decoded_key, decoded_value, decoded_start)."""
    (_, _, _, _, cache, table, prefix, _, _, _, _, rot, proj, kc, vc, kb, qjl, vb, _, kv0) = args
    counts = (prefix.to(torch.int64) - kv0).clamp(min=0)
    offsets = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    dk, dv = torch.ops.turboquant.paged_dequantize(cache, table, prefix, offsets,
                                                   int(counts.sum()), rot, proj, kc, vc, kb, qjl,
                                                   vb, kv0, dtype)
    return dk, dv, offsets


def reference_flash(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, max_seqlen_q: int, seqused_k: torch.Tensor,
                    max_seqlen_k: int, block_table: torch.Tensor, softmax_scale: float):
    """FlashAttention's varlen forward over paged K/V without a causal mask, written out in
    float64 with tq_vllm.attend.Flash's arguments (vLLM's flash_attn_varlen_func).

    Sequence s: queries cu[s] .. cu[s+1]-1, keys = the first seqused_k[s] rows of its pages
    block_table[s] (each k_pages[page] holds page_rows consecutive rows).  A sequence without
    keys gets what FA2 gives it (+inf lse) and NaN values, the worst a caller must survive."""
    t, hq, d = q.shape
    hkv = k_pages.shape[2]
    g = hq // hkv
    out = torch.full((t, hq, d), float("nan"), dtype=torch.float64)
    lse = torch.full((hq, t), float("inf"), dtype=torch.float64)
    cu = cu_seqlens_q.tolist()
    for s in range(len(cu) - 1):
        n = int(seqused_k[s])
        assert n <= max_seqlen_k and cu[s + 1] - cu[s] <= max_seqlen_q
        if n == 0 or cu[s + 1] == cu[s]:
            continue
        pages = block_table[s, :-(-n // k_pages.shape[1])].long()
        k = k_pages[pages].reshape(-1, hkv, d)[:n].double().repeat_interleave(g, dim=1)
        v = v_pages[pages].reshape(-1, hkv, d)[:n].double().repeat_interleave(g, dim=1)
        logits = torch.einsum("thd,khd->thk", q[cu[s]:cu[s + 1]].double(), k) * softmax_scale
        out[cu[s]:cu[s + 1]] = torch.einsum("thk,khd->thd", torch.softmax(logits, -1), v)
        lse[:, cu[s]:cu[s + 1]] = torch.logsumexp(logits, -1).t()
    return out.to(q.dtype), lse.float()


def perf_script(monkeypatch, name: str):
    """The module of perf/NAME.py (the perf scripts import each other by bare name, so perf/
    goes on sys.path for the test)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "perf"))
    return importlib.import_module(name)
