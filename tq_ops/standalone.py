"""The seed's standalone API, usable without vLLM: TurboQuantConfig and TurboQuantAttentionImpl.

State is kept per sequence (the seed kept one state per layer and mixed requests together).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from tq_ops import _checks, _env
from tq_ops import ops as tq
from tq_ops.codec import TQCodec
from tq_ops.config import TQConfig, TQConfigError, boundary_layer_indices


@dataclass(frozen=True)
class TurboQuantConfig:
    """The seed's configuration (same field names and defaults), plus value bits, sinks, seed and
    boundary layers (the first and last `boundary_layers` of `num_layers` kept exact).

    `TurboQuantConfig.from_env()` reads the TQ_* variables (tq_ops._env).
    """

    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    max_seq_len: int = 4096
    flush_interval: int = 128
    b_mse: int = 2
    b_qjl: int = 1
    device: str = "cuda"
    value_bits: int = 3
    sink_tokens: int = 0
    rotation_seed: int = 0
    boundary_layers: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "max_seq_len", "boundary_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TQConfigError(f"{name} must be an int, got {value!r}")
            if value < (0 if name == "boundary_layers" else 1):
                raise TQConfigError(f"{name}={value} must be >= "
                                    f"{0 if name == 'boundary_layers' else 1}")
        dev = self.device
        if not isinstance(dev, str) or not (dev in ("cpu", "cuda") or (
                dev.startswith("cuda:") and dev[5:].isdigit())):
            raise TQConfigError(f'device={dev!r} must be "cpu", "cuda" or "cuda:N"')
        if self.num_heads % self.num_kv_heads:
            raise TQConfigError(f"num_heads={self.num_heads} is not divisible by "
                                f"num_kv_heads={self.num_kv_heads}")
        self.tq_config  # validates the format fields

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "TurboQuantConfig":
        values = _env.read_env(environ)
        values.pop("preset", None)
        values.update(overrides)
        return cls(**values)

    def is_exact_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` (0-based, of num_layers) is a boundary layer kept exact."""
        n = self.boundary_layers
        if n == 0:
            return False
        if not 0 <= layer_idx < self.num_layers:
            raise TQConfigError(f"layer_idx={layer_idx} is outside 0..{self.num_layers - 1} "
                                f"(num_layers={self.num_layers}), so whether it is one of the "
                                f"{n} first/last boundary layers is unknown")
        return layer_idx in boundary_layer_indices(n, self.num_layers)

    @property
    def tq_config(self) -> TQConfig:
        return TQConfig(head_dim=self.head_dim, key_mse_bits=self.b_mse, key_qjl_bits=self.b_qjl,
                        value_bits=self.value_bits, rotation_seed=self.rotation_seed,
                        sink_tokens=self.sink_tokens, flush_interval=self.flush_interval)

    def resolved_device(self) -> torch.device:
        """TQ_DEVICE, falling back to the CPU with a warning when CUDA is asked for but absent."""
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            warnings.warn(f"TQ_DEVICE={self.device} but no CUDA GPU is available: using the CPU",
                          RuntimeWarning, stacklevel=2)
            return torch.device("cpu")
        return torch.device(self.device)


@dataclass
class _SequenceState:
    sink_key: Tensor
    sink_value: Tensor
    key_records: Tensor
    value_records: Tensor
    buffer_key: Tensor
    buffer_value: Tensor

    @property
    def num_tokens(self) -> int:
        return self.sink_key.shape[0] + self.key_records.shape[0] + self.buffer_key.shape[0]


