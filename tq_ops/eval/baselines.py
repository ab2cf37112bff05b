"""Reference-path reimplementations of other KV formats, run through the same cache and harness.

* vLLM's built-in TurboQuant presets (``--kv-cache-dtype turboquant_{4bit_nc,k3v4_nc,3bit_nc}``):
  keys are normalised, rotated with the orthonormal Sylvester Hadamard matrix H/sqrt(D) (the same in
  every layer, no random signs), quantized to the nearest Gaussian Lloyd-Max centroid (N(0, 1/D)),
  stored with an fp16 norm, and decoded with norm correction (the centroid vector is renormalised to
  unit length before the inverse rotation).  Values are quantized per vector, uniformly between their
  min and max (round to nearest), with the scale and the minimum stored as fp16.  Slot bytes follow
  vLLM's ``TurboQuantConfig``: ceil(D*kb/8) + 2 + ceil(D*vb/8) + 4, rounded up to even.
* KIVI (arXiv 2402.02750): keys quantized per channel over groups of 32 tokens, values per token
  over groups of 32 channels, asymmetric min/max with fp16 scale and zero, plus the raw residual,
  which here is the cache's recent buffer (so it needs a flush interval that is a multiple of 32).

These formats are not TurboQuant's: the stored tensors are their dequantized values (what their
kernels compute from the codes, fp16 scalars included), and attention over them is exact, through
``torch.ops.turboquant.attention`` with no compressed tokens.  Their scores equal what a kernel on
their codes computes: every score here is an inner product with the reconstructed key.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tq_ops import codebooks
from tq_ops import ops as tq
from tq_ops.codec import TQCodec, hadamard
from tq_ops.config import TQConfig

VLLM_PRESETS: dict[str, tuple[int, int]] = {
    # name: (key bits, value bits); all with norm correction
    "4bit_nc": (4, 4),
    "k3v4_nc": (3, 4),
    "3bit_nc": (3, 3),
}
KIVI_GROUP = 32


def vllm_slot_bytes(head_dim: int, key_bits: int, value_bits: int) -> int:
    """vLLM's slot_size_aligned: key codes + fp16 norm, value codes + fp16 scale and zero, even."""
    s = math.ceil(head_dim * key_bits / 8) + 2 + math.ceil(head_dim * value_bits / 8) + 4
    return s + s % 2


class _ExactAttention:
    """Exact attention over dequantized tokens through turboquant::attention with zero records."""

    def __init__(self, head_dim: int, device):
        cfg = TQConfig(head_dim=head_dim, key_mse_bits=1, key_qjl_bits=0, value_bits=1)
        self._codec = TQCodec.build(cfg, device)
        self._lay = cfg.layout

    def __call__(self, query, deq_key, deq_value, sink_key, sink_value, recent_key, recent_value,
                 scale):
        hkv, dev = recent_key.shape[1], query.device
        kr = torch.empty(0, hkv, self._lay.key_bytes, dtype=torch.uint8, device=dev)
        vr = torch.empty(0, hkv, self._lay.value_bytes, dtype=torch.uint8, device=dev)
        # Sinks then the dequantized middle: the op's positions stay in sequence order.
        sk = torch.cat([sink_key.to(torch.float32), deq_key])
        sv = torch.cat([sink_value.to(torch.float32), deq_value])
        c = self._codec
        return tq.attention(query, kr, vr, sk, sv, recent_key, recent_value, c.rotation,
                            c.qjl_projection, c.key_centroids, c.value_centroids, 1, False, 1,
                            scale, True)


def uniform_minmax(x: Tensor, bits: int, dim: int) -> Tensor:
    """Asymmetric uniform quantization along `dim` (min/max, round to nearest), fp16 scale and zero,
    as vLLM's value store kernel does; returns the dequantized fp32 tensor."""
    x = x.to(torch.float32)
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    q = torch.floor((x - lo) / scale + 0.5).clamp(0, levels)
    return q * scale.to(torch.float16).to(torch.float32) + lo.to(torch.float16).to(torch.float32)


