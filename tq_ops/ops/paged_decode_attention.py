"""turboquant::paged_decode_attention: one query per sequence over a packed paged cache."""
from __future__ import annotations

import dataclasses
import math

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from tq_ops import _checks, codebooks, layout, reference
from tq_ops.codec import qjl_scale
from tq_ops.ops.write_cache import check_paged_query, check_raw_pool
from tq_ops.triton.decode import (LOG2E, DecodeConfig, decode_config,
                                  decode_merge_fallback_kernel, decode_merge_kernel,
                                  decode_split_kernel, num_splits, page_tile, query_prep_kernel)
from tq_ops.triton.launch import arch, has_bulk_prefetch, register_cap, sm_count
from tq_ops.triton.unpack import asm_tables, group_width, symmetric_table

# query rows per prep program: 8 rows took 0.2-0.4 us less than 16 in three runs on an H200
# (perf/NOTES.md, sessions 5 and 12); 32 or more, or 16 warps, were slower
PREP_ROWS = 8
# prep and merge are latency-bound (a few programs each): up to this head width they load the
# whole D x D matrices before any store and multiply once (tq_ops.triton.decode)
WHOLE_MATRIX_COLUMNS = 128
PREP_WARPS = 8
# up to this many query rows (and head_dim <= WHOLE_MATRIX_COLUMNS) prep runs one program per
# row on CUDA cores (query_prep_kernel with RB = 1).  At batch 1 the 8-row programs were 4
# programs of ~2600 dependent instructions per warp (Nsight Compute, (1, 4k): 8.9 us, 6.7
# cycles per issued instruction); per row, 984 instructions per warp and 116 registers
# (offline sm_90).  H200, torch.profiler: prep 5.94 -> 3.84 us at (1, 4k), 6.3 -> 4.3 at
# (1, 128k); at 256 rows (batch 8) 5.8-6.5 us against 6.0-6.3, no change.  Larger batches keep
# the 8-row tensor-core programs: unmeasured there, and every per-row program reads 128 KB of
# matrices from L2 (perf/NOTES.md, session 14)
PREP_ROWWISE_MAX_ROWS = 256
# the merge: one program per query row (decode_merge_kernel).  Measured on an H200 (perf/NOTES.md,
# sessions 5 and 12): 4 warps beat 2, 8 and 16 warps, and 2 or 4 rows per program
MERGE_STEPS = (32, 64, 128)  # partials loaded per step of its loop: merge_step picks one
# up to this many partials per step the merge loads Pi before its loop (decode_merge_kernel)
MERGE_PI_FIRST_MAX_STEP = 64
MERGE_WARPS = 4
# up to this many splits the merge takes MERGE_TILE_ROWS query rows per program
# (decode_merge_kernel's TILE, merge_tile): the rows' partials merged side by side, Pi read
# once per tile; more splits keep one program per row (merge_tiles says why)
MERGE_TILE_MAX_SPLITS = 8
MERGE_TILE_ROWS = 16
MERGE_TILE_STEP = 4       # splits per step of the tile's loop (their loads issued together)
MERGE_TILE_COLUMNS = 32   # Pi's columns per block of the tile's un-rotation
# the raw-pool partial, one program per (sequence, KV head) in the split launch
# (tq_ops.triton.decode.raw_partial).  Its code shares the split kernel's register budget: with
# 32-token tiles the compressed hot loop compiles without spills (offline sm_90: 1987
# instructions per tile against 1968 without the raw branch; 64-token tiles 2026 and spills);
# on an H200 64-token tiles and 64-column chunks timed the same (perf/NOTES.md, session 12)
RAW_TILE = 32      # raw-pool tokens per tile (vLLM's flush buffer holds up to S + F ~ 130)
RAW_COLUMNS = 32   # head_dim columns per MMA chunk


