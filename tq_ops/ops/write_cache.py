"""turboquant::write_cache: encode K/V and store them into the paged cache by slot mapping."""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from torch._subclasses.fake_tensor import is_fake

from tq_ops import _checks, codec, layout, reference
from tq_ops.triton.encode import (EXACT16_MIN_ROWS, LATENCY_ROWS, MODE_CACHE, MODE_RECORDS,
                                  EncodeConfig, encode_config, encode_kernel, encode_pair_kernel,
                                  pair_configs)
from tq_ops.triton.launch import arch, sm_count
from tq_ops.triton.unpack import group_width


def triton_encode_supported(head_dim: int) -> bool:
    """The encode kernel keeps the split-precision Pi^T and S'^T resident in shared memory:
    4 x DP^2 x 2 bytes, which fits the 228 KB of an H100 SM for DP <= 128 only.  Wider heads use
    the reference body on CUDA (correct, not fused)."""
    return triton.next_power_of_2(head_dim) <= 128


def launch_encode(x: Tensor, rotation: Tensor, projection: Tensor, centroids: Tensor, bits: int,
                  qjl: bool, out: Tensor, offsets: dict[str, int], block_size: int,
                  page_stride: int, head_stride: int, slot_mapping: Tensor | None = None,
                  norms: Tensor | None = None, raw: bool = False, exact16: bool = False,
                  config: EncodeConfig | None = None) -> None:
    """Launch tq_ops.triton.encode.encode_kernel over the rows of x.

    x: (T, H, D) for a cache write (token t to slot_mapping[t]) or (R, 1, D) for records (row r
    to bytes r*page_stride of `out`).  offsets: OFF_C/OFF_S/OFF_N/OFF_G component offsets (in
    slots; OFF_N < 0 sends fp32 norms to `norms`).  raw=True launches the bare kernel (the
    interpreter tests run it on CPU tensors).  exact16: the matrices are declared
    tq_ops.codec.exact16_matrices (encode_kernel's EXACT16).  config: overrides encode_config's
    choice (perf/ scripts).
    """
    t, h, d = x.shape
    h, d = int(h), int(d)  # tl.constexpr values: concrete ints (a guard under dynamic shapes)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = t * h
    cfg = config or encode_config(arch(x.device), d, bits, rows, x.dtype == torch.float32,
                                  exact16)
    dp = max(16, triton.next_power_of_2(d))
    mode = MODE_RECORDS if slot_mapping is None else MODE_CACHE
    slots = slot_mapping if slot_mapping is not None else out
    norm_out = norms if norms is not None else out
    kernel = encode_kernel if raw else wrap_triton(encode_kernel)
    grid = max(1, min(triton.cdiv(rows, cfg.rows), cfg.programs_per_sm * sm_count(x.device)))
    kernel[(grid,)](
        x, rows, x.stride(0), x.stride(1), out, slots, page_stride, head_stride, norm_out,
        rotation, projection, centroids,
        H=h, D=d, DP=dp, DG=group_width(d), TB=cfg.rows, BITS=bits, QJL=qjl, BS=block_size,
        OFF_C=offsets["OFF_C"], OFF_S=offsets.get("OFF_S", 0), OFF_N=offsets.get("OFF_N", -1),
        OFF_G=offsets.get("OFF_G", 0), MODE=mode, NORM_F32=norms is not None,
        X_F32=x.dtype == torch.float32, EXACT16=exact16, num_warps=cfg.num_warps)


