"""A transformers KV cache that keeps TurboQuant-compressed keys and values and attends over them
through ``torch.ops.turboquant.attention``.

    from transformers import AutoModelForCausalLM
    from tq_ops.hf_cache import TurboQuantCache, register
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register())
    cache = TurboQuantCache.for_model(model, "k3v3", sink_tokens=4, flush_interval=128)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)

How it plugs in.  transformers calls ``past_key_values.update(k, v, layer_idx)`` and hands what it
returns to the registered attention function as ``key``/``value``.  Our layers return a
`CompressedKV` handle to their own state instead of dequantized tensors, and the attention function
registered as ``"turboquant"`` scores the query against the packed records with the op: keys are never
dequantized to memory (for QJL keys the op evaluates the unbiased estimator from codes, signs and
gamma).  With any other cache (e.g. the default DynamicCache) the same attention function is plain
SDPA, so one loaded model serves both the exact baseline and the compressed runs.

What each layer keeps, per batch row (rows of a batch must have equal lengths: no padding):
  * sinks: the first ``config.sink_tokens`` tokens, exact;
  * the compressed middle: packed key and value records (`tq_ops.layout`);
  * the recent buffer: the newest tokens, exact (the seed's flush buffer).  At the start of each
    ``update``, when it holds at least ``flush_interval`` tokens, its oldest
    ``floor(len / flush_interval) * flush_interval`` tokens are compressed.  So decode flushes every
    ``flush_interval`` tokens as the seed does, a prefill chunk attends its own tokens exactly, and a
    sequence fed in chunks aligned to the flush boundary ends in the same state as one fed token by
    token.
  * ``flush_interval == 0``: every token after the sinks is compressed when written, before attention,
    so each query reads every key, its own included, compressed (vLLM's store-then-attend order).
  * exact layers (``exact_layers``, e.g. the first and last N: "boundary protection"): nothing is
    compressed; attention still goes through the op, with an empty compressed part.

Per-layer formats: a `LayerPlan` gives every layer its own TQConfig (same head_dim, sinks and flush
interval, different bits) and the set of exact layers, e.g. 4-bit keys on the layers where 3-bit
keys hurt most; ``TurboQuantCache.for_model(model, plan)``.  Its `bits_per_channel` is the one place
where the effective bits of a cache are counted.

Other formats (the vLLM and KIVI baselines of ``tq_ops.eval``) plug in through `Compressor`; they run
through the same cache and the same op.

torch.compile: the cache grows by concatenation and is not ``is_compileable`` (transformers' generate
does not auto-compile it).  ``torch.compile(model)`` over a forward loop works (dynamo traces the cache
update and the op through its fake kernel, recompiling as shapes change); see the README.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from tq_ops import ops as tq
from tq_ops.codec import TQCodec
from tq_ops.config import TQConfig, boundary_layer_indices, preset

ATTN_IMPLEMENTATION = "turboquant"


# -- formats -----------------------------------------------------------------------------------

class Compressor(Protocol):
    """A KV format: how a block of tokens is stored and how a query attends over the result.

    Attributes:
        slot_bytes: stored bytes per (token, KV head), key and value together.
    """

    slot_bytes: int

    def compress(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """key, value (B, T, Hkv, D) -> stored keys, stored values (B, T, Hkv, *)."""

    def attend(self, query: Tensor, comp_key: Tensor, comp_value: Tensor, sink_key: Tensor,
               sink_value: Tensor, recent_key: Tensor, recent_value: Tensor,
               scale: float) -> Tensor:
        """One sequence: query (Tq, Hq, D); comp_* (Tc, Hkv, *) as `compress` made them; sink_* (S,
        Hkv, D) and recent_* (R, Hkv, D) exact.  The queries are the last Tq positions of the S + Tc +
        R tokens, causal.  Returns (Tq, Hq, D) in query.dtype."""


class TQCompressor:
    """The TurboQuant format of a TQConfig, through the turboquant ops."""

    def __init__(self, config: TQConfig, device: torch.device | str):
        self.config = config
        self.codec = TQCodec.build(config, device)
        self.slot_bytes = config.slot_bytes

    def compress(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        c, f = self.codec, self.config
        return (tq.encode_keys(key, c.rotation, c.qjl_projection, c.key_centroids, f.key_mse_bits,
                               f.use_qjl),
                tq.encode_values(value, c.rotation, c.value_centroids, f.value_bits))

    def attend(self, query, comp_key, comp_value, sink_key, sink_value, recent_key, recent_value,
               scale):
        c, f = self.codec, self.config
        return tq.attention(query, comp_key, comp_value, sink_key, sink_value, recent_key,
                            recent_value, c.rotation, c.qjl_projection, c.key_centroids,
                            c.value_centroids, f.key_mse_bits, f.use_qjl, f.value_bits, scale, True)


CompressorFactory = Callable[[torch.device], Compressor]


# -- per-layer formats ------------------------------------------------------------------------

EXACT_BITS = 16.0  # an exact layer holds fp16/bf16 keys and values


@dataclass(frozen=True)
class LayerPlan:
    """The format of every layer of a cache: ``configs[i]`` is layer i's TQConfig, and the layers in
    ``exact`` are kept uncompressed (their config then only supplies head_dim).

    Every config shares head_dim, sink_tokens and flush_interval: the chunk schedule that makes a
    chunked prefill equal token-by-token decoding (and the vLLM page layout) is one per model; only
    the bits (and the rotation seed) may differ between layers.
    """

    configs: tuple[TQConfig, ...]
    exact: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "configs", tuple(self.configs))
        object.__setattr__(self, "exact", frozenset(int(i) for i in self.exact))
        if not self.configs:
            raise ValueError("a LayerPlan needs at least one layer")
        first = self.configs[0]
        for i, c in enumerate(self.configs):
            if not isinstance(c, TQConfig):
                raise TypeError(f"layer {i}: expected a TQConfig, got {type(c).__name__}")
            for name in ("head_dim", "sink_tokens", "flush_interval"):
                if getattr(c, name) != getattr(first, name):
                    raise ValueError(f"layer {i} has {name}={getattr(c, name)} but layer 0 has "
                                     f"{getattr(first, name)}: only the bits may differ per layer")
        bad = sorted(i for i in self.exact if not 0 <= i < len(self.configs))
        if bad:
            raise ValueError(f"exact layers {bad} are outside 0..{len(self.configs) - 1}")

    @classmethod
    def uniform(cls, config: TQConfig, num_layers: int, exact=()) -> "LayerPlan":
        """Every layer in `config`, the layers in `exact` uncompressed."""
        return cls((config,) * num_layers, frozenset(exact))

    @classmethod
    def greedy(cls, low: TQConfig, high: TQConfig, num_layers: int, order, budget: float,
               exact=()) -> "LayerPlan":
        """Every compressed layer in `low`, then the layers of `order` (most deserving first) moved
        to `high` one by one, each only if the plan stays within `budget` bits per channel.  With a
        uniform upgrade cost this takes the longest prefix of `order` that fits.

        Raises ValueError when even the all-`low` plan exceeds the budget, or `high` is not larger."""
        plan = cls.uniform(low, num_layers, exact)
        if high.slot_bytes <= low.slot_bytes:
            raise ValueError(f"the high format ({high.effective_bits:g} bits/ch) must take more "
                             f"bytes than the low one ({low.effective_bits:g})")
        if plan.bits_per_channel() > budget + _BITS_EPS:
            raise ValueError(f"a budget of {budget:g} bits/ch is below the low format's plan "
                             f"({plan.bits_per_channel():.4g} bits/ch, exact layers at 16)")
        configs = list(plan.configs)
        for i in order:
            i = int(i)
            if i in plan.exact or configs[i] == high:
                continue
            trial = cls(tuple(configs[:i] + [high] + configs[i + 1:]), plan.exact)
            if trial.bits_per_channel() <= budget + _BITS_EPS:
                configs[i] = high
        return cls(tuple(configs), plan.exact)

    def __len__(self) -> int:
        return len(self.configs)

    @property
    def head_dim(self) -> int:
        return self.configs[0].head_dim

    def layers_with(self, config: TQConfig) -> list[int]:
        """Indices of the compressed layers whose format is `config`."""
        return [i for i, c in enumerate(self.configs) if c == config and i not in self.exact]

    def layer_bits(self, slot_bytes: float | None = None) -> list[float]:
        """Effective bits per channel of each layer: 16 for an exact layer, else the stored bytes
        per (token, KV head), K and V together (norms and gamma included) * 8 / (2 * head_dim).
        `slot_bytes` replaces the configs' own size for another format (the eval's baselines)."""
        d = self.head_dim
        return [EXACT_BITS if i in self.exact
                else (c.slot_bytes if slot_bytes is None else slot_bytes) * 8 / (2 * d)
                for i, c in enumerate(self.configs)]

    def bits_per_channel(self, slot_bytes: float | None = None) -> float:
        """Effective bits per channel of the whole cache: the mean over layers of `layer_bits`
        (every layer holds the same number of tokens and heads).  The exact sinks and recent buffer
        are a fixed number of tokens per sequence and are not in this figure."""
        bits = self.layer_bits(slot_bytes)
        return sum(bits) / len(bits)


_BITS_EPS = 1e-9  # float slack when comparing a plan's bits with a decimal budget


# -- one layer ---------------------------------------------------------------------------------

@dataclass(eq=False)
class CompressedKV:
    """What `TurboQuantLayer.update` returns in place of key/value tensors: a handle to the layer,
    read by `turboquant_attention_forward`."""

    layer: "TurboQuantLayer"


def _cat(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else torch.cat([a, b], dim=1)


class TurboQuantLayer(CacheLayerMixin):
    """The cache of one attention layer: sinks, compressed middle, recent buffer (see module doc).

    State tensors are batch-first: sink_key/sink_value/recent_key/recent_value (B, n, Hkv, D) in the
    model's dtype; comp_key/comp_value (B, Tc, Hkv, *) as the compressor stores them (uint8 records
    for TurboQuant).  None until the first update.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = True

    def __init__(self, config: TQConfig, compressor_factory: CompressorFactory | None,
                 exact: bool = False):
        super().__init__()
        self.config = config
        self.exact = exact
        self._factory = compressor_factory
        self.compressor: Compressor | None = None
        self.reset()

    def __repr__(self) -> str:
        kind = "exact" if self.exact else self.config.describe()
        return f"TurboQuantLayer({kind}, tokens={self.cumulative_length})"

    # -- transformers' CacheLayerMixin surface ---------------------------------------------------
    def reset(self) -> None:
        self.sink_key = self.sink_value = None
        self.comp_key = self.comp_value = None
        self.recent_key = self.recent_value = None
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """key_states (B, Hkv, 0.., D): fixes batch, heads, dtype and device."""
        b, hkv, _, d = key_states.shape
        if d != self.config.head_dim:
            raise ValueError(f"the model's head_dim is {d} but the TurboQuant config has head_dim="
                             f"{self.config.head_dim}: build it with TurboQuantCache.for_model")
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states.new_empty(b, 0, hkv, d)
        self.sink_key, self.sink_value = empty, empty.clone()
        self.recent_key, self.recent_value = empty.clone(), empty.clone()
        if self.compressor is None:
            self.compressor = (self._factory(self.device) if self._factory is not None
                               else TQCompressor(self.config, self.device))
        # Zero-length compressed part; an exact layer keeps it empty and attends through the same
        # op, which with no compressed tokens is exact attention.
        self.comp_key, self.comp_value = self.compressor.compress(empty, empty)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        """key_states, value_states (B, Hkv, T, D), post-RoPE.  Returns (handle, handle)."""
        if not self.is_initialized or self.sink_key is None:
            self.lazy_initialization(key_states, value_states)
        k = key_states.transpose(1, 2)
        v = value_states.transpose(1, 2)
        self.cumulative_length += k.shape[1]
        if self.exact:
            self.recent_key = _cat(self.recent_key, k)
            self.recent_value = _cat(self.recent_value, v)
            return CompressedKV(self), CompressedKV(self)
        self._flush()
        take = min(max(self.config.sink_tokens - self.sink_key.shape[1], 0), k.shape[1])
        if take:
            self.sink_key = _cat(self.sink_key, k[:, :take])
            self.sink_value = _cat(self.sink_value, v[:, :take])
            k, v = k[:, take:], v[:, take:]
        if self.config.flush_interval == 0:
            self._append_compressed(k, v)
        else:
            self.recent_key = _cat(self.recent_key, k)
            self.recent_value = _cat(self.recent_value, v)
        return CompressedKV(self), CompressedKV(self)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _tensors(self) -> list[str]:
        return ["sink_key", "sink_value", "comp_key", "comp_value", "recent_key", "recent_value"]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        for name in self._tensors():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in self._tensors():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("TurboQuantCache cannot drop tokens once they are compressed")

    def offload(self) -> None:
        raise NotImplementedError("TurboQuantCache does not offload")

    prefetch = offload

    # -- state changes ---------------------------------------------------------------------------
    def _append_compressed(self, k: Tensor, v: Tensor) -> None:
        if k.shape[1] == 0:
            return
        ck, cv = self.compressor.compress(k, v)
        self.comp_key = _cat(self.comp_key, ck)
        self.comp_value = _cat(self.comp_value, cv)

    def _flush(self) -> None:
        """Compress the oldest whole flush_interval blocks of the recent buffer."""
        f = self.config.flush_interval
        if f <= 0 or self.recent_key.shape[1] < f:
            return
        n = self.recent_key.shape[1] // f * f
        self._append_compressed(self.recent_key[:, :n], self.recent_value[:, :n])
        self.recent_key = self.recent_key[:, n:]
        self.recent_value = self.recent_value[:, n:]

    # -- attention -------------------------------------------------------------------------------
    def attend(self, query: Tensor, scale: float) -> Tensor:
        """query (B, Tq, Hq, D) -> (B, Tq, Hq, D): each row over its sinks, compressed and recent
        tokens, causal (the queries are the newest Tq tokens)."""
        outs = []
        for b in range(query.shape[0]):
            outs.append(self.compressor.attend(
                query[b], self.comp_key[b], self.comp_value[b], self.sink_key[b],
                self.sink_value[b], self.recent_key[b], self.recent_value[b], scale))
        return torch.stack(outs)

    # -- accounting ------------------------------------------------------------------------------
    def token_counts(self) -> dict[str, int]:
        """Tokens per part (per batch row)."""
        if self.sink_key is None:
            return dict(sink=0, compressed=0, recent=0)
        comp = 0 if self.comp_key is None else self.comp_key.shape[1]
        return dict(sink=self.sink_key.shape[1], compressed=comp, recent=self.recent_key.shape[1])

    def memory_bytes(self, raw_bytes_per_element: int = 2) -> int:
        """Bytes this layer would hold with raw tokens stored at `raw_bytes_per_element` (fp16/bf16)
        and compressed tokens at the format's slot size, over the whole batch."""
        if self.sink_key is None:
            return 0
        b, _, hkv, d = self.sink_key.shape
        n = self.token_counts()
        raw = (n["sink"] + n["recent"]) * 2 * d * raw_bytes_per_element
        comp = 0 if self.exact else n["compressed"] * self.compressor.slot_bytes
        return b * hkv * (raw + comp)


