"""Format variants measured by the evaluation but not (yet) produced by the turboquant ops.

``k<b>v<b>nc``: MSE-only TurboQuant keys with norm correction, the trick of vLLM's ``_nc`` presets.
The stored fp16 key norm is ||k|| / ||c||, c the looked-up centroid vector, so the reconstruction
n * Pi^T c has the key's exact norm instead of the Lloyd-Max shrunk one (||c||^2 ~ 1 - D_mse).  The
layout, the decode path and every kernel are unchanged: only the value written into the norm field
differs.  Here the records come from ``turboquant::encode_keys`` and the norm field is rewritten.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tq_ops import layout as L
from tq_ops import reference
from tq_ops.hf_cache import TQCompressor


class KeyNormCorrectedCompressor(TQCompressor):
    """TQCompressor whose key records store ||k|| / ||c[codes]|| (MSE-only keys)."""

    def __init__(self, config, device):
        if config.use_qjl:
            raise ValueError("key norm correction is defined for MSE-only keys")
        super().__init__(config, device)

    def compress(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        kr, vr = super().compress(key, value)
        f, c = self.config, self.codec
        codes, _, norm, _ = reference.parse_key_records(kr, f.head_dim, f.key_mse_bits, False)
        cnorm = torch.linalg.vector_norm(c.key_centroids[codes], dim=-1)
        lay = L.SlotLayout(f.head_dim, f.key_mse_bits, False, f.value_bits)
        off = lay.record_offset("k_norm")
        kr = kr.clone()
        kr[..., off:off + 2] = L.scalar_to_bytes(norm / cnorm.clamp_min(1e-12))
        return kr, vr