def launch_write_cache(key: Tensor, value: Tensor, cache: Tensor, slot_mapping: Tensor,
                       rotation: Tensor, projection: Tensor, key_centroids: Tensor,
                       value_centroids: Tensor, key_bits: int, qjl: bool, value_bits: int,
                       raw: bool = False, exact16: bool = False) -> None:
    """The Triton body of write_cache.  A write of at most LATENCY_ROWS rows (a decode step's)
    is one two-program launch of encode_pair_kernel.  A bulk write whose keys and values get
    the same config (tq_ops.triton.encode.pair_configs: every small bulk write, of at most one
    64-row tile per SM, and larger ones of some formats) is one joint launch of it (JOINT:
    137.8 -> 132.5 us for a declared seed write of 32768 tokens x 8 heads, H200, session 27;
    ONE_TILE for the small ones); otherwise one encode_kernel launch for keys, one for values
    (the split-precision seed keys take their own config).  exact16:
    write_cache's exact16_matrices declaration, used for keys and values of a write of at least
    EXACT16_MIN_ROWS rows (below, the split key launch is faster).  A decode step's write does
    not use it (11.9 us against 10.5, session 22).  Values take it as well: with session 24's
    antisymmetric quantizer the value launch alone takes 95 us with it against 100 split, the
    whole op the same 211 us either way; with session 25's kernels 55 against 58 us (H200, seed
    format, 32768 tokens x 8 heads)."""
    d = int(key.shape[-1])
    lay = layout.SlotLayout(d, key_bits, qjl, value_bits)
    bs = int(cache.shape[2]) // lay.slot_bytes
    page_stride, head_stride = cache.stride(0), cache.stride(1)
    koffs = dict(OFF_C=lay.slot_offset("k_codes"), OFF_N=lay.slot_offset("k_norm"))
    if qjl:
        koffs.update(OFF_S=lay.slot_offset("k_signs"), OFF_G=lay.slot_offset("k_gamma"))
    t, h = key.shape[0], int(key.shape[1])
    rows = t * h
    sms = sm_count(key.device)
    wv = write_variant(arch(key.device), sms, d, key_bits, value_bits, rows,
                       key.dtype == torch.float32, value.dtype == torch.float32, exact16)
    key_cfg, value_cfg, exact16 = wv.key_config, wv.value_config, wv.exact16
    if wv.pair:
        k = key if key.stride(-1) == 1 else key.contiguous()
        v = value if value.stride(-1) == 1 else value.contiguous()
        kernel = encode_pair_kernel if raw else wrap_triton(encode_pair_kernel)
        joint, one_tile = wv.joint, wv.one_tile
        tiles = triton.cdiv(rows, key_cfg.rows)
        grid = min(2 * tiles, key_cfg.programs_per_sm * sms) if joint else 2
        kernel[(grid,)](
            k, v, rows, k.stride(0), k.stride(1), v.stride(0), v.stride(1), cache, slot_mapping,
            page_stride, head_stride, rotation, projection, key_centroids, value_centroids,
            H=h, D=d, DP=max(16, triton.next_power_of_2(d)), DG=group_width(d),
            TB=key_cfg.rows, K_BITS=key_bits, QJL=qjl, V_BITS=value_bits, BS=bs,
            K_OFF_C=koffs["OFF_C"], K_OFF_S=koffs.get("OFF_S", 0), K_OFF_N=koffs["OFF_N"],
            K_OFF_G=koffs.get("OFF_G", 0), V_OFF_C=lay.slot_offset("v_codes"),
            V_OFF_N=lay.slot_offset("v_norm"), K_F32=k.dtype == torch.float32,
            V_F32=v.dtype == torch.float32, EXACT16=exact16, JOINT=joint,
            ONE_TILE=one_tile, num_warps=key_cfg.num_warps)
        return
    launch_encode(key, rotation, projection, key_centroids, key_bits, qjl, cache, koffs, bs,
                  page_stride, head_stride, slot_mapping=slot_mapping, raw=raw,
                  exact16=exact16, config=key_cfg)
    voffs = dict(OFF_C=lay.slot_offset("v_codes"), OFF_N=lay.slot_offset("v_norm"))
    launch_encode(value, rotation, projection, value_centroids, value_bits, False, cache, voffs,
                  bs, page_stride, head_stride, slot_mapping=slot_mapping, raw=raw,
                  exact16=exact16, config=value_cfg)


@dataclasses.dataclass(frozen=True)
class WriteVariant:
    """What a cache write of a given shape compiles and launches (launch_write_cache).  Writes
    of other sizes with the same variant, input dtypes and cache page reuse its compiled
    kernels; a new variant compiles one (seconds) at its first write.

    pair: one encode_pair_kernel launch (else encode_kernel for the keys, then the values);
    joint, one_tile: its JOINT and ONE_TILE; exact16: EXACT16 as launched; key_config,
    value_config: the launch configs (tile rows, warps, programs per SM)."""
    pair: bool
    joint: bool
    one_tile: bool
    exact16: bool
    key_config: EncodeConfig
    value_config: EncodeConfig


def write_variant(arch_name: str, sms: int, head_dim: int, key_bits: int, value_bits: int,
                  rows: int, key_fp32: bool, value_fp32: bool, exact16: bool) -> WriteVariant:
    """The WriteVariant of a write of `rows` (token, head) rows on a GPU of `sms` SMs of arch
    `arch_name` (tq_ops.triton.launch.arch); exact16 as write_cache's exact16_matrices."""
    exact16 = exact16 and rows >= EXACT16_MIN_ROWS
    key_cfg, value_cfg = pair_configs(arch_name, head_dim, key_bits, value_bits, rows, sms,
                                      key_fp32, value_fp32, exact16)
    if rows <= LATENCY_ROWS or key_cfg == value_cfg:
        joint = rows > LATENCY_ROWS
        # one tile per program when the persistent grid's cap leaves every tile its own
        one_tile = joint and 2 * triton.cdiv(rows, key_cfg.rows) <= key_cfg.programs_per_sm * sms
        return WriteVariant(True, joint, one_tile, exact16 and joint, key_cfg, value_cfg)
    return WriteVariant(False, True, False, exact16, key_cfg, value_cfg)


