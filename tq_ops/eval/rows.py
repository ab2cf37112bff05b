"""What one row of the evaluation measures: a KV format plus the cache settings around it.

A row spec is ``FORMAT[:sN][:wN][:bN]``:
  FORMAT   ``baseline`` (the model's own dtype, transformers' DynamicCache and SDPA), a TurboQuant
           preset name from ``tq_ops.config.PRESET_FIELDS`` or any ``k<b>[q1]v<b>`` (key MSE bits,
           optional 1-bit QJL, value bits), ``k<b>v<b>nc`` (MSE keys with norm correction, an
           experiment: `tq_ops.eval.experimental`), ``vllm-4bit_nc`` / ``vllm-k3v4_nc`` / ``vllm-3bit_nc``
           (vLLM's built-in formats, `tq_ops.eval.baselines`), ``kivi2`` / ``kivi4``; or a layer
           mix ``HIGH+LOW@BUDGET[/RULE]`` (below);
  sN       exact attention-sink tokens (default: --sinks);
  wN       flush interval of the exact recent buffer (default: --window; 0 = every token compressed
           when written, vLLM's setting);
  bN       the first and last N layers kept exact (default: --boundary).

A layer mix ``HIGH+LOW@BUDGET[/RULE]`` (e.g. ``k4v3+k3v3@3.5``) puts every compressed layer in the
TurboQuant format LOW, then moves layers to HIGH, in RULE's order, while the effective bits per
channel (averaged over layers, exact layers at 16) stay within BUDGET.  RULE:
  calib    (default) most sensitive layer first: the per-layer attention-output error at LOW minus
           that at HIGH, measured on a calibration text other than the evaluation text
           (`tq_ops.eval.allocation`); the row needs that measurement (`Row.with_order`);
  edges    a fixed rule: the first and last layers first, then inwards (0, L-1, 1, L-2, ...).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from tq_ops.config import PRESET_FIELDS, TQConfig, boundary_layer_indices
from tq_ops.hf_cache import LayerPlan

_TQ_RE = re.compile(r"^k([1-4])(q1)?v([1-4])(nc)?$")
VLLM_PREFIX = "vllm-"
KIVI_RE = re.compile(r"^kivi([24])$")
MIX_RULES = ("calib", "edges")
_MIX_RE = re.compile(r"^(?P<high>[^+@/]+)\+(?P<low>[^+@/]+)@(?P<budget>[^/]*)(?:/(?P<rule>.*))?$")


@dataclass(frozen=True)
class Mix:
    """A parsed layer mix ``HIGH+LOW@BUDGET[/RULE]`` (see the module doc)."""
    high: str
    low: str
    budget: float
    rule: str = "calib"


def parse_mix(fmt: str) -> Mix | None:
    """The `Mix` of a format name, None when it is not a mix (no '+' or '@'); ValueError with the
    reason when it looks like one but is malformed."""
    if "+" not in fmt and "@" not in fmt:
        return None
    m = _MIX_RE.match(fmt)
    if not m:
        raise ValueError(f"bad layer mix {fmt!r}: use HIGH+LOW@BUDGET[/RULE], e.g. "
                         f"k4v3+k3v3@3.5 or k4v3+k3v3@3.5/edges")
    for part in ("high", "low"):
        name = m.group(part)
        if tq_fields(name) is None or name.endswith("nc"):
            raise ValueError(f"layer mix {fmt!r}: {part} format {name!r} is not a TurboQuant "
                             f"format (a preset or k<b>[q1]v<b>)")
    try:
        budget = float(m.group("budget"))
    except ValueError:
        raise ValueError(f"layer mix {fmt!r}: the budget {m.group('budget')!r} is not a number "
                         f"of bits per channel") from None
    if not 0 < budget <= 16:
        raise ValueError(f"layer mix {fmt!r}: the budget must be in (0, 16] bits per channel")
    rule = m.group("rule") if m.group("rule") is not None else "calib"
    if rule not in MIX_RULES:
        raise ValueError(f"layer mix {fmt!r}: unknown rule {rule!r}; choose one of "
                         f"{', '.join(MIX_RULES)}")
    if m.group("high") == m.group("low"):
        raise ValueError(f"layer mix {fmt!r}: HIGH and LOW are the same format")
    return Mix(m.group("high"), m.group("low"), budget, rule)


def edges_order(num_layers: int) -> tuple[int, ...]:
    """0, L-1, 1, L-2, ...: the boundary layers first (the fixed, model-agnostic rule)."""
    out = []
    lo, hi = 0, num_layers - 1
    while lo <= hi:
        out.append(lo)
        if hi != lo:
            out.append(hi)
        lo, hi = lo + 1, hi - 1
    return tuple(out)


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
    # a calibrated mix's upgrade order (layers, most sensitive first), set by `with_order`
    order: tuple[int, ...] | None = None

    @property
    def is_baseline(self) -> bool:
        return self.format == "baseline"

    @property
    def mix(self) -> Mix | None:
        return parse_mix(self.format)

    def with_order(self, order) -> "Row":
        """This calibrated mix with its measured upgrade order."""
        if self.mix is None or self.mix.rule != "calib":
            raise ValueError(f"{self.label}: only a calibrated layer mix takes an upgrade order")
        return dataclasses.replace(self, order=tuple(int(i) for i in order))

    def part(self, fmt: str) -> "Row":
        """The uniform row of one of a mix's formats, with this row's sinks, window, boundary."""
        return Row(fmt, self.sinks, self.window, self.boundary)

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
        if fam == "turboquant" and self.mix is not None:
            pass  # parse_mix has checked both formats, the budget and the rule
        elif fam == "turboquant" and tq_fields(self.format) is None:
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
        """The TQConfig carrying head_dim, sinks and window (and the bits, for TurboQuant rows;
        a mix's LOW format)."""
        mix = self.mix
        fmt = mix.low if mix is not None else self.format
        fields = tq_fields(fmt) if self.family == "turboquant" else {}
        return TQConfig(head_dim=head_dim, sink_tokens=self.sinks, flush_interval=self.window,
                        **(fields or {}))

    def layer_plan(self, head_dim: int, num_layers: int) -> LayerPlan:
        """Every layer's TQConfig and the exact layers.  A mix upgrades layers LOW -> HIGH in its
        rule's order within the budget; the other rows are uniform."""
        exact = self.exact_layers(num_layers)
        mix = self.mix
        if mix is None:
            return LayerPlan.uniform(self.tq_config(head_dim), num_layers, exact)
        if mix.rule == "edges":
            order = edges_order(num_layers)
        else:
            if self.order is None:
                raise ValueError(f"{self.label}: a calibrated mix needs its measured layer order "
                                 f"(tq-eval calibrates it; or Row.with_order)")
            order = self.order
            if sorted(order) != list(range(num_layers)):
                raise ValueError(f"{self.label}: the layer order {order} is not a permutation of "
                                 f"the model's {num_layers} layers")
        high = self.part(mix.high).tq_config(head_dim)
        try:
            return LayerPlan.greedy(self.tq_config(head_dim), high, num_layers, order, mix.budget,
                                    exact)
        except ValueError as e:
            raise ValueError(f"{self.label}: {e}") from None

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
        if self.mix is None and self.format.endswith("nc"):
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
        return boundary_layer_indices(self.boundary, num_layers)

    def bits_per_channel(self, head_dim: int, num_layers: int) -> float:
        """Effective bits per channel, K and V averaged, every stored byte counted (norms, scales,
        gamma), averaged over layers with exact layers at 16 bits (`LayerPlan.bits_per_channel`,
        the one place this is counted).  Sinks and the recent buffer are a fixed number of exact
        tokens per sequence and are reported separately."""
        if self.is_baseline:
            return 16.0
        other = None if self.family == "turboquant" else self.slot_bytes(head_dim)
        return self.layer_plan(head_dim, num_layers).bits_per_channel(other)

    def make_cache(self, model_config):
        """A fresh cache for this row: DynamicCache for the baseline, else a TurboQuantCache."""
        from transformers import DynamicCache

        from tq_ops.hf_cache import TurboQuantCache
        if self.is_baseline:
            return DynamicCache(config=model_config)
        d = model_head_dim(model_config)
        mc = (model_config.get_text_config() if hasattr(model_config, "get_text_config")
              else model_config)
        return TurboQuantCache.for_model(model_config, self.layer_plan(d, mc.num_hidden_layers),
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