# -- the cache ---------------------------------------------------------------------------------

class TurboQuantCache(Cache):
    """A transformers `Cache` of `TurboQuantLayer`s.  Use it with ``attn_implementation=register()``.

    Args:
        config: the format, sinks and flush interval (a TQConfig, or a preset name, then head_dim
            must come through ``overrides`` or use `for_model`), or a `LayerPlan` (one TQConfig per
            layer and the exact layers; then no exact_layers or overrides).
        exact_layers: indices of layers kept uncompressed (boundary protection).
        compressor: optional factory ``device -> Compressor`` for another format (baselines); the
            config then only supplies head_dim, sinks and the flush interval.

    Without a plan, every layer index gets ``config`` (layers are made as transformers asks for
    them); with a plan, layer i gets ``plan.configs[i]`` and a layer beyond the plan is an error.
    """

    def __init__(self, config: TQConfig | str | LayerPlan = "seed", exact_layers=(),
                 compressor=None, **overrides):
        super().__init__(layers=[])
        self.plan: LayerPlan | None = None
        if isinstance(config, LayerPlan):
            if overrides or exact_layers:
                raise ValueError("a LayerPlan carries every layer's config and the exact layers: "
                                 "pass no overrides or exact_layers with it")
            if compressor is not None and len(set(config.configs)) > 1:
                raise ValueError("a compressor factory makes one format for every layer; a "
                                 "LayerPlan with several formats needs the TurboQuant compressor")
            self.plan = config
            exact_layers = config.exact
            config = config.configs[0]
        elif isinstance(config, str):
            config = preset(config, **overrides)
        elif overrides:
            config = config.replace(**overrides)
        self.config = config
        self.exact_layers = frozenset(int(i) for i in exact_layers)
        self._compressor = compressor

    @classmethod
    def for_model(cls, model, config: TQConfig | str | LayerPlan = "seed",
                  boundary_layers: int = 0, compressor=None, **overrides) -> "TurboQuantCache":
        """A cache sized for `model` (or its config): head_dim from the model; the first and last
        `boundary_layers` layers kept exact.  A `LayerPlan` must already match the model (one
        config per layer, its head_dim) and carries its own exact layers."""
        mc = getattr(model, "config", model)
        mc = mc.get_text_config() if hasattr(mc, "get_text_config") else mc
        d = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        n = mc.num_hidden_layers
        if isinstance(config, LayerPlan):
            if boundary_layers:
                raise ValueError("a LayerPlan carries its exact layers: pass boundary_layers=0")
            if len(config) != n or config.head_dim != d:
                raise ValueError(f"the LayerPlan has {len(config)} layers of head_dim "
                                 f"{config.head_dim}, the model {n} of head_dim {d}")
            plan = config
        else:
            exact = boundary_layer_indices(boundary_layers, n)
            if isinstance(config, str):
                config = preset(config, head_dim=d, **overrides)
            else:
                config = config.replace(head_dim=d, **overrides)
            plan = LayerPlan.uniform(config, n, exact)
        cache = cls(plan, compressor=compressor)
        for i in range(n):
            cache.layers.append(cache._make_layer(i))
        return cache

    def _make_layer(self, idx: int) -> TurboQuantLayer:
        if self.plan is None:
            return TurboQuantLayer(self.config, self._compressor, exact=idx in self.exact_layers)
        if idx >= len(self.plan):
            raise IndexError(f"layer {idx} is beyond the cache's LayerPlan of {len(self.plan)} "
                             f"layers")
        return TurboQuantLayer(self.plan.configs[idx], self._compressor,
                               exact=idx in self.plan.exact)

    def bits_per_channel(self, slot_bytes: float | None = None) -> float:
        """Effective bits per channel of the cache's plan (`LayerPlan.bits_per_channel`)."""
        if self.plan is None:
            raise ValueError("the layer count is unknown without a plan: build with for_model")
        return self.plan.bits_per_channel(slot_bytes)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(self._make_layer(len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def memory_bytes(self, raw_bytes_per_element: int = 2) -> int:
        return sum(layer.memory_bytes(raw_bytes_per_element) for layer in self.layers)


# -- attention function ------------------------------------------------------------------------

def turboquant_attention_forward(module, query: Tensor, key, value, attention_mask,
                                 scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers attention function.  query (B, Hq, Tq, D).  With a TurboQuantCache, key/value
    are `CompressedKV` handles and the output comes from the layer's state through the op; otherwise
    this is SDPA.  Returns ((B, Tq, Hq, D), None)."""
    if not isinstance(key, CompressedKV):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"TurboQuantCache does not support attention with {name}")
    if kwargs.get("is_causal") is False:
        raise NotImplementedError("TurboQuantCache supports causal attention only")
    if dropout and getattr(module, "training", False):
        raise NotImplementedError("TurboQuantCache is for inference: attention dropout is not supported")
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if attention_mask is not None and not torch.compiler.is_compiling():
        _check_causal_mask(attention_mask, query.shape[2])
    out = key.layer.attend(query.transpose(1, 2), scale)
    return out, None


def _check_causal_mask(mask: Tensor, tq_len: int) -> None:
    """Refuse padding: the op applies its own causal mask, so a mask must be purely causal."""
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask == 0
    kv = allowed.shape[-1]
    q_pos = torch.arange(tq_len, device=mask.device) + (kv - tq_len)
    causal = torch.arange(kv, device=mask.device)[None, :] <= q_pos[:, None]
    if not bool((allowed[..., -tq_len:, :] == causal).all()):
        raise NotImplementedError("TurboQuantCache does not support padded batches (the attention "
                                  "mask is not purely causal)")


def register() -> str:
    """Register the "turboquant" attention function and mask with transformers; returns the name to
    pass as ``attn_implementation``.  Registering twice is harmless."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, turboquant_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