@functools.lru_cache(maxsize=64)
def write_variant_tokens(arch_name: str, sms: int, head_dim: int, num_kv_heads: int,
                         key_bits: int, value_bits: int, max_tokens: int, fp32: bool,
                         exact16: bool) -> tuple[int, ...]:
    """The smallest token count of each distinct WriteVariant among writes of 1 .. max_tokens
    tokens of num_kv_heads heads (fp32: fp32 keys and values), ascending.  Writing each once
    compiles every kernel a write of up to max_tokens tokens can launch (warm_up_write_cache).
    Memoised: a pure function of its arguments, called once per attention layer."""
    first: dict[WriteVariant, int] = {}
    for t in range(1, max_tokens + 1):
        first.setdefault(write_variant(arch_name, sms, head_dim, key_bits, value_bits,
                                       t * num_kv_heads, fp32, fp32, exact16), t)
    return tuple(sorted(first.values()))


def warm_up_write_cache(cache: Tensor, rotation: Tensor, projection: Tensor,
                        key_centroids: Tensor, value_centroids: Tensor, key_bits: int, qjl: bool,
                        value_bits: int, exact16_matrices: bool, max_tokens: int,
                        dtype: torch.dtype, slot_dtype: torch.dtype) -> tuple[int, ...]:
    """Compile every kernel that write_cache into `cache` can launch for writes of 1 ..
    max_tokens tokens of `dtype` keys and values and `slot_dtype` slot mappings (torch.int32
    or torch.int64; each compiles its own kernels), by one write of each variant
    (write_variant_tokens) whose slots are all -1: nothing is stored.  Without it a serving
    process compiles a variant at the first prompt chunk that needs it (H200, vLLM 0.26.0,
    session 36: two compiles of ~5.5 and ~3.5 s inside the first 32k-token prefills).

    cache: (num_blocks, Hkv, block_size * slot_bytes) uint8, the cache the writes will go to
    (its page shape is part of the compiled kernels); not modified.  Other arguments as
    write_cache's.  Must not run while a CUDA graph is being captured.  Returns the token
    counts written (empty off CUDA, and for head dims that write_cache encodes with the
    reference body)."""
    d = _checks.rotation(rotation)
    if cache.device.type != "cuda" or not triton_encode_supported(d):
        return ()
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("warm_up_write_cache: a CUDA graph is being captured on this stream")
    h = int(cache.shape[1])
    tokens = write_variant_tokens(arch(cache.device), sm_count(cache.device), d, h, key_bits,
                                  value_bits, max_tokens, dtype == torch.float32,
                                  exact16_matrices)
    k = torch.zeros(tokens[-1], h, d, dtype=dtype, device=cache.device)
    slots = torch.full((tokens[-1],), -1, dtype=slot_dtype, device=cache.device)
    for t in tokens:
        torch.ops.turboquant.write_cache(k[:t], k[:t], cache, slots[:t], rotation, projection,
                                         key_centroids, value_centroids, key_bits, qjl,
                                         value_bits, exact16_matrices)
    return tokens


def check_cache(cache: Tensor, lay: layout.SlotLayout, num_kv_heads: int) -> int:
    """Validate a paged cache tensor and return its block size."""
    _checks.uint8("cache", cache, rank=3)
    if cache.shape[1] != num_kv_heads:
        _checks.fail(f"cache has {cache.shape[1]} KV heads, expected {num_kv_heads}")
    if cache.shape[2] % lay.slot_bytes:
        _checks.fail(f"cache page of {cache.shape[2]} bytes is not a whole number of "
                     f"{lay.slot_bytes}-byte slots")
    if not cache.is_contiguous():
        _checks.fail("cache must be contiguous")
    return cache.shape[2] // lay.slot_bytes


def check_paged_query(query: Tensor, cache: Tensor, rotation: Tensor, key_centroids: Tensor,
                      value_centroids: Tensor, key_bits: int, qjl: bool,
                      value_bits: int) -> tuple[int, int]:
    """Checks shared by the paged attention ops: format, query and cache. Returns (D, Hkv)."""
    d = _checks.rotation(rotation)
    lay = layout.SlotLayout(d, key_bits, qjl, value_bits)
    _checks.codebook("key", key_centroids, key_bits)
    _checks.codebook("value", value_centroids, value_bits)
    _checks.floats("query", query, rank=3)
    _checks.head_dim("query", query, d)
    hkv = cache.shape[1] if cache.dim() == 3 else 0
    check_cache(cache, lay, hkv)
    _checks.gqa(query.shape[1], hkv)
    return d, hkv