class TurboQuantAttentionImpl:
    """Attention with a TurboQuant-compressed KV cache, one state per sequence.

    forward(query, key, value, sequence_id=0):
      * the first `sink_tokens` tokens of a sequence are kept exact;
      * prefill (a call with more than one token) attends causally over the exact chunk and the
        sequence's earlier tokens, then batch-encodes all its tokens (the seed's behaviour);
      * decode (one token) appends the raw token to the sequence's buffer; when the buffer holds
        flush_interval tokens they are compressed in one batch;
      * attention is one softmax over sinks, compressed tokens and buffered tokens; query head h
        reads KV head h // (num_heads / num_kv_heads);
      * a boundary layer (`tq_config.is_exact_layer(layer_idx)`, TQ_BOUNDARY_LAYERS) compresses
        nothing: every token stays in the exact buffer and attention is exact.
    """

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 tq_config: TurboQuantConfig | None = None, layer_idx: int = 0):
        num_kv_heads = num_kv_heads or num_heads
        _checks.gqa(num_heads, num_kv_heads)
        cfg = tq_config or TurboQuantConfig(num_heads=num_heads, num_kv_heads=num_kv_heads,
                                            head_dim=head_size)
        if cfg.head_dim != head_size:
            cfg = dataclasses.replace(cfg, head_dim=head_size)
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads, self.layer_idx, self.config = num_kv_heads, layer_idx, cfg
        self.exact = cfg.is_exact_layer(layer_idx)
        self.format = cfg.tq_config
        self.device = cfg.resolved_device()
        self.codec = TQCodec.build(self.format, self.device)
        self._states: dict[object, _SequenceState] = {}

    # -- state -------------------------------------------------------------------------------
    def _empty(self, dtype: torch.dtype) -> _SequenceState:
        raw = torch.empty(0, self.num_kv_heads, self.head_size, dtype=dtype, device=self.device)
        lay = self.format.layout
        kr = torch.empty(0, self.num_kv_heads, lay.key_bytes, dtype=torch.uint8, device=self.device)
        vr = torch.empty(0, self.num_kv_heads, lay.value_bytes, dtype=torch.uint8, device=self.device)
        return _SequenceState(raw, raw.clone(), kr, vr, raw.clone(), raw.clone())

    def reset(self, sequence_id: object = None) -> None:
        """Forget one sequence (or all when sequence_id is None)."""
        if sequence_id is None:
            self._states.clear()
        else:
            self._states.pop(sequence_id, None)

    def num_tokens(self, sequence_id: object = 0) -> int:
        state = self._states.get(sequence_id)
        return 0 if state is None else state.num_tokens

    def memory_bytes(self, sequence_id: object = 0) -> int:
        """Bytes held for one sequence: compressed records plus exact sinks and buffer."""
        s = self._states.get(sequence_id)
        if s is None:
            return 0
        return sum(t.numel() * t.element_size() for t in dataclasses.astuple(s))

    def _encode(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        c, f = self.codec, self.format
        return (tq.encode_keys(k, c.rotation, c.qjl_projection, c.key_centroids, f.key_mse_bits,
                               f.use_qjl),
                tq.encode_values(v, c.rotation, c.value_centroids, f.value_bits))

    # -- forward -----------------------------------------------------------------------------
    def _heads(self, name: str, t: Tensor, heads: int) -> Tensor:
        """(T, heads*D) or (T, heads, D) -> (T, heads, D); anything else is a TQInputError."""
        _checks.floats(name, t)
        d = self.head_size
        if not ((t.dim() == 2 and t.shape[1] == heads * d)
                or (t.dim() == 3 and tuple(t.shape[1:]) == (heads, d))):
            _checks.fail(f"{name} must be (T, {heads * d}) or (T, {heads}, {d}), got "
                         f"{tuple(t.shape)}")
        return t.reshape(t.shape[0], heads, d)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, sequence_id: object = 0) -> Tensor:
        """query (T, Hq*D) or (T, Hq, D); key, value (T, Hkv*D) or (T, Hkv, D), one dtype
        (fp16/bf16/fp32) for the three and for every call of a sequence.
        Returns the attention output in the shape and dtype of query (T = 0 gives an empty one).
        A bad call raises TQInputError and leaves the sequence's state unchanged."""
        out_shape = query.shape
        q = self._heads("query", query, self.num_heads)
        k = self._heads("key", key, self.num_kv_heads)
        v = self._heads("value", value, self.num_kv_heads)
        if not (q.dtype == k.dtype == v.dtype):
            _checks.fail(f"query, key and value must share one dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
        if not (q.shape[0] == k.shape[0] == v.shape[0]):
            _checks.fail(f"query, key and value must have the same number of tokens, got "
                         f"{q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
        for name, t in (("query", q), ("key", k), ("value", v)):
            if t.device != self.device:
                _checks.fail(f"{name} is on {t.device} but this layer's cache is on {self.device}")
            if not bool(torch.isfinite(t).all()):
                _checks.fail(f"{name} contains NaN or Inf")
        for name, t in (("key", k), ("value", v)):
            if t.shape[0] and float(torch.linalg.vector_norm(t.float(), dim=-1).max()) > 65504:
                _checks.fail(f"a {name} norm exceeds 65504, the fp16 range of the stored norms")
        state = self._states.get(sequence_id) or self._empty(k.dtype)
        if state.sink_key.dtype != k.dtype:
            _checks.fail(f"key dtype {k.dtype} differs from the {state.sink_key.dtype} this "
                         f"sequence started with; call reset({sequence_id!r}) to start over")
        if k.shape[0] == 0:
            return query.new_empty(out_shape)
        # Build the new state in locals and commit it only once everything succeeded.
        n_new = k.shape[0]
        take = min(max(self.format.sink_tokens - state.sink_key.shape[0], 0), n_new)
        sink_k = torch.cat([state.sink_key, k[:take]])
        sink_v = torch.cat([state.sink_value, v[:take]])
        recent_k = torch.cat([state.buffer_key, k[take:]])
        recent_v = torch.cat([state.buffer_value, v[take:]])
        c, f = self.codec, self.format
        out = tq.attention(q, state.key_records, state.value_records, sink_k, sink_v, recent_k,
                           recent_v, c.rotation, c.qjl_projection, c.key_centroids,
                           c.value_centroids, f.key_mse_bits, f.use_qjl, f.value_bits,
                           self.scale, True)
        key_records, value_records = state.key_records, state.value_records
        prefill = n_new > 1
        if not self.exact and (prefill or recent_k.shape[0] >= max(f.flush_interval, 1)):
            kr, vr = self._encode(recent_k, recent_v)
            key_records = torch.cat([key_records, kr])
            value_records = torch.cat([value_records, vr])
            recent_k, recent_v = recent_k[:0], recent_v[:0]
        self._states[sequence_id] = _SequenceState(sink_k, sink_v, key_records, value_records,
                                                   recent_k, recent_v)
        return out.reshape(out_shape)

    __call__ = forward
