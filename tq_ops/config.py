"""TQConfig: the one source of truth for a TurboQuant KV-cache format.

A config fixes everything that changes bytes or numbers: head_dim, key MSE bits, key QJL bits,
value bits, the rotation seed, how many leading tokens (sinks) and how many newest tokens (the
seed's flush buffer) stay exact.  Every byte size is derived from it (see `tq_ops.layout`).
Named presets live in `PRESETS`; the seed's TQ_* environment variables are read in `tq_ops._env`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tq_ops import capabilities
from tq_ops.layout import SlotLayout


class TQConfigError(ValueError):
    """A TQConfig field (or the environment variable that set it) is out of range."""


@dataclass(frozen=True)
class TQConfig:
    """A TurboQuant KV-cache format.

    Attributes:
        head_dim: D, the size of one key/value head vector.
        key_mse_bits: Lloyd-Max bits per key coordinate (the seed's TQ_B_MSE).
        key_qjl_bits: 1 adds the 1-bit QJL sketch of the key residual (TurboQuant_prod, the
            seed's TQ_B_QJL); 0 gives MSE-only keys.
        value_bits: Lloyd-Max bits per value coordinate (values never use QJL: they enter the
            output linearly, where only the MSE matters).
        rotation_seed: seed of the CPU generator that draws the rotation and the QJL matrix.
        sink_tokens: the first tokens of every sequence, kept exact (attention sinks).
        flush_interval: size of the raw buffer of newest tokens, compressed in one batch when
            it fills (the seed's TQ_FLUSH_INTERVAL). 0 compresses every token at once.
    """

    head_dim: int = 128
    key_mse_bits: int = 2
    key_qjl_bits: int = 1
    value_bits: int = 3
    rotation_seed: int = 0
    sink_tokens: int = 0
    flush_interval: int = 128

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise TQConfigError("invalid TQConfig: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every reason this config is unusable (empty when it is fine)."""
        out = []
        for name in ("head_dim", "key_mse_bits", "key_qjl_bits", "value_bits", "rotation_seed",
                     "sink_tokens", "flush_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                out.append(f"{name} must be an int, got {value!r}")
        if out:
            return out
        out += capabilities.head_dim_problems(self.head_dim)
        lo, hi = capabilities.MSE_BITS_RANGE
        if not lo <= self.key_mse_bits <= hi:
            out.append(f"key_mse_bits={self.key_mse_bits} is outside {lo}..{hi}")
        if self.key_qjl_bits not in capabilities.QJL_BITS:
            out.append(f"key_qjl_bits={self.key_qjl_bits} must be one of {capabilities.QJL_BITS}")
        if not lo <= self.value_bits <= hi:
            out.append(f"value_bits={self.value_bits} is outside {lo}..{hi}")
        if self.rotation_seed < 0:
            out.append(f"rotation_seed={self.rotation_seed} must be >= 0")
        if self.sink_tokens < 0:
            out.append(f"sink_tokens={self.sink_tokens} must be >= 0")
        if self.flush_interval < 0:
            out.append(f"flush_interval={self.flush_interval} must be >= 0")
        return out

    def replace(self, **changes) -> "TQConfig":
        return dataclasses.replace(self, **changes)

    @property
    def use_qjl(self) -> bool:
        return self.key_qjl_bits == 1

    @property
    def layout(self) -> SlotLayout:
        """Byte layout of one (token, KV head) slot: key record then value record."""
        return SlotLayout(self.head_dim, self.key_mse_bits, self.use_qjl, self.value_bits)

    @property
    def slot_bytes(self) -> int:
        return self.layout.slot_bytes

    @property
    def key_bits_per_channel(self) -> float:
        """Stored key bits per coordinate, norms and gamma included."""
        return self.layout.key_bytes * 8 / self.head_dim

    @property
    def value_bits_per_channel(self) -> float:
        return self.layout.value_bytes * 8 / self.head_dim

    @property
    def effective_bits(self) -> float:
        """Bits per channel averaged over K and V, counting every stored byte."""
        return self.slot_bytes * 8 / (2 * self.head_dim)

    def compression_ratio(self, baseline_bytes_per_element: int = 2) -> float:
        """How many times fewer bytes than an fp16/bf16 K+V slot."""
        return 2 * self.head_dim * baseline_bytes_per_element / self.slot_bytes

    def describe(self) -> str:
        key = f"K {self.key_mse_bits}b MSE" + (" + 1b QJL" if self.use_qjl else "")
        return (f"{key}, V {self.value_bits}b, D={self.head_dim}: {self.slot_bytes} B/token/head, "
                f"{self.effective_bits:.3f} bits/channel, {self.compression_ratio():.2f}x vs fp16")


# Named presets.  Bits are per coordinate before the norm overhead; `effective_bits` adds it.
#  - seed:        the seed's default, 2-bit MSE + 1-bit QJL keys (TurboQuant_prod b=3), 3-bit values.
#  - k3v3 / k4v4: MSE-only keys (TurboQuant_mse), the setting community A/Bs favour.
#  - k4v3:        ~3.5 bits per channel in the spirit of the paper's 3.5-bit setting; the preset the
#                 evaluation recommends (README, Quality: SmolLM2-135M, beats vLLM's k3v4_nc).
#  - k3v2:        ~2.5 bits per channel, the paper's 2.5-bit budget.
#  - k3q1v3:      3-bit MSE + 1-bit QJL keys (TurboQuant_prod b=4), for the QJL A/B.
PRESET_FIELDS: dict[str, dict[str, int]] = {
    "seed": dict(key_mse_bits=2, key_qjl_bits=1, value_bits=3),
    "k2q1v2": dict(key_mse_bits=2, key_qjl_bits=1, value_bits=2),
    "k3v3": dict(key_mse_bits=3, key_qjl_bits=0, value_bits=3),
    "k4v4": dict(key_mse_bits=4, key_qjl_bits=0, value_bits=4),
    "k4v3": dict(key_mse_bits=4, key_qjl_bits=0, value_bits=3),
    "k3v2": dict(key_mse_bits=3, key_qjl_bits=0, value_bits=2),
    "k3q1v3": dict(key_mse_bits=3, key_qjl_bits=1, value_bits=3),
}
DEFAULT_PRESET = "seed"


def boundary_layer_indices(boundary: int, num_layers: int) -> set[int]:
    """Indices of the first and last `boundary` of `num_layers` layers ("boundary protection":
    kept exact); all of them when 2 * boundary >= num_layers."""
    n = min(max(boundary, 0), num_layers)
    return set(range(n)) | set(range(num_layers - n, num_layers))


def preset(name: str, **overrides) -> TQConfig:
    """The named preset as a TQConfig, with any field overridden (e.g. head_dim=64)."""
    if name not in PRESET_FIELDS:
        raise TQConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESET_FIELDS)}")
    return TQConfig(**{**PRESET_FIELDS[name], **overrides})