def check_raw_pool(raw_key: Tensor, raw_value: Tensor, num_kv_heads: int, d: int,
                   kv_start: int) -> None:
    """The exact-token pool (N, R, Hkv, D) of the paged attention ops, and kv_start."""
    for name, t in (("raw_key", raw_key), ("raw_value", raw_value)):
        _checks.floats(name, t, rank=4)
        if t.shape[2] != num_kv_heads or t.shape[3] != d or t.shape != raw_key.shape:
            _checks.fail(f"{name} must be (N, R, {num_kv_heads}, {d}) like raw_key, "
                         f"got {tuple(t.shape)}")
    if kv_start < 0:
        _checks.fail(f"kv_start={kv_start} must be >= 0")


@triton_op("turboquant::write_cache", mutates_args={"cache"})
def write_cache(key: Tensor, value: Tensor, cache: Tensor, slot_mapping: Tensor, rotation: Tensor,
                projection: Tensor, key_centroids: Tensor, value_centroids: Tensor, key_bits: int,
                qjl: bool, value_bits: int, exact16_matrices: bool = False) -> None:
    """Encode new tokens and write them into their slots of the paged cache, in place.

    Args:
        key, value: (T, Hkv, D) fp16/bf16/fp32.
        cache: (num_blocks, Hkv, block_size * slot_bytes) uint8, mutated (tq_ops.layout).
        slot_mapping: (T,) int32/int64, slot = block * block_size + offset; slots < 0 (padding)
            are skipped.  Two tokens must not share a slot.
        rotation, projection: (D, D) fp32.  key_centroids, value_centroids: fp32 codebooks.
        key_bits, qjl, value_bits: the format.
        exact16_matrices: the caller declares tq_ops.codec.exact16_matrices(rotation,
            projection), which holds for TQCodec.build's matrices at power-of-two head dims (the
            vLLM backend checks its codec once and declares it).  On CUDA a write of at least
            tq_ops.triton.encode.EXACT16_MIN_ROWS tokens x heads then holds each matrix in one
            fp16 operand (fewer MMAs; the codes are the same up to ties at cell boundaries);
            smaller writes are faster without it and ignore it.  There a false declaration
            cannot be checked without a host sync: each encode checks the matrices it loads
            (keys: Pi and, with QJL, S'; values: Pi) and stores NaN norms when they do not
            qualify.  Head dims above 128 (the reference body on CUDA) ignore it.  Off CUDA it
            is checked, and a false one raises ValueError.
    Returns:
        None.  NaN/Inf or norms above 65504 are stored as in encode_keys / encode_values (NaN or
        +inf norms, not checked here).
    """
    d = _checks.rotation(rotation)
    _checks.projection(projection, d)
    lay = layout.SlotLayout(d, key_bits, qjl, value_bits)
    _checks.codebook("key", key_centroids, key_bits)
    _checks.codebook("value", value_centroids, value_bits)
    _checks.floats("key", key, rank=3)
    _checks.floats("value", value, rank=3)
    _checks.head_dim("key", key, d)
    if tuple(value.shape) != tuple(key.shape):
        _checks.fail(f"value {tuple(value.shape)} must have the shape of key {tuple(key.shape)}")
    _checks.ints("slot_mapping", slot_mapping, rank=1)
    if slot_mapping.shape[0] != key.shape[0]:
        _checks.fail(f"slot_mapping has {slot_mapping.shape[0]} entries for {key.shape[0]} tokens")
    check_cache(cache, lay, key.shape[1])
    _checks.same_device(key=key, value=value, cache=cache, slot_mapping=slot_mapping,
                        rotation=rotation, projection=projection, key_centroids=key_centroids,
                        value_centroids=value_centroids)
    if key.device.type == "cuda" and triton_encode_supported(d):
        launch_write_cache(key, value, cache, slot_mapping, rotation, projection, key_centroids,
                           value_centroids, key_bits, qjl, value_bits, exact16=exact16_matrices)
        return
    # the reference body is exact for any matrices; the declaration is checked off CUDA only (a
    # check on CUDA would be a host sync, which a captured step must not have)
    if (exact16_matrices and key.device.type != "cuda" and not is_fake(rotation)
            and not codec.exact16_matrices(rotation, projection)):
        _checks.fail("exact16_matrices=True, but D^1.5 * rotation is not an integer matrix "
                     "within 2048 or the projection has entries that are not fp16 values "
                     "(tq_ops.codec.exact16_matrices)")
    reference.write_cache(key, value, cache, slot_mapping, rotation, projection, key_centroids,
                          value_centroids, key_bits, qjl, value_bits)
