"""The backend's attention over the paged cache and the raw pool, without vLLM types (so it is
tested on its own).  Shapes: T tokens, Hq / Hkv query / KV heads, D head_dim; `cache` is the
(num_blocks, Hkv, block_size * slot_bytes) uint8 paged cache of tq_ops.layout; `raw_key` /
`raw_value` are the (N, R, Hkv, D) raw pool (row per request: sinks, then the current group).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import tq_ops  # noqa: F401  (registers torch.ops.turboquant.*)
from tq_ops import codebooks, reference
from tq_ops.codec import TQCodec
from tq_vllm.window import Segment, Window

tq = torch.ops.turboquant


def decode(codec: TQCodec, window: Window, query: Tensor, cache: Tensor, block_table: Tensor,
           kv_lens: Tensor, raw_key: Tensor, raw_value: Tensor, raw_index: Tensor,
           raw_lens: Tensor, scale: float, builtin_codebooks: bool = False) -> Tensor:
    """One query per request.  query (B, Hq, D); block_table (B, MB) int32; kv_lens (B,) int32 =
    ring_start of the query position; raw_index / raw_lens (B,) int32.  Returns (B, Hq, D).
    builtin_codebooks: the op's declaration (has_builtin_codebooks(codec) says when it holds)."""
    f = codec.config
    return tq.paged_decode_attention(query, cache, block_table, kv_lens, raw_key, raw_value,
                                     raw_index, raw_lens, codec.rotation, codec.qjl_projection,
                                     codec.key_centroids, codec.value_centroids, f.key_mse_bits,
                                     f.use_qjl, f.value_bits, scale, window.sink_tokens,
                                     builtin_codebooks)


def has_builtin_codebooks(codec: TQCodec) -> bool:
    """Whether the codec's codebooks are the built-in ones (a host check: one copy of the
    centroids; the backend makes it once per codec, before any graph capture)."""
    f = codec.config
    return (codebooks.is_builtin(codec.key_centroids, f.head_dim, f.key_mse_bits)
            and codebooks.is_builtin(codec.value_centroids, f.head_dim, f.value_bits))


