"""The backend's format and what it refuses, with the reason the user sees at start-up.

The format comes from the seed's TQ_* variables (tq_ops._env: TQ_PRESET, TQ_B_MSE, TQ_B_QJL,
TQ_VALUE_BITS, TQ_FLUSH_INTERVAL, TQ_SINK_TOKENS, TQ_SEED); head_dim, the number of KV heads and
of layers come from vLLM's model config (TQ_HEAD_DIM / TQ_NUM_* are ignored inside vLLM).
TQ_BOUNDARY_LAYERS=N leaves the first and last N layers to vLLM's own backend (exact K/V).
"""
from __future__ import annotations

import torch

from tq_ops import _env, capabilities
from tq_ops.config import TQConfig, boundary_layer_indices
from tq_vllm.window import Window

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _env_fields() -> tuple:
    v = _env.read_env()
    return (v["b_mse"], v["b_qjl"], v["value_bits"], v["rotation_seed"], v["sink_tokens"],
            v["flush_interval"])


def format_for(head_size: int) -> TQConfig:
    """The TQConfig of a layer with this head size (raises TQConfigError for a bad TQ_* value)."""
    b_mse, b_qjl, vb, seed, sinks, flush = _env_fields()
    return TQConfig(head_dim=head_size, key_mse_bits=b_mse, key_qjl_bits=b_qjl, value_bits=vb,
                    rotation_seed=seed, sink_tokens=sinks, flush_interval=flush)


def boundary_layers() -> int:
    """TQ_BOUNDARY_LAYERS: how many first and last layers stay exact (raises for a bad value)."""
    return int(_env.read_env()["boundary_layers"])


def is_boundary_layer(prefix: str, num_layers: int) -> bool:
    """Whether the attention layer named `prefix` (vLLM's module path, e.g.
    "model.layers.3.self_attn.attn") is one of the first/last TQ_BOUNDARY_LAYERS of the model's
    `num_layers`.  Raises ValueError when the setting cannot be honoured."""
    n = boundary_layers()
    if n == 0:
        return False
    if 2 * n >= num_layers:
        raise ValueError(f"TQ_BOUNDARY_LAYERS={n} keeps all {num_layers} layers of this model "
                         f"exact, leaving nothing to compress: use vLLM's own backend instead "
                         f"(or a value below {(num_layers + 1) // 2})")
    numbers = [int(part) for part in prefix.split(".") if part.isdigit()]
    if len(numbers) != 1:
        raise ValueError(f"TQ_BOUNDARY_LAYERS={n}: cannot tell the layer index of the attention "
                         f"layer {prefix!r} (expected one integer in its module path)")
    return numbers[0] in boundary_layer_indices(n, num_layers)


def window_for(cfg: TQConfig) -> Window:
    return Window(cfg.flush_interval, cfg.sink_tokens)


def layer_problems(*, head_size: int, dtype=None, kv_cache_dtype=None, use_mla=False,
                   has_sink=False, use_sparse=False, attn_type="decoder",
                   has_sliding_window=False, alibi=False, logits_soft_cap=None,
                   kv_sharing=False, head_size_v=None) -> list[str]:
    """Every reason tq_vllm cannot serve this attention layer (empty when it can)."""
    out = []
    if use_mla:
        out.append("MLA (latent KV) is not supported: TurboQuant codes per-head K/V vectors")
    if use_sparse:
        out.append("sparse attention is not supported")
    if str(getattr(attn_type, "value", attn_type)) != "decoder":
        out.append(f"attention type {attn_type} is not supported (decoder self-attention only: "
                   f"the compressed cache is written and read causally)")
    if has_sliding_window:
        out.append("sliding-window attention is not supported (the flush buffer and the "
                   "compressed pages assume full causal attention)")
    if has_sink:
        out.append("learned attention sinks (per-head sink logits) are not supported")
    if alibi:
        out.append("ALiBi position biases are not supported")
    if logits_soft_cap:
        out.append("logits soft-capping is not supported")
    if kv_sharing:
        out.append("cross-layer KV sharing is not supported")
    if head_size_v is not None and head_size_v != head_size:
        out.append(f"different K and V head sizes ({head_size} / {head_size_v}) are not supported")
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        out.append(f"model dtype {dtype} is not supported (float16, bfloat16 or float32)")
    if kv_cache_dtype not in (None, "auto"):
        out.append(f"--kv-cache-dtype {kv_cache_dtype} cannot be combined with TurboQuant "
                   f"compression (leave it at auto; the format comes from TQ_PRESET/TQ_*)")
    out += [f"head_size {head_size}: {p}" for p in capabilities.head_dim_problems(head_size)]
    return out


def raise_if_problems(problems: list[str]) -> None:
    if problems:
        raise ValueError("tq_vllm (TurboQuant KV backend) cannot serve this model: "
                         + "; ".join(problems))


def scheduling_problems(cfg: TQConfig, *, block_size: int, prefix_caching: bool) -> list[str]:
    """Engine settings under which the flush buffer could not be exact."""
    out = []
    w = window_for(cfg)
    if prefix_caching and w.group > 1 and block_size % w.group:
        out.append(f"prefix caching needs block_size to be a multiple of TQ_FLUSH_INTERVAL="
                   f"{cfg.flush_interval} (got block_size={block_size}): a cache hit must end "
                   f"at a flush point, since the exact tokens of a cached prefix are not kept; "
                   f"set block_size={w.group * max(1, -(-block_size // w.group))}, disable "
                   f"prefix caching, or pick a TQ_FLUSH_INTERVAL dividing the block size")
    if prefix_caching and cfg.sink_tokens:
        out.append(f"TQ_SINK_TOKENS={cfg.sink_tokens} needs prefix caching disabled: the exact "
                   f"sink tokens of a cached prefix are not kept")
    return out
