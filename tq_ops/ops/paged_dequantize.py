"""turboquant::paged_dequantize: page positions of the packed cache as exact-dtype K/V in the
original domain, the input of paged_prefill_attention's decoded path."""
from __future__ import annotations

import math

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from tq_ops import _checks, layout, reference
from tq_ops.codec import qjl_scale
from tq_ops.ops.write_cache import check_cache
from tq_ops.triton.dequant import BLOCK_N, dequantize_pages_kernel


def launch(cache: Tensor, block_table: Tensor, lens: Tensor, offsets: Tensor, num_tokens: int,
           rotation: Tensor, projection: Tensor, key_centroids: Tensor,
           value_centroids: Tensor, key_bits: int, qjl: bool, value_bits: int, kv_start: int,
           dtype: torch.dtype, raw: bool = False) -> tuple[Tensor, Tensor]:
    """The Triton body (tq_ops.triton.dequant).  raw=True launches the bare kernel (interpreter
    tests on CPU tensors)."""
    d = int(rotation.shape[0])
    hkv = int(cache.shape[1])
    lay = layout.SlotLayout(d, key_bits, qjl, value_bits)
    bs = int(cache.shape[2]) // lay.slot_bytes
    key = torch.zeros((num_tokens, hkv, d), dtype=dtype, device=cache.device)
    value = torch.zeros((num_tokens, hkv, d), dtype=dtype, device=cache.device)
    r, mb = block_table.shape
    if num_tokens == 0 or r == 0:
        return key, value
    # S' Pi in float64: a TF32 matmul setting must not round the QJL term's matrix
    sp = (projection.to(torch.float64) @ rotation.to(torch.float64)).to(torch.float32)
    pih, pil = fp16_halves(rotation)
    sph, spl = fp16_halves(sp)
    dp = max(16, triton.next_power_of_2(d))
    bn = math.gcd(bs, BLOCK_N)
    kernel = dequantize_pages_kernel if raw else wrap_triton(dequantize_pages_kernel)
    kernel[(r, triton.cdiv(mb * bs, bn), hkv)](
        cache, block_table, lens, offsets, pih, pil, sph, spl, key_centroids, value_centroids,
        key, value, kv_start, block_table.stride(0), cache.stride(0), qjl_scale(d),
        HKV=hkv, D=d, DP=dp, BS=bs, BN=bn, KB=key_bits, QJL=qjl,
        VB=value_bits, OFF_KC=lay.slot_offset("k_codes"),
        OFF_KS=lay.slot_offset("k_signs") if qjl else 0, OFF_KN=lay.slot_offset("k_norm"),
        OFF_KG=lay.slot_offset("k_gamma") if qjl else 0, OFF_VC=lay.slot_offset("v_codes"),
        OFF_VN=lay.slot_offset("v_norm"), SLOT=lay.slot_bytes, num_warps=dequant_warps(dp))
    return key, value


def fp16_halves(m: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 m as contiguous fp16 hi + lo (hi + lo carries ~22 bits of m's mantissa)."""
    hi = m.to(torch.float16)
    return hi.contiguous(), (m - hi.to(torch.float32)).to(torch.float16).contiguous()


def dequant_warps(dp: int) -> int:
    """Warps per tile program: the (BN, DP) fp32 accumulator at 64 registers per thread."""
    return 4 if dp <= 128 else 8


@triton_op("turboquant::paged_dequantize", mutates_args=())
def paged_dequantize(cache: Tensor, block_table: Tensor, lens: Tensor, offsets: Tensor,
                     num_tokens: int, rotation: Tensor, projection: Tensor,
                     key_centroids: Tensor, value_centroids: Tensor, key_bits: int, qjl: bool,
                     value_bits: int, kv_start: int,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Decode page positions of the packed cache into keys and values in the original domain:
    key = tq_ops.reference.decode_keys (the QJL correction folded in, so q . key is the
    inner-product estimate the attention ops use), value = decode_values.

    Args:
        cache: (num_blocks, Hkv, block_size * slot_bytes) uint8 (tq_ops.layout).
        block_table: (R, max_blocks) int32, page ids of each request.
        lens: (R,) int32; page positions kv_start .. lens[r]-1 of request r are decoded.
        offsets: (R,) int32; position p of request r goes to row offsets[r] + p - kv_start.
            The caller keeps the requests' row ranges inside [0, num_tokens) and disjoint (not
            checked: device values).
        num_tokens: rows of the outputs.
        rotation, projection: (D, D) fp32.  key_centroids, value_centroids: fp32 codebooks.
        key_bits, qjl, value_bits: the format.
        kv_start: first page position decoded (the sink count when sinks are kept raw).
        dtype: fp16/bf16/fp32, the outputs' dtype.
    Returns:
        key, value: (num_tokens, Hkv, D) in `dtype`; rows no request covers are zero.
    """
    d = _checks.rotation(rotation)
    _checks.projection(projection, d)
    lay = layout.SlotLayout(d, key_bits, qjl, value_bits)
    _checks.codebook("key", key_centroids, key_bits)
    _checks.codebook("value", value_centroids, value_bits)
    hkv = cache.shape[1] if cache.dim() == 3 else 0
    check_cache(cache, lay, hkv)
    _checks.ints("block_table", block_table, rank=2)
    _checks.ints("lens", lens, rank=1)
    _checks.ints("offsets", offsets, rank=1)
    r = block_table.shape[0]
    if lens.shape[0] != r or offsets.shape[0] != r:
        _checks.fail(f"lens and offsets need {r} entries (one per block-table row), got "
                     f"{lens.shape[0]} and {offsets.shape[0]}")
    if num_tokens < 0:
        _checks.fail(f"num_tokens={num_tokens} must be >= 0")
    if kv_start < 0:
        _checks.fail(f"kv_start={kv_start} must be >= 0")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        _checks.fail(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    _checks.same_device(cache=cache, block_table=block_table, lens=lens, offsets=offsets,
                        rotation=rotation, projection=projection, key_centroids=key_centroids,
                        value_centroids=value_centroids)
    if cache.device.type == "cuda":
        return launch(cache, block_table, lens, offsets, num_tokens, rotation, projection,
                      key_centroids, value_centroids, key_bits, qjl, value_bits, kv_start, dtype)
    return reference.paged_dequantize(cache, block_table, lens, offsets, num_tokens, rotation,
                                      projection, key_centroids, value_centroids, key_bits, qjl,
                                      value_bits, kv_start, dtype)