def _records(codec: TQCodec, cache: Tensor, block_row: Tensor, start: int, end: int):
    """Key and value records (end-start, Hkv, bytes) of page positions [start, end) of one
    sequence whose page ids are block_row (MB,)."""
    f = codec.config
    block_size = cache.shape[2] // f.slot_bytes
    nblk = -(-end // block_size)
    keys, values = reference.gather_pages(cache, block_row[None, :nblk], f.head_dim,
                                          f.key_mse_bits, f.use_qjl, f.value_bits)
    return keys[0, start:end], values[0, start:end]


def prefill_contiguous(codec: TQCodec, window: Window, segments: Sequence[Segment],
                       query: Tensor, key: Tensor, value: Tensor, cache: Tensor,
                       block_table: Tensor, raw_key: Tensor, raw_value: Tensor,
                       rows: Sequence[int], scale: float, out: Tensor) -> None:
    """Prefill, one turboquant::attention call per segment (cost ~ its queries x its keys).

    query (T, Hq, D), key / value (T, Hkv, D): the batch's tokens (segment token indices point
    into them); rows[b] is request b's raw-pool row; out (T, Hq, D) receives the segments'
    outputs.  The pool must already hold the sinks and the group tokens before each segment."""
    f = codec.config
    s_cnt = window.sink_tokens
    for seg in segments:
        t0, t1 = seg.tok_start, seg.tok_start + seg.end - seg.start
        n_sink = min(s_cnt, seg.start)
        pool_k = raw_key[rows[seg.req], :seg.pool_len]
        pool_v = raw_value[rows[seg.req], :seg.pool_len]
        if seg.prefix_len > s_cnt:
            krec, vrec = _records(codec, cache, block_table[seg.req], s_cnt, seg.prefix_len)
        else:
            lay = f.layout
            hkv = cache.shape[1]
            krec = cache.new_zeros((0, hkv, lay.key_bytes))
            vrec = cache.new_zeros((0, hkv, lay.value_bytes))
        recent_k = torch.cat([pool_k[n_sink:].to(key.dtype), key[t0:t1]])
        recent_v = torch.cat([pool_v[n_sink:].to(value.dtype), value[t0:t1]])
        out[t0:t1] = tq.attention(query[t0:t1], krec, vrec, pool_k[:n_sink].to(key.dtype),
                                  pool_v[:n_sink].to(value.dtype), recent_k, recent_v,
                                  codec.rotation, codec.qjl_projection, codec.key_centroids,
                                  codec.value_centroids, f.key_mse_bits, f.use_qjl, f.value_bits,
                                  scale, True)


# The scratch of one prefill call (paged_dequantize's K and V, fp16, and for a prefix attended
# in slabs the fp32 partials) may take at most this many bytes: 128k decoded positions at 8 KV
# heads x 128 dims.  A step whose requests need more is cut into groups of consecutive
# requests that fit, one call each; a single request over the budget is attended in slabs
# (_prefill_long).  Reading the pages inside the prefill kernel needs no scratch but decodes
# the prefix once per 64 query tokens, about 3x slower (perf/NOTES.md, sessions 16-17): only a
# budget too small for one query's partials falls back to it.  The scratch is allocated and
# freed per call (the caching allocator reuses it), outside the memory vLLM profiles, so the
# bound is kept well inside gpu_memory_utilization's headroom.  With FlashAttention (flash
# below) a call also holds its fp16 partial over the prefix and, for bf16 queries, their fp16
# copy: 2 x T x Hq x D x 2 bytes, 256 MiB for a 16k-token chunk at 32 x 128, the size of the
# step's own query and output tensors.
DECODED_PREFIX_BUDGET_BYTES = 512 << 20

# Rows per page of the decoded prefix as FlashAttention reads it: every request's decoded rows
# start on such a page (segment_plan's row_align), so the prefix of a flush group is its
# request's pages cut by seqused_k.  A multiple of 16, the page unit of vLLM's FA2 and FA3.
FLASH_PAGE_ROWS = 64

# flash(q, k_pages, v_pages, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k,
# block_table, softmax_scale) -> (out, lse): FlashAttention's varlen forward over paged K/V
# without a causal mask (tq_vllm.compat.flash_varlen binds vLLM's).  q (T, Hq, D), k_pages /
# v_pages (pages, page_rows, Hkv, D), all one 16-bit dtype; cu_seqlens_q (S+1,), seqused_k
# (S,), block_table (S, max_pages) int32.  out (T, Hq, D) in q's dtype, normalised (0 for a
# sequence without keys); lse (Hq, T) fp32, natural log (+-inf or NaN without keys, by version).
Flash = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class SegmentPlan:
    """A batch's prefill segments as the device tensors of turboquant::paged_prefill_attention.

    Built once per engine step by the metadata builder and shared by every layer: a tensor made
    from host data per layer would copy (and synchronise the stream) once per layer.

    The decoded prefix: each request with compressed positions kv_start .. P-1 (P the longest
    prefix among its segments) owns rows req_offsets[r] .. + P - kv_start of the
    paged_dequantize outputs, and its segments read them from decoded_start."""
    first: int          # the segments tile tokens first .. last-1 of the batch, in order
    last: int
    cu: Tensor          # (S + 1,) int32: query offsets of the segments, from 0
    prefix: Tensor      # (S,) int32: compressed positions each segment attends
    pool: Tensor        # (S,) int32: raw-pool tokens each segment attends
    block_table: Tensor  # (S, max_blocks) int32: each segment's request's block-table row
    raw_index: Tensor   # (S,) int32: each segment's request's raw-pool row
    kv_start: int = 0      # host: the first compressed position (the window's sink count)
    decoded_rows: int = 0  # host: rows of the decoded prefix (0: no compressed position)
    req_block_table: Tensor | None = None  # (R, max_blocks) int32: the requests' rows
    req_lens: Tensor | None = None       # (R,) int32: each request's longest prefix
    req_offsets: Tensor | None = None    # (R,) int32: each request's first decoded row
    decoded_start: Tensor | None = None  # (S,) int32: each segment's request's first row
    # host copies, to cut the plan into groups of requests without a device sync
    cu_host: tuple[int, ...] = ()       # (S + 1,): cu
    req_rows: tuple[int, ...] = ()      # (R,): each request's decoded rows
    req_segments: tuple[int, ...] = ()  # (R,): each request's segment count (consecutive)
    prefix_host: tuple[int, ...] = ()   # (S,): prefix
    row_align: int = 1  # host: every request's decoded rows start at a multiple of this


def _align(rows: int, align: int) -> int:
    return -(-rows // align) * align


def segment_plan(segments: Sequence[Segment], block_table: Tensor, raw_index: Tensor,
                 device: torch.device, kv_start: int = 0, row_align: int = 1) -> SegmentPlan:
    """The SegmentPlan of non-empty `segments` of a batch whose requests have block-table rows
    `block_table` (B, max_blocks) and raw-pool rows `raw_index` (B,), compressed positions from
    kv_start (the sink count): one host-to-device copy (pinned, asynchronous on CUDA) and one
    gather of each per-request table.  row_align: each request's decoded rows are rounded up
    to a multiple of it (FLASH_PAGE_ROWS for FlashAttention's pages; the rows past a request's
    prefix stay zero and unread)."""
    if row_align < 1:
        raise ValueError(f"row_align={row_align} must be >= 1")
    first = segments[0].tok_start
    cu = [0]
    for seg in segments:
        if seg.tok_start - first != cu[-1]:
            raise ValueError("segments must tile the prefill tokens in order")
        cu.append(cu[-1] + seg.end - seg.start)
    n = len(segments)
    longest: dict[int, int] = {}
    for seg in segments:
        longest[seg.req] = max(longest.get(seg.req, 0), seg.prefix_len)
    reqs = list(longest)
    offsets, rows = {}, 0
    for r in reqs:
        offsets[r] = rows
        rows += _align(max(0, longest[r] - kv_start), row_align)
    m = len(reqs)
    counts = Counter(seg.req for seg in segments)
    host = torch.tensor([s.req for s in segments] + cu + [s.prefix_len for s in segments]
                        + [s.pool_len for s in segments] + reqs + [longest[r] for r in reqs]
                        + [offsets[r] for r in reqs] + [offsets[s.req] for s in segments],
                        dtype=torch.int32)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    dev = host.to(device, non_blocking=True)
    seg_req = dev[:n].long()
    tail = 4 * n + 1
    return SegmentPlan(first=first, last=first + cu[-1], cu=dev[n:2 * n + 1],
                       prefix=dev[2 * n + 1:3 * n + 1], pool=dev[3 * n + 1:4 * n + 1],
                       block_table=block_table[seg_req], raw_index=raw_index[seg_req],
                       kv_start=kv_start, decoded_rows=rows,
                       req_block_table=block_table[dev[tail:tail + m].long()],
                       req_lens=dev[tail + m:tail + 2 * m],
                       req_offsets=dev[tail + 2 * m:tail + 3 * m],
                       decoded_start=dev[tail + 3 * m:], cu_host=tuple(cu),
                       req_rows=tuple(_align(max(0, longest[r] - kv_start), row_align)
                                      for r in reqs),
                       req_segments=tuple(counts[r] for r in reqs),
                       prefix_host=tuple(s.prefix_len for s in segments), row_align=row_align)


def request_groups(plan: SegmentPlan, budget_rows: int) -> list[tuple[int, int, bool]]:
    """Consecutive requests of `plan` cut into groups whose decoded rows fit `budget_rows`:
    (first request, end request, whole) per group, in order.  A request over the budget on its
    own is a group that is not decoded whole (prefill_varlen attends it in slabs).  A group
    without compressed positions has whole False too (nothing to decode)."""
    groups: list[tuple[int, int, bool]] = []
    start, rows = 0, 0
    for r, n in enumerate(plan.req_rows):
        if n > budget_rows:
            if start < r:
                groups.append((start, r, rows > 0))
            groups.append((r, r + 1, False))
            start, rows = r + 1, 0
        elif rows + n > budget_rows:
            groups.append((start, r, rows > 0))
            start, rows = r, n
        else:
            rows += n
    if start < len(plan.req_rows):
        groups.append((start, len(plan.req_rows), rows > 0))
    return groups


def sub_plan(plan: SegmentPlan, r0: int, r1: int) -> SegmentPlan:
    """The plan of requests r0 .. r1-1 of `plan` alone: its segments, tokens and decoded rows,
    offsets rebased to start at 0 (small device subtractions, no sync)."""
    s0 = sum(plan.req_segments[:r0])
    return _cut(plan, s0, s0 + sum(plan.req_segments[r0:r1]), r0, r1, plan.req_rows[r0:r1],
                plan.req_segments[r0:r1])


def segment_range(plan: SegmentPlan, s0: int, s1: int) -> SegmentPlan:
    """Segments s0 .. s1-1 of a one-request plan as a plan of their own (the request's decoded
    rows cut to their longest prefix)."""
    rows = _align(max(0, max(plan.prefix_host[s0:s1]) - plan.kv_start), plan.row_align)
    return _cut(plan, s0, s1, 0, 1, (rows,), (s1 - s0,))


def _cut(plan: SegmentPlan, s0: int, s1: int, r0: int, r1: int, req_rows: tuple[int, ...],
         req_segments: tuple[int, ...]) -> SegmentPlan:
    """Segments s0 .. s1-1 and requests r0 .. r1-1 of `plan` (the requests of those segments),
    with their token and decoded-row offsets rebased to 0."""
    t0, row0 = plan.cu_host[s0], sum(plan.req_rows[:r0])

    def rebase(x: Tensor, by: int) -> Tensor:
        return x - by if by else x

    return SegmentPlan(
        first=plan.first + t0, last=plan.first + plan.cu_host[s1],
        cu=rebase(plan.cu[s0:s1 + 1], t0), prefix=plan.prefix[s0:s1], pool=plan.pool[s0:s1],
        block_table=plan.block_table[s0:s1], raw_index=plan.raw_index[s0:s1],
        kv_start=plan.kv_start, decoded_rows=sum(req_rows),
        req_block_table=plan.req_block_table[r0:r1], req_lens=plan.req_lens[r0:r1],
        req_offsets=rebase(plan.req_offsets[r0:r1], row0),
        decoded_start=rebase(plan.decoded_start[s0:s1], row0),
        cu_host=tuple(c - t0 for c in plan.cu_host[s0:s1 + 1]), req_rows=req_rows,
        req_segments=req_segments, prefix_host=plan.prefix_host[s0:s1],
        row_align=plan.row_align)


def prefill_varlen(codec: TQCodec, window: Window, plan: SegmentPlan, query: Tensor,
                   key: Tensor, value: Tensor, cache: Tensor, raw_key: Tensor,
                   raw_value: Tensor, scale: float, out: Tensor,
                   flash: Flash | None = None) -> None:
    """Prefill of the plan's segments by turboquant::paged_prefill_attention (the GPU path): one
    call, or one per group of requests when their decoded prefixes are over the budget.

    Same arguments as prefill_contiguous except the segments, block table and raw-pool rows,
    given as their plan (segment_plan).  The requests' compressed prefixes are first decoded
    once (paged_dequantize, fp16; fp32 for fp32 queries) when they fit
    DECODED_PREFIX_BUDGET_BYTES: the prefill kernel then reads them as K/V instead of decoding
    the pages again for every block of queries.  A step over the budget is cut into groups of
    requests that fit (request_groups), one call each, and a request over it alone is attended
    in slabs (_prefill_long).

    flash: FlashAttention (see Flash), used for the decoded prefix of every call that decodes
    it whole into fp16: it attends the prefix, and paged_prefill_attention the raw pool and the
    chunk with that partial as its prior.  Needs plan.row_align a multiple of FLASH_PAGE_ROWS.
    The slabs of a request over the budget stay with the Triton kernels."""
    if flash is not None and plan.row_align % FLASH_PAGE_ROWS:
        raise ValueError(f"flash needs a segment plan with row_align a multiple of "
                         f"{FLASH_PAGE_ROWS}, got {plan.row_align}")
    if plan.kv_start != window.sink_tokens:
        raise ValueError(f"segment plan built for kv_start={plan.kv_start}, the window keeps "
                         f"{window.sink_tokens} sinks")
    hkv, d = cache.shape[1], query.shape[2]
    # fp16 for bf16 models too: finer on the compressed part, and in range (every decoded
    # coordinate is at most its token's norm, which the format stores in fp16)
    dtype = torch.float32 if query.dtype == torch.float32 else torch.float16
    budget_rows = DECODED_PREFIX_BUDGET_BYTES // (hkv * d * 2 * dtype.itemsize)
    if plan.decoded_rows <= budget_rows:
        _prefill_call(codec, window, plan, plan.decoded_rows > 0, dtype, query, key, value,
                      cache, raw_key, raw_value, scale, out, flash)
        return
    for r0, r1, whole in request_groups(plan, budget_rows):
        part = sub_plan(plan, r0, r1)
        if whole or part.decoded_rows == 0:
            _prefill_call(codec, window, part, whole, dtype, query, key, value, cache, raw_key,
                          raw_value, scale, out, flash)
        else:
            _prefill_long(codec, window, part, dtype, query, key, value, cache, raw_key,
                          raw_value, scale, out, flash)


def slab_shape(tokens: int, heads: int, head_dim: int, kv_heads: int, dtype: torch.dtype,
               budget: int) -> tuple[int, int]:
    """(query tokens per group, decoded rows per slab) of a prefix attended in slabs within
    `budget` bytes: a group's two fp32 partials (the prior read and the one written:
    2 x heads x (head_dim + 1) x 4 bytes per token) take at most half of it, one slab's decoded
    K and V the rest.  (0, 0) when the budget holds no token's partials."""
    per_token = 2 * heads * (head_dim + 1) * 4
    group = min(tokens, budget // 2 // per_token)
    if group == 0:
        return 0, 0
    return group, (budget - group * per_token) // (kv_heads * head_dim * 2 * dtype.itemsize)


def _prefill_long(codec: TQCodec, window: Window, plan: SegmentPlan, dtype: torch.dtype,
                  query: Tensor, key: Tensor, value: Tensor, cache: Tensor, raw_key: Tensor,
                  raw_value: Tensor, scale: float, out: Tensor, flash: Flash | None) -> None:
    """One request whose decoded prefix alone is over the budget: its segments in groups of
    queries, and each group's compressed positions in slabs decoded one at a time
    (slab_shape).  The slabs past the first go through paged_prefill_prefix, each one the prior
    of the slab before it; the first slab, the raw pool and the chunk then go through
    paged_prefill_attention with that prior: the same softmax, merged in fp32.  A budget too
    small for that reads the pages in the prefill kernel (no scratch, about 3x slower)."""
    group, rows = slab_shape(plan.last - plan.first, query.shape[1], query.shape[2],
                             cache.shape[1], dtype, DECODED_PREFIX_BUDGET_BYTES)
    if rows == 0:
        _prefill_call(codec, window, plan, False, dtype, query, key, value, cache, raw_key,
                      raw_value, scale, out)
        return
    s0 = 0
    while s0 < len(plan.prefix_host):
        s1 = s0 + 1
        while (s1 < len(plan.prefix_host)
               and plan.cu_host[s1 + 1] - plan.cu_host[s0] <= group):
            s1 += 1
        part = segment_range(plan, s0, s1)
        if part.decoded_rows <= rows:
            _prefill_call(codec, window, part, part.decoded_rows > 0, dtype, query, key, value,
                          cache, raw_key, raw_value, scale, out, flash)
        else:
            _prefill_slabs(codec, window, part, rows, dtype, query, key, value, cache, raw_key,
                           raw_value, scale, out)
        s0 = s1


def _prefill_slabs(codec: TQCodec, window: Window, plan: SegmentPlan, rows: int,
                   dtype: torch.dtype, query: Tensor, key: Tensor, value: Tensor,
                   cache: Tensor, raw_key: Tensor, raw_value: Tensor, scale: float,
                   out: Tensor) -> None:
    """_prefill_long's slabs of `rows` positions for one request's segments (its decoded rows
    start at 0: decoded_start is 0 for every segment)."""
    f = codec.config
    mats = (codec.rotation, codec.qjl_projection, codec.key_centroids, codec.value_centroids,
            f.key_mse_bits, f.use_qjl, f.value_bits)
    kv0 = window.sink_tokens
    # the request's own positions, not its decoded rows (rounded up to row_align)
    end = max(plan.prefix_host)
    edges = list(range(kv0, end, rows)) + [end]
    first, last = plan.first, plan.last
    q = query[first:last]
    zero = torch.zeros(1, dtype=torch.int32, device=q.device)

    def decode(lo: int, hi: int) -> tuple[Tensor, Tensor]:
        # positions lo .. hi-1 of the request as rows 0 .. hi-lo-1
        return tq.paged_dequantize(cache, plan.req_block_table,
                                   torch.full((1,), hi, dtype=torch.int32, device=q.device),
                                   zero, hi - lo, *mats, lo, dtype)

    prior: tuple[Tensor, ...] = ()
    for lo, hi in reversed(list(zip(edges[1:-1], edges[2:]))):
        dk, dv = decode(lo, hi)
        prior = tq.paged_prefill_prefix(q, plan.cu, cache, plan.block_table,
                                        plan.prefix.clamp(min=lo, max=hi), *mats, scale, lo,
                                        dk, dv, plan.decoded_start, *prior)
        del dk, dv  # the next slab's scratch may reuse the memory
    dk, dv = decode(edges[0], edges[1])
    out[first:last] = tq.paged_prefill_attention(
        q, key[first:last], value[first:last], plan.cu, cache, plan.block_table,
        plan.prefix.clamp(max=edges[1]), raw_key, raw_value, plan.raw_index, plan.pool, *mats,
        scale, kv0, dk, dv, plan.decoded_start, *prior)


def _prefill_call(codec: TQCodec, window: Window, plan: SegmentPlan, decode: bool,
                  dtype: torch.dtype, query: Tensor, key: Tensor, value: Tensor, cache: Tensor,
                  raw_key: Tensor, raw_value: Tensor, scale: float, out: Tensor,
                  flash: Flash | None = None) -> None:
    """One paged_prefill_attention call over the plan's segments; decode: its requests'
    prefixes first go through paged_dequantize (into `dtype`), and with `flash` (fp16 rows)
    FlashAttention attends them, the op then the raw pool and the chunk with that prior."""
    f = codec.config
    first, last = plan.first, plan.last
    q = query[first:last]
    decoded, prefix, prior = (), plan.prefix, ()
    if decode:
        dk, dv = tq.paged_dequantize(
            cache, plan.req_block_table, plan.req_lens, plan.req_offsets, plan.decoded_rows,
            codec.rotation, codec.qjl_projection, codec.key_centroids, codec.value_centroids,
            f.key_mse_bits, f.use_qjl, f.value_bits, window.sink_tokens, dtype)
        decoded = (dk, dv, plan.decoded_start)
        if flash is not None and dtype != torch.float32:
            prior = _flash_prefix(flash, plan, q, dk, dv, scale)
            # no compressed position left for the op: the prior holds them all
            prefix = plan.prefix.clamp(max=plan.kv_start)
    res = tq.paged_prefill_attention(
        q, key[first:last], value[first:last], plan.cu, cache,
        plan.block_table, prefix, raw_key, raw_value, plan.raw_index, plan.pool,
        codec.rotation, codec.qjl_projection, codec.key_centroids, codec.value_centroids,
        f.key_mse_bits, f.use_qjl, f.value_bits, scale, window.sink_tokens, *decoded, *prior)
    out[first:last] = res


def _flash_prefix(flash: Flash, plan: SegmentPlan, q: Tensor, dk: Tensor, dv: Tensor,
                  scale: float) -> tuple[Tensor, Tensor]:
    """FlashAttention of the plan's queries q (T, Hq, D) over their decoded prefixes: dk / dv
    (rows, Hkv, D) fp16 seen as pages of FLASH_PAGE_ROWS rows, segment s reading
    prefix[s] - kv_start rows from its request's first row.  Returns (out (T, Hq, D) fp16,
    lse (T, Hq) fp32 with -inf where a segment has no compressed position), the prior of
    paged_prefill_attention."""
    rows_of = [max(0, p - plan.kv_start) for p in plan.prefix_host]
    page = FLASH_PAGE_ROWS
    pages = dk.shape[0] // page
    hkv, d = dk.shape[1], dk.shape[2]
    span = max(1, -(-max(rows_of) // page))
    table = (plan.decoded_start[:, None] // page
             + torch.arange(span, dtype=torch.int32, device=dk.device)[None, :])
    table = table.clamp(max=max(pages - 1, 0)).to(torch.int32)
    seqused = (plan.prefix - plan.kv_start).clamp(min=0).to(torch.int32)
    max_q = max(b - a for a, b in zip(plan.cu_host, plan.cu_host[1:]))
    o, lse = flash(q.to(dk.dtype), dk.view(pages, page, hkv, d), dv.view(pages, page, hkv, d),
                   plan.cu, max_q, seqused, max(rows_of), table, scale)
    # a segment without keys: FA3 writes -inf, FA2 +inf; the op's convention is -inf
    lse = lse.t().nan_to_num(nan=float("-inf"), posinf=float("-inf")).contiguous()
    return o, lse


def raw_write_plan(window: Window, query_start_loc: Tensor, seq_lens: Tensor, rows: Tensor,
                   num_tokens: int, num_decodes: int, scratch_row: int):
    """Where each token of a batch goes in the raw pool.

    query_start_loc (B+1,), seq_lens (B,), rows (B,) int: per request its token range, its length
    after this step and its pool row; requests 0..num_decodes-1 are decodes (one token).
    Returns pre_rows, post_rows, slots: (num_tokens,) int64.  A token is copied before attention
    (pre_rows) if it is a decode token or a sink, after attention (post_rows) if it is a prefill
    token of its request's last group, else to the scratch row (overwritten later in the same
    chunk's group, or not exact at all)."""
    n = seq_lens.shape[0]
    qsl = query_start_loc.to(torch.int64)
    seq = seq_lens.to(torch.int64)
    tok = torch.arange(num_tokens, device=seq.device)
    req = torch.searchsorted(qsl[1:], tok, right=True).clamp(max=max(n - 1, 0))
    pos = seq[req] - (qsl[req + 1] - qsl[req]) + (tok - qsl[req])
    row = rows.to(torch.int64)[req]
    in_last_group = pos >= window.ring_start_t(seq - 1)[req]
    is_sink = pos < window.sink_tokens
    is_decode = req < num_decodes
    scratch = torch.full_like(row, scratch_row)
    pre = torch.where(is_decode | is_sink, row, scratch)
    post = torch.where(~is_decode & ~is_sink & in_last_group, row, scratch)
    slots = torch.where(pos >= 0, window.slot_t(pos.clamp(min=0)), 0)
    return pre, post, slots


def write_raw(raw_key: Tensor, raw_value: Tensor, key: Tensor, value: Tensor, rows: Tensor,
              slots: Tensor, slot_mapping: Tensor) -> None:
    """raw_key[rows[i], slots[i]] = key[i] (and values) for the tokens with a paged slot
    slot_mapping[i] >= 0 (padding tokens of a CUDA-graph batch have -1 and are skipped).
    key/value (n, Hkv, D); rows / slots / slot_mapping (n,) int.  Entries aimed at the scratch
    row may collide; no other two may."""
    tq.write_raw(key, value, raw_key, raw_value, rows, slots, slot_mapping)


class SideStream:
    """A CUDA stream beside the current one, for the decode tokens' compressed-cache write.

    Why: that write (one latency-bound launch of two programs: 28.5 us per layer inside vLLM on
    an H200, 9% of a decode step) does not feed the same layer's attention.  A decode query at
    position p reads compressed positions below ring_start(p) <= p only (tq_vllm.window), so
    its token's compressed copy is first read in a later step.  On a side stream the write runs
    beside the prep, split and merge launches instead of before them.

    Use: `with side.fork(device): <launches>` after the key/value are computed, then join()
    after the attention's launches: the current stream then waits for the side work, so nothing
    later reads those pages or reuses the key/value memory before the write is done.  Both
    become graph edges under CUDA-graph capture.  prepare() makes the stream and event; call it
    outside capture (the backend does on its first, profiling, call).  One per layer: its
    state is the fork still to be joined.
    """

    def __init__(self) -> None:
        self._stream: torch.cuda.Stream | None = None
        self._done: torch.cuda.Event | None = None
        self._pending = False

    def prepare(self, device: torch.device) -> None:
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
            self._done = torch.cuda.Event()

    @contextlib.contextmanager
    def fork(self, device: torch.device) -> Iterator[None]:
        if self._pending:
            raise RuntimeError("SideStream.fork: the previous fork was not joined")
        self.prepare(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            yield
        self._done.record(self._stream)
        self._pending = True

    def join(self) -> None:
        if self._pending:
            torch.cuda.current_stream(self._stream.device).wait_event(self._done)
            self._pending = False