def launch(query: Tensor, cache: Tensor, block_table: Tensor, kv_lens: Tensor, raw_key: Tensor,
           raw_value: Tensor, raw_index: Tensor, raw_lens: Tensor, rotation: Tensor,
           projection: Tensor, key_centroids: Tensor, value_centroids: Tensor, key_bits: int,
           qjl: bool, value_bits: int, scale: float, kv_start: int, raw: bool = False,
           builtin_codebooks: bool = False, config: DecodeConfig | None = None,
           splits: int | None = None, fallback_tables: tuple[int, ...] | None = None) -> Tensor:
    """The Triton body: prep, split and merge launches (tq_ops.triton.decode).

    raw=True launches the bare @triton.jit kernels instead of wrap_triton ones: the interpreter
    tests run this on CPU tensors under TRITON_INTERPRET=1, and the perf tools on a GPU (the
    kernels, register cap included, that the op's eager body launches; called outside the op
    with raw=False, a launch goes through wrap_triton's dispatch and takes no cap, so a capped
    row's decoders are swapped for the uncapped ones: split_launch).  config / splits replace
    the table's launch config and split count (perf/tune_decode.py and perf/tune_splits.py
    explore them; the op never passes them).
    builtin_codebooks: the op's argument; with the fast decoders it swaps the fallback merge
    (a codebook check) for the plain one.
    fallback_tables: (KT0, KT1, VT0, VT1), for the interpreter tests: the fallback merge runs
    after the split kernel's portable decoders, checking the codebooks against these table
    words (asm_tables) instead of the baked ones; words that do not match make it attend the
    compressed tokens itself.
    """
    b, hq, d = query.shape
    # these become tl.constexpr values: concrete ints (a guard under dynamic shapes)
    hq, d, hkv = int(hq), int(d), int(cache.shape[1])
    g = hq // hkv
    lay = layout.SlotLayout(d, key_bits, qjl, value_bits)
    bs = int(cache.shape[2]) // lay.slot_bytes
    arch_name = arch(query.device)
    cfg, cap = split_launch(config or decode_config(arch_name, d, key_bits),
                            query.device.type == "cuda", bare=raw)
    block_n = page_tile(bs, cfg, d)
    ns = splits or num_splits(b, hkv, block_table.shape[1] * bs, sm_count(query.device), cfg,
                              tile=block_n)
    dg = group_width(d)
    dp = 8 * dg
    gp = max(2, triton.next_power_of_2(g))
    q = query.contiguous()
    rk = raw_key if raw_key.stride(-1) == 1 else raw_key.contiguous()
    rv = raw_value if raw_value.stride(-1) == 1 else raw_value.contiguous()
    f32 = torch.float32
    qr = torch.empty((b * hq, d), dtype=f32, device=q.device)
    u = torch.empty((b * hq, d), dtype=f32, device=q.device) if qjl else qr
    parts = b * hkv * (ns + 1) * gp
    o_part = torch.empty((parts, dp), dtype=f32, device=q.device)
    m_part = torch.empty((parts,), dtype=f32, device=q.device)
    l_part = torch.empty((parts,), dtype=f32, device=q.device)
    out = torch.empty((b, hq, d), dtype=query.dtype, device=q.device)
    consts = split_constants(hkv, g, d, key_bits, qjl, value_bits, bs, block_n,
                             int(cache.stride(0)), q.device.type == "cuda",
                             cfg.l2_prefetch and has_bulk_prefetch(arch_name))
    use_fast = consts["PAIRED"]
    # the split kernel's plane operands, built once per query row by the prep launch
    planes = (use_fast and cfg.key_planes and key_bits == 2
              and symmetric_table(consts["KT0"], consts["KT1"]))
    qp = torch.empty((b * hq, 3, d) if planes else (1, 3, d), dtype=torch.float16,
                     device=q.device)
    qo = torch.empty((b * hq, 4) if planes else (1, 4), dtype=f32, device=q.device)
    # the key planes as int8 operands (tq_ops.triton.decode.store_int8_key_operands): 16
    # (D/4, GP) int8 per KV head row; their code bytes make one K = 32 MMA step at head_dim 128
    int8_keys = planes and cfg.int8_keys and d == 128
    q8 = torch.empty((b * hkv * 16 * (d // 4) * gp,) if int8_keys else (1,), dtype=torch.int8,
                     device=q.device)
    prep = query_prep_kernel if raw else wrap_triton(query_prep_kernel)
    split = decode_split_kernel if raw else wrap_triton(decode_split_kernel)
    merge = decode_merge_kernel if raw else wrap_triton(decode_merge_kernel)
    rb = 1 if b * hq <= PREP_ROWWISE_MAX_ROWS and dp <= WHOLE_MATRIX_COLUMNS else PREP_ROWS
    row_parts = prep_parts(b * hq, rb, qjl, sm_count(q.device))
    prep[prep_grid(b * hq, rb, row_parts)](
        q, rotation, projection, qr, u, qp, qo, b * hq, scale * LOG2E, qjl_scale(d),
        D=d, DP=dp, RB=rb, JB=WHOLE_MATRIX_COLUMNS, QJL=qjl, PLANES=planes,
        KT0=consts["KT0"], KT1=consts["KT1"], q8_ptr=q8, INT8_KEYS=int8_keys, G=g, GP=gp,
        num_warps=PREP_WARPS)
    # the asm decoders (use_fast) do nothing for codebooks other than their baked ones; then
    # the fallback merge attends the compressed tokens, unless the caller declared the built-in
    # codebooks (decode_split_kernel, decode_merge_fallback_kernel).  Off CUDA the decoders
    # that read any codebook run in the split programs.  One program past the splits per row
    # attends the raw pool.
    alone = use_fast and builtin_codebooks
    split[(b * hkv, ns + 1)](
        qr, u, qp, qo, cache, block_table, kv_lens, key_centroids, value_centroids, o_part,
        m_part, l_part, kv_start, block_table.stride(0), cache.stride(0), ns,
        q, rk, rv, raw_index, raw_lens, scale * LOG2E,
        rk.stride(0), rk.stride(1), rk.stride(2), rv.stride(0), rv.stride(1), rv.stride(2),
        FAST=use_fast, KEY_PLANES=planes, VALUE_WORDS=cfg.value_words, ALONE=alone,
        q8_ptr=q8, INT8_KEYS=int8_keys, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **consts, **cap)
    if merge_tiles(ns, dp):
        # MERGE_TILE_ROWS query rows per program (merge_tile)
        merge_grid = (triton.cdiv(b * hq, MERGE_TILE_ROWS),)
        merge_consts = dict(HKV=hkv, G=g, GP=gp, D=d, DP=dp, JB=MERGE_TILE_COLUMNS,
                            SC=MERGE_TILE_STEP, PI_FIRST=True, rows=b * hq,
                            TILE=MERGE_TILE_ROWS)
    else:
        step = merge_step(ns)
        merge_grid = (b * hq,)
        # rows and TILE unused here but passed: the kernels take no defaults (test_launch_configs)
        merge_consts = dict(HKV=hkv, G=g, GP=gp, D=d, DP=dp, JB=WHOLE_MATRIX_COLUMNS, SC=step,
                            PI_FIRST=step <= MERGE_PI_FIRST_MAX_STEP, rows=b * hq, TILE=0)
    if (use_fast and not alone) or fallback_tables is not None:
        fallback = decode_merge_fallback_kernel if raw else wrap_triton(
            decode_merge_fallback_kernel)
        fconsts = fallback_constants(consts)
        if fallback_tables is not None:
            fconsts.update(zip(("KT0", "KT1", "VT0", "VT1"), fallback_tables))
        fallback[merge_grid](
            o_part, m_part, l_part, rotation, out, ns, qr, u, cache, block_table, kv_lens,
            key_centroids, value_centroids, kv_start, block_table.stride(0), cache.stride(0),
            num_warps=MERGE_WARPS, **merge_consts, **fconsts)
    else:
        merge[merge_grid](o_part, m_part, l_part, rotation, out, ns, num_warps=MERGE_WARPS,
                          **merge_consts)
    return out


def fallback_constants(split_consts: dict) -> dict:
    """decode_merge_fallback_kernel's constexprs beyond the merge's: the split kernel's layout
    and table constants (split_constants) that its slow decoders use."""
    keep = ("DG", "BS", "BLOCK_N", "KB", "QJL", "VB", "OFF_KC", "OFF_KS", "OFF_KN", "OFF_KG",
            "OFF_VC", "OFF_VN", "SLOT", "AL_K", "AL_S", "AL_V", "AL_N", "KT0", "KT1", "VT0",
            "VT1")
    return {k: split_consts[k] for k in keep}


def merge_step(num_splits: int) -> int:
    """Partials the merge loads per step of its loop (decode_merge_kernel's SC): the smallest of
    MERGE_STEPS that takes them all in one step, else the largest.

    Each step is a dependent round trip to memory, so a long row of partials wants wide steps;
    but a step computes on all SC slots, masked ones included, and holds SC x D fp32 in
    registers.  H200, session 15 (perf/ab_decode.py, 2 rounds, pages 64 and 16; perf/NOTES.md):
    64 per step for every row took (1, 4k) 16.2 -> 15.7 us, (1, 32k) 33.4 -> 31.9, (1, 128k)
    87.2 -> 83.6 (64, 128 and 187 splits) and cost 0.3-0.6% at the shapes with 3-16 splits;
    then 128 per step past 64 partials (Pi loaded after the loop, MERGE_PI_FIRST_MAX_STEP) took
    (1, 32k) 31.8 -> 31.0 us and (1, 128k) 83.8 -> 83.2 at page 64, 36.1 -> 35.1 and 98.9 ->
    96.7 at page 16; 8 warps with 64 or 128 per step lost up to 15% at the large shapes.  A
    function of shapes only (the split count), so it never varies with the data; each width is
    a compiled variant of the merge, compiled when vLLM captures its batch sizes (at long
    contexts, batch 1 and 512 take different ones)."""
    for step in MERGE_STEPS:
        if num_splits <= step:
            return step
    return MERGE_STEPS[-1]


def merge_tiles(num_splits: int, dp: int) -> bool:
    """Whether the merge takes MERGE_TILE_ROWS query rows per program (decode_merge_kernel's
    TILE): at most MERGE_TILE_MAX_SPLITS splits (many rows: the split count fills one wave of
    split programs) and heads up to WHOLE_MATRIX_COLUMNS.  A function of shapes only, like
    merge_step: each mode is a compiled variant of the merge.

    Why: one program per row reads Pi (64 KB at D = 128) per row, which is most of a merge
    of few partials over many rows; a tile reads it once per 16 rows and merges the rows'
    partials side by side.  Its loop takes the splits MERGE_TILE_STEP at a time, one memory
    round trip per step, so it lengthens with the splits, where the per-row programs load a
    row's partials at once.  H200 (perf/NOTES.md, session 34), the op with built-in codebooks
    declared, page 64: with the tiles up to 32 splits and one split per step, (64, 8k) (3
    splits) 0.2567 -> 0.2425 ms and (32, 16k) (6) 0.2385 -> 0.2364, but (8, 32k) (24) 0.1250
    -> 0.1413 and (8, 4k) (16) 0.0307 -> 0.0390; as here, 0.2563 -> 0.2425 and 0.2386 ->
    0.2362, the other shapes (per-row merges) unchanged."""
    return num_splits <= MERGE_TILE_MAX_SPLITS and dp <= WHOLE_MATRIX_COLUMNS


def prep_parts(rows: int, rb: int, qjl: bool, sms: int) -> int:
    """Programs per query row of query_prep_kernel's one-row programs (its grid's second
    dimension, read at run time: one compiled variant serves both): 2 (the key operands and
    the sign operands apart) with QJL while both programs of every row get an SM of their own,
    else 1.  H200 (perf/NOTES.md, session 31): the prep 4.2 -> 3.1 us at (1, 4k)
    (32 rows, 64 programs); at (8, 4k) (256 rows, 512 programs, each reading 64-128 KB of
    matrices from L2) the op was 5.8% slower."""
    return 2 if rb == 1 and qjl and 2 * rows <= sms else 1


def prep_grid(rows: int, rb: int, parts: int) -> tuple[int, int]:
    """query_prep_kernel's grid for `rows` query rows, rb per program, `parts` (prep_parts)."""
    return triton.cdiv(rows, rb), parts


def split_launch(cfg: DecodeConfig, on_cuda: bool, bare: bool = False
                 ) -> tuple[DecodeConfig, dict]:
    """The split kernel's config and launch options as this launch can take them.  A launch
    through wrap_triton's dispatch (traced, or called outside the op with wrap_triton enabled)
    cannot take a register cap (tq_ops.triton.launch): it gets the decoders that fit the row's
    resident-program count without one, so the split count still fills whole waves (the capped
    ones take 226+ registers uncapped: 9 resident, not 12).  A bare launch (launch's raw=True)
    always can."""
    if bare:
        cap = {"maxnreg": cfg.max_registers} if on_cuda and cfg.max_registers else {}
    else:
        cap = register_cap(cfg.max_registers if on_cuda else 0)
    if cfg.max_registers and not cap:
        cfg = dataclasses.replace(cfg, key_planes=False, value_words=False, max_registers=0)
    return cfg, cap


def split_constants(hkv: int, g: int, d: int, key_bits: int, qjl: bool, value_bits: int,
                    bs: int, block_n: int, page_stride: int, on_cuda: bool,
                    l2_prefetch: bool = True) -> dict:
    """The tl.constexpr arguments of decode_split_kernel except FAST and the decoder switches
    (perf/sass_report.py compiles the kernel offline with the same ones).  l2_prefetch: the
    config's DecodeConfig.l2_prefetch, on a GPU that has the instruction
    (tq_ops.triton.launch.has_bulk_prefetch)."""
    lay = layout.SlotLayout(d, key_bits, qjl, value_bits)
    comps = dict(lay.components)
    dg = group_width(d)
    offs = dict(OFF_KC=lay.slot_offset("k_codes"), OFF_KN=lay.slot_offset("k_norm"),
                OFF_KS=lay.slot_offset("k_signs") if qjl else 0,
                OFF_KG=lay.slot_offset("k_gamma") if qjl else 0,
                OFF_VC=lay.slot_offset("v_codes"), OFF_VN=lay.slot_offset("v_norm"))
    # byte alignment of each component's rows, for vectorised loads
    common = math.gcd(16, page_stride, bs * lay.slot_bytes)
    align = {f"AL_{k}": math.gcd(common, bs * lay.slot_offset(n), comps[n]) if n in comps else 1
             for k, n in (("K", "k_codes"), ("S", "k_signs"), ("V", "v_codes"))}
    # fp16 scalar rows (norms, gamma) of a tile: tiles start at multiples of block_n in a page
    align["AL_N"] = math.gcd(common, 2 * block_n,
                             *(bs * lay.slot_offset(n) for n in ("k_norm", "k_gamma", "v_norm")
                               if n in comps))
    # the L2 hint (attend_pages: tiles inside one page, GPU only) takes a 16-byte aligned
    # region: every page region is when the strides are multiples of 16 (the instruction itself
    # checks the base address)
    region = bs * lay.slot_bytes
    prefetch = region if (on_cuda and l2_prefetch and bs >= block_n and region % 16 == 0
                          and page_stride % 16 == 0) else 0
    kt, vt = asm_tables(d, key_bits), asm_tables(d, value_bits)
    # the asm decoders are GPU-only; off CUDA (interpreter tests) the slow decoders run
    paired = on_cuda and kt[0] == 1 and vt[0] == 1
    return dict(HKV=hkv, G=g, GP=max(2, triton.next_power_of_2(g)), D=d, DP=8 * dg, DG=dg,
                BS=bs, BLOCK_N=block_n, KB=key_bits, QJL=qjl, VB=value_bits,
                SLOT=lay.slot_bytes, PAIRED=paired, KT0=kt[1], KT1=kt[2], VT0=vt[1], VT1=vt[2],
                RAW_N=RAW_TILE, RAW_DC=RAW_COLUMNS, PREFETCH=prefetch, **offs, **align)


@triton_op("turboquant::paged_decode_attention", mutates_args=())
def paged_decode_attention(query: Tensor, cache: Tensor, block_table: Tensor, kv_lens: Tensor,
                           raw_key: Tensor, raw_value: Tensor, raw_index: Tensor, raw_lens: Tensor,
                           rotation: Tensor,
                           projection: Tensor, key_centroids: Tensor, value_centroids: Tensor,
                           key_bits: int, qjl: bool, value_bits: int, scale: float,
                           kv_start: int, builtin_codebooks: bool = False) -> Tensor:
    """Decode attention: compressed pages plus exact raw tokens in one softmax.

    Args:
        query: (B, Hq, D) fp16/bf16/fp32, one token per sequence.
        cache: (num_blocks, Hkv, block_size * slot_bytes) uint8 (tq_ops.layout).
        block_table: (B, max_blocks) int32, page ids of each sequence.
        kv_lens: (B,) int32; sequence b attends page positions kv_start .. kv_lens[b]-1.
        raw_key, raw_value: (N, R, Hkv, D), a pool of exact tokens (sinks and the recent buffer);
            sequence b owns row raw_index[b], whose first raw_lens[b] tokens are valid.
        raw_index: (B,) int32.  raw_lens: (B,) int32.
        rotation, projection: (D, D) fp32.  key_centroids, value_centroids: fp32 codebooks.
        key_bits, qjl, value_bits: the format.  scale: softmax scale.
        kv_start: first page position attended (e.g. the sink count when sinks are kept raw).
        builtin_codebooks: the caller declares that key_centroids and value_centroids are
            tq_ops.codebooks.centroids(D, bits), as TQCodec.build makes them (the vLLM backend
            checks its codec once and declares it).  On CUDA the merge launch then skips its
            codebook check and the fallback that serves other codebooks.  There a false
            declaration cannot be checked without a host sync: the outputs of sequences with
            compressed tokens are NaN, unless the codebooks round to the built-in ones in fp16
            (what the fast decoders use either way).  Off CUDA it is checked, and a false one
            raises ValueError.
    Returns:
        (B, Hq, D) in query.dtype; a sequence with no valid token gets zeros.
    """
    d, hkv = check_paged_query(query, cache, rotation, key_centroids, value_centroids, key_bits,
                               qjl, value_bits)
    _checks.projection(projection, d)
    b = query.shape[0]
    _checks.ints("block_table", block_table, rank=2)
    _checks.ints("kv_lens", kv_lens, rank=1)
    _checks.ints("raw_lens", raw_lens, rank=1)
    _checks.ints("raw_index", raw_index, rank=1)
    if (block_table.shape[0] != b or kv_lens.shape[0] != b or raw_lens.shape[0] != b
            or raw_index.shape[0] != b):
        _checks.fail(f"block_table, kv_lens, raw_index and raw_lens need {b} rows (one per query)")
    check_raw_pool(raw_key, raw_value, hkv, d, kv_start)
    _checks.same_device(query=query, cache=cache, block_table=block_table, kv_lens=kv_lens,
                        raw_key=raw_key, raw_value=raw_value, raw_index=raw_index,
                        raw_lens=raw_lens, rotation=rotation, projection=projection,
                        key_centroids=key_centroids, value_centroids=value_centroids)
    if query.device.type == "cuda":
        return launch(query, cache, block_table, kv_lens, raw_key, raw_value, raw_index, raw_lens,
                      rotation, projection, key_centroids, value_centroids, key_bits, qjl,
                      value_bits, scale, kv_start, builtin_codebooks=builtin_codebooks)
    if builtin_codebooks and not is_fake(key_centroids):
        for name, c, bits in (("key", key_centroids, key_bits),
                              ("value", value_centroids, value_bits)):
            if not codebooks.is_builtin(c, d, bits):
                _checks.fail(f"builtin_codebooks=True, but the {name} centroids are not the "
                             f"built-in {bits}-bit codebook of head_dim {d}")
    return reference.paged_decode_attention(query, cache, block_table, kv_lens, raw_key, raw_value,
                                            raw_index, raw_lens, rotation, projection, key_centroids,
                                            value_centroids, key_bits, qjl, value_bits, scale,
                                            kv_start)
