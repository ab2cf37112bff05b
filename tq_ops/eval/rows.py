"""What one row of the evaluation measures: a KV format plus the cache settings around it.

A row spec is ``FORMAT[:sN][:wN][:bN]``:
  FORMAT   ``baseline`` (the model's own dtype, transformers' DynamicCache and SDPA), a TurboQuant
           preset name from ``tq_ops.config.PRESET_FIELDS`` or any ``k<b>[q1]v<b>`` (key MSE bits,
           optional 1-bit QJL, value bits), ``k<b>v<b>nc`` (MSE keys with norm correction, an
           experiment: `tq_ops.eval.experimental`), ``vllm-4bit_nc`` / ``vllm-k3v4_nc`` / ``vllm-3bit_nc``
           (vLLM's built-in formats, `tq_ops.eval.baselines`), ``kivi2`` / ``kivi4``;
  sN       exact attention-sink tokens (default: --sinks);
  wN       flush interval of the exact recent buffer (default: --window; 0 = every token compressed
           when written, vLLM's setting);
  bN       the first and last N layers kept exact (default: --boundary).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from tq_ops.config import PRESET_FIELDS, TQConfig

_TQ_RE = re.compile(r"^k([1-4])(q1)?v([1-4])(nc)?$")
VLLM_PREFIX = "vllm-"
KIVI_RE = re.compile(r"^kivi([24])$")


def tq_fields(fmt: str) -> dict[str, int] | None:
    """TQConfig fields of a TurboQuant format name, or None when it is not one."""
    if fmt in PRESET_FIELDS:
        return dict(PRESET_FIELDS[fmt])
    m = _TQ_RE.match(fmt)
    if m and not (m.group(2) and m.group(4)):
        return dict(key_mse_bits=int(m.group(1)), key_qjl_bits=1 if m.group(2) else 0,
                    value_bits=int(m.group(3)))
    return None


@dataclass(frozen=True)
class Row:
    format: str
    sinks: int = 0
    window: int = 128
    boundary: int = 0

    @property
    def is_baseline(self) -> bool:
        return self.format == "baseline"

    @property
    def family(self) -> str:
        if self.is_baseline:
            return "baseline"
        if self.format.startswith(VLLM_PREFIX):
            return "vllm"
        if KIVI_RE.match(self.format):
            return "kivi"
        return "turboquant"

    @property
    def label(self) -> str:
        if self.is_baseline:
            return "baseline"
        return f"{self.format}:s{self.sinks}:w{self.window}:b{self.boundary}"

    def validate(self) -> None:
        if self.is_baseline:
            return
        fam = self.family
        if fam == "turboquant" and tq_fields(self.format) is None:
            raise ValueError(f"unknown format {self.format!r}: use baseline, a preset "
                             f"({', '.join(PRESET_FIELDS)}), k<b>[q1]v<b>, vllm-<preset> or kivi2/4")
        if fam == "vllm":
            from tq_ops.eval.baselines import VLLM_PRESETS
            if self.format[len(VLLM_PREFIX):] not in VLLM_PRESETS:
                raise ValueError(f"unknown vLLM format {self.format!r}; choose vllm-"
                                 f"{{{','.join(VLLM_PRESETS)}}}")
        if fam == "kivi" and (self.window <= 0 or self.window % 32):
            raise ValueError(f"{self.label}: KIVI needs its raw residual, a window that is a "
                             f"positive multiple of 32")
        if min(self.sinks, self.window, self.boundary) < 0:
            raise ValueError(f"{self.label}: sinks, window and boundary must be >= 0")

    def tq_config(self, head_dim: int) -> TQConfig:
        """The TQConfig carrying head_dim, sinks and window (and the bits, for TurboQuant rows)."""
        fields = tq_fields(self.format) if self.family == "turboquant" else {}
        return TQConfig(head_dim=head_dim, sink_tokens=self.sinks, flush_interval=self.window,
                        **(fields or {}))

    def compressor_factory(self, head_dim: int):
        """None for TurboQuant (the cache's own ops), else a factory device -> Compressor."""
        from tq_ops.eval import baselines
        fam = self.family
        if fam == "vllm":
            name = self.format[len(VLLM_PREFIX):]
            return lambda device: baselines.VLLMCompressor(name, head_dim, device)
        if fam == "kivi":
            bits = int(KIVI_RE.match(self.format).group(1))
            return lambda device: baselines.KIVICompressor(bits, head_dim, device)
        if self.format.endswith("nc"):
            from tq_ops.eval.experimental import KeyNormCorrectedCompressor
            cfg = self.tq_config(head_dim)
            return lambda device: KeyNormCorrectedCompressor(cfg, device)
        return None

    def slot_bytes(self, head_dim: int) -> float:
        """Stored bytes per (token, KV head) of a compressed layer, K and V together."""
        from tq_ops.eval import baselines
        fam = self.family
        if fam == "baseline":
            return 2 * head_dim * 2
        if fam == "vllm":
            kb, vb = baselines.VLLM_PRESETS[self.format[len(VLLM_PREFIX):]]
            return baselines.vllm_slot_bytes(head_dim, kb, vb)
        if fam == "kivi":
            return baselines.KIVICompressor(int(self.format[-1]), head_dim, "cpu").slot_bytes
        return self.tq_config(head_dim).slot_bytes

    def exact_layers(self, num_layers: int) -> set[int]:
        n = min(self.boundary, num_layers)
        return set(range(n)) | set(range(num_layers - n, num_layers))

    def bits_per_channel(self, head_dim: int, num_layers: int) -> float:
        """Effective bits per channel, K and V averaged, every stored byte counted (norms, scales,
        gamma), averaged over layers with exact layers at 16 bits.  Sinks and the recent buffer are
        a fixed number of exact tokens per sequence and are reported separately."""
        if self.is_baseline:
            return 16.0
        comp = self.slot_bytes(head_dim) * 8 / (2 * head_dim)
        n_exact = len(self.exact_layers(num_layers))
        return (n_exact * 16.0 + (num_layers - n_exact) * comp) / num_layers

    def make_cache(self, model_config):
        """A fresh cache for this row: DynamicCache for the baseline, else a TurboQuantCache."""
        from transformers import DynamicCache

        from tq_ops.hf_cache import TurboQuantCache
        if self.is_baseline:
            return DynamicCache(config=model_config)
        d = model_head_dim(model_config)
        return TurboQuantCache.for_model(model_config, self.tq_config(d),
                                         boundary_layers=self.boundary,
                                         compressor=self.compressor_factory(d))

    def chunk_sizes(self, total: int, chunk: int) -> list[int]:
        """How a sequence of `total` tokens is fed: with a recent buffer, a first chunk of sinks +
        window then window-sized chunks, aligned to the flush boundary (so each query sees exactly
        the exact tokens it would see decoding token by token); otherwise `chunk`-sized pieces
        (with every token compressed on write, chunking does not change the result)."""
        step = self.window if (not self.is_baseline and self.window > 0) else chunk
        first = self.sinks + step if (not self.is_baseline and self.window > 0) else step
        sizes, left = [], total
        size = first
        while left > 0:
            sizes.append(min(size, left))
            left -= sizes[-1]
            size = step
        return sizes


def model_head_dim(model_config) -> int:
    mc = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads


def parse_row(spec: str, sinks: int, window: int, boundary: int) -> Row:
    parts = spec.strip().split(":")
    fmt, opts = parts[0], dict(sinks=sinks, window=window, boundary=boundary)
    keys = {"s": "sinks", "w": "window", "b": "boundary"}
    for p in parts[1:]:
        if not p or p[0] not in keys or not p[1:].isdigit():
            raise ValueError(f"bad row option {p!r} in {spec!r}: use sN, wN or bN")
        opts[keys[p[0]]] = int(p[1:])
    if fmt == "baseline":
        row = Row("baseline", 0, 0, 0)
    else:
        row = Row(fmt, **opts)
    row.validate()
    return row