class VLLMCompressor:
    """vLLM ``turboquant_<name>`` (see the module docstring).  Stored: dequantized fp32 K and V."""

    def __init__(self, name: str, head_dim: int, device):
        if name not in VLLM_PRESETS:
            raise ValueError(f"unknown vLLM preset {name!r}; choose one of {sorted(VLLM_PRESETS)}")
        if head_dim & (head_dim - 1):
            raise ValueError(f"vLLM's Hadamard rotation needs a power-of-two head_dim, got {head_dim}")
        self.name = name
        self.key_bits, self.value_bits = VLLM_PRESETS[name]
        self.head_dim = head_dim
        self.slot_bytes = vllm_slot_bytes(head_dim, self.key_bits, self.value_bits)
        self._h = (hadamard(head_dim) / math.sqrt(head_dim)).to(torch.float32).to(device)
        self._centroids = codebooks.centroids(head_dim, self.key_bits, "gaussian").to(device)
        self._attend = _ExactAttention(head_dim, device)

    def quantize_keys(self, key: Tensor) -> Tensor:
        """(..., D) -> (..., D) fp32 reconstruction: fp16 norm * H^T (c / ||c||)."""
        k = key.to(torch.float32)
        norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True)
        y = (k / norm.clamp_min(1e-30)) @ self._h  # H is symmetric: rotation and inverse
        mids = codebooks.midpoints(self._centroids)
        c = self._centroids[(y.unsqueeze(-1) >= mids).sum(-1)]
        c = c / torch.linalg.vector_norm(c, dim=-1, keepdim=True)
        return (c @ self._h) * norm.to(torch.float16).to(torch.float32)

    def compress(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        return self.quantize_keys(key), uniform_minmax(value, self.value_bits, dim=-1)

    def attend(self, query, comp_key, comp_value, sink_key, sink_value, recent_key, recent_value,
               scale):
        return self._attend(query, comp_key, comp_value, sink_key, sink_value, recent_key,
                            recent_value, scale)


class KIVICompressor:
    """KIVI-style asymmetric quantization: keys per channel (groups of 32 tokens), values per token
    (groups of 32 channels), fp16 scale and zero per group.  Stored: dequantized fp32 K and V."""

    def __init__(self, bits: int, head_dim: int, device):
        if head_dim % KIVI_GROUP:
            raise ValueError(f"KIVI groups of {KIVI_GROUP} channels need head_dim % 32 == 0")
        self.bits, self.head_dim = bits, head_dim
        # per token and head: codes, plus (scale, zero) fp16 per channel per 32 tokens (keys) and
        # per 32 channels (values)
        per_token = (2 * head_dim * bits / 8 + head_dim * 4 / KIVI_GROUP
                     + head_dim // KIVI_GROUP * 4)
        self.slot_bytes = per_token
        self._attend = _ExactAttention(head_dim, device)

    def compress(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        b, t, h, d = key.shape
        if t % KIVI_GROUP:
            raise ValueError(f"KIVI compresses keys in groups of {KIVI_GROUP} tokens; got a block "
                             f"of {t} (use a flush interval that is a multiple of {KIVI_GROUP})")
        k = uniform_minmax(key.reshape(b, t // KIVI_GROUP, KIVI_GROUP, h, d), self.bits, dim=2)
        v = uniform_minmax(value.reshape(b, t, h, d // KIVI_GROUP, KIVI_GROUP), self.bits, dim=-1)
        return k.reshape(b, t, h, d), v.reshape(b, t, h, d)

    def attend(self, query, comp_key, comp_value, sink_key, sink_value, recent_key, recent_value,
               scale):
        return self._attend(query, comp_key, comp_value, sink_key, sink_value, recent_key,
                            recent_value, scale)
