"""The only place tq_ops reads environment variables: the seed's TQ_* names and defaults.

    TQ_B_MSE (2)  TQ_B_QJL (1)  TQ_FLUSH_INTERVAL (128)  TQ_NUM_LAYERS (32)  TQ_NUM_HEADS (32)
    TQ_NUM_KV_HEADS (32)  TQ_HEAD_DIM (128)  TQ_MAX_SEQ_LEN (4096)  TQ_DEVICE (cuda)
and our additions: TQ_PRESET (unset; a preset name whose bits replace TQ_B_MSE/TQ_B_QJL defaults),
TQ_VALUE_BITS (3), TQ_SINK_TOKENS (0), TQ_SEED (0), TQ_BOUNDARY_LAYERS (0: the first and last N
layers kept exact, "boundary protection").
The vLLM plugin's opt-in switch TQ_VLLM_ENABLE (0) is read by `vllm_enabled`, and its
TQ_PREFILL_FLASH (1: vLLM's FlashAttention attends the decoded prefix of a chunked prefill; 0:
our Triton kernel does) by `prefill_flash_enabled` (neither is a format field, so `read_env`
leaves them out).

A bad value raises TQConfigError naming the variable, the value and the allowed range.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from tq_ops import capabilities
from tq_ops.config import PRESET_FIELDS, TQConfigError


@dataclass(frozen=True)
class EnvVar:
    name: str
    field: str
    default: object
    allowed: str  # human-readable range, used in errors
    lo: int | None = None
    hi: int | None = None


_MSE_LO, _MSE_HI = capabilities.MSE_BITS_RANGE
_BIG = 1 << 31
ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("TQ_B_MSE", "b_mse", 2, f"an integer in {_MSE_LO}..{_MSE_HI}", _MSE_LO, _MSE_HI),
    EnvVar("TQ_B_QJL", "b_qjl", 1, "0 or 1", 0, 1),
    EnvVar("TQ_FLUSH_INTERVAL", "flush_interval", 128, "an integer >= 0", 0, _BIG),
    EnvVar("TQ_NUM_LAYERS", "num_layers", 32, "an integer >= 1", 1, _BIG),
    EnvVar("TQ_NUM_HEADS", "num_heads", 32, "an integer >= 1", 1, _BIG),
    EnvVar("TQ_NUM_KV_HEADS", "num_kv_heads", 32, "an integer >= 1 dividing TQ_NUM_HEADS", 1, _BIG),
    EnvVar("TQ_HEAD_DIM", "head_dim", 128,
           f"a multiple of 16 with a stored codebook, e.g. {capabilities.TESTED_HEAD_DIMS}", 1, _BIG),
    EnvVar("TQ_MAX_SEQ_LEN", "max_seq_len", 4096, "an integer >= 1", 1, _BIG),
    EnvVar("TQ_DEVICE", "device", "cuda", '"cuda", "cuda:N" or "cpu"'),
    EnvVar("TQ_VALUE_BITS", "value_bits", 3, f"an integer in {_MSE_LO}..{_MSE_HI}", _MSE_LO, _MSE_HI),
    EnvVar("TQ_SINK_TOKENS", "sink_tokens", 0, "an integer >= 0", 0, _BIG),
    EnvVar("TQ_SEED", "rotation_seed", 0, "an integer >= 0", 0, _BIG),
    EnvVar("TQ_BOUNDARY_LAYERS", "boundary_layers", 0, "an integer >= 0", 0, _BIG),
    EnvVar("TQ_PRESET", "preset", None, f"one of {sorted(PRESET_FIELDS)}"),
)


def _bad(var: EnvVar, raw: str) -> TQConfigError:
    return TQConfigError(f"{var.name}={raw!r} is invalid: expected {var.allowed}")


def _parse(var: EnvVar, raw: str):
    text = raw.strip()
    if var.field == "device":
        if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
            return text
        raise _bad(var, raw)
    if var.field == "preset":
        if text not in PRESET_FIELDS:
            raise _bad(var, raw)
        return text
    try:
        value = int(text, 10)
    except ValueError:
        raise _bad(var, raw) from None
    if not var.lo <= value <= var.hi:
        raise _bad(var, raw)
    if var.field == "head_dim" and capabilities.head_dim_problems(value):
        raise TQConfigError(f"{var.name}={raw!r} is invalid: "
                            f"{capabilities.head_dim_problems(value)[0]}")
    return value


def read_env(environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """Field values from TQ_* variables: every field, defaults for the unset ones.

    With TQ_PRESET set, the preset's bits replace the TQ_B_MSE / TQ_B_QJL / TQ_VALUE_BITS
    defaults; variables that are set explicitly still win.
    """
    env = os.environ if environ is None else environ
    values = {v.field: v.default for v in ENV_VARS}
    explicit = {}
    for var in ENV_VARS:
        if var.name in env:
            explicit[var.field] = _parse(var, env[var.name])
    if explicit.get("preset"):
        bits = PRESET_FIELDS[explicit["preset"]]
        values.update(b_mse=bits["key_mse_bits"], b_qjl=bits["key_qjl_bits"],
                      value_bits=bits["value_bits"])
    values.update(explicit)
    if values["num_heads"] % values["num_kv_heads"]:
        raise TQConfigError(
            f"TQ_NUM_HEADS={values['num_heads']} is not divisible by "
            f"TQ_NUM_KV_HEADS={values['num_kv_heads']}: expected TQ_NUM_KV_HEADS to divide it")
    return values


VLLM_ENABLE = EnvVar("TQ_VLLM_ENABLE", "vllm_enable", 0, "0 or 1", 0, 1)


def vllm_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """TQ_VLLM_ENABLE=1: the vLLM plugin may replace the backend vLLM would pick by itself (on CPU,
    where vLLM ignores --attention-backend).  Unset or 0: it acts only when selected by name."""
    env = os.environ if environ is None else environ
    raw = env.get(VLLM_ENABLE.name)
    return raw is not None and bool(_parse(VLLM_ENABLE, raw))


PREFILL_FLASH = EnvVar("TQ_PREFILL_FLASH", "prefill_flash", 1, "0 or 1", 0, 1)


def prefill_flash_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """TQ_PREFILL_FLASH (default 1): whether tq_vllm hands the decoded prefix of a chunked
    prefill to vLLM's FlashAttention when it has one (CUDA), rather than to the Triton prefill
    kernel.  0 is for comparisons and for a FlashAttention build that misbehaves."""
    env = os.environ if environ is None else environ
    raw = env.get(PREFILL_FLASH.name)
    return raw is None or bool(_parse(PREFILL_FLASH, raw))
