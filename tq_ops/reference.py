"""Pure-PyTorch reference of every turboquant op: the CPU body of each op and the GPU tests'
baseline.  Vectorised, static shapes only (so it traces under torch.compile), fp32 arithmetic.
No Triton here.  Shapes use: T tokens, H heads, D head_dim, Hq / Hkv query / KV heads.

Conventions shared with the kernels (tq_ops.layout has the byte layout):
  * norm n = ||x|| in fp32, u = x / n (u = 0 when n = 0), y = Pi u is the rotated unit vector;
  * code = number of midpoints strictly below y (a tie goes to the lower cell);
  * QJL: r = y - c[code], gamma = ||r||, sign bit = (S' r >= 0);
  * key score  <q, k> ~ n * (<Pi q, c[code]> + gamma * sqrt(pi/2)/D * <S' Pi q, z>);
  * values are accumulated in the rotated domain and un-rotated once per query head.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tq_ops import layout as L
from tq_ops.codec import qjl_scale


# -- stages ------------------------------------------------------------------------------------

def rotate(x: Tensor, rotation: Tensor) -> Tensor:
    """(..., D) -> (..., D) fp32, Pi x."""
    return x.to(torch.float32) @ rotation.t()


def unrotate(y: Tensor, rotation: Tensor) -> Tensor:
    """(..., D) -> (..., D) fp32, Pi^T y."""
    return y.to(torch.float32) @ rotation


def _normalize(x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.to(torch.float32)
    norm = torch.linalg.vector_norm(x, dim=-1)
    unit = x / torch.where(norm > 0, norm, torch.ones_like(norm)).unsqueeze(-1)
    return unit, norm


def _quantize_rotated(y: Tensor, centroids: Tensor) -> Tensor:
    mids = (centroids[1:] + centroids[:-1]) / 2
    return (y.unsqueeze(-1) > mids).sum(-1)


def mse_quantize(x: Tensor, rotation: Tensor, centroids: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(..., D) float -> codes (..., D*bits/8) uint8 packed, norms (...,) fp32."""
    unit, norm = _normalize(x)
    codes = _quantize_rotated(rotate(unit, rotation), centroids)
    return L.pack_codes(codes, bits), norm


def mse_dequantize(codes: Tensor, norms: Tensor, rotation: Tensor, centroids: Tensor,
                   bits: int) -> Tensor:
    """codes (..., D*bits/8) uint8, norms (...,) -> (..., D) fp32 reconstruction n Pi^T c[code]."""
    d = rotation.shape[0]
    y = centroids[L.unpack_codes(codes, d, bits)]
    return unrotate(y, rotation) * norms.to(torch.float32).unsqueeze(-1)


def qjl_sketch(residual: Tensor, projection: Tensor) -> tuple[Tensor, Tensor]:
    """(..., D) residual -> signs (..., D/8) uint8 of S' r (bit 1 = +1), gamma (...,) = ||r|| fp32."""
    r = residual.to(torch.float32)
    proj = r @ projection.t()
    return L.pack_signs(proj >= 0), torch.linalg.vector_norm(r, dim=-1)


# -- records -----------------------------------------------------------------------------------

def encode_keys(key: Tensor, rotation: Tensor, projection: Tensor, centroids: Tensor, bits: int,
                qjl: bool) -> Tensor:
    """(..., D) -> (..., key_bytes) uint8 key records (tq_ops.layout)."""
    unit, norm = _normalize(key)
    y = rotate(unit, rotation)
    codes = _quantize_rotated(y, centroids)
    parts = [L.pack_codes(codes, bits)]
    if qjl:
        signs, gamma = qjl_sketch(y - centroids[codes], projection)
        parts.append(signs)
    parts.append(L.scalar_to_bytes(norm))
    if qjl:
        parts.append(L.scalar_to_bytes(gamma))
    return torch.cat(parts, dim=-1)


def encode_values(value: Tensor, rotation: Tensor, centroids: Tensor, bits: int) -> Tensor:
    """(..., D) -> (..., value_bytes) uint8 value records."""
    codes, norm = mse_quantize(value, rotation, centroids, bits)
    return torch.cat([codes, L.scalar_to_bytes(norm)], dim=-1)


def _layout(d: int, key_bits: int, qjl: bool, value_bits: int) -> L.SlotLayout:
    return L.SlotLayout(d, key_bits, qjl, value_bits)


def _field(records: Tensor, lay: L.SlotLayout, name: str) -> Tensor:
    off = lay.record_offset(name)
    return records[..., off:off + lay.size(name)]


def parse_key_records(records: Tensor, d: int, bits: int, qjl: bool):
    """(..., key_bytes) -> codes (..., D) int64, signs (..., D) fp32 +-1 or None, norm, gamma."""
    lay = _layout(d, bits, qjl, 1)
    codes = L.unpack_codes(_field(records, lay, "k_codes"), d, bits)
    norm = L.bytes_to_scalar(_field(records, lay, "k_norm"))
    if not qjl:
        return codes, None, norm, None
    signs = L.unpack_signs(_field(records, lay, "k_signs"), d)
    gamma = L.bytes_to_scalar(_field(records, lay, "k_gamma"))
    return codes, signs, norm, gamma


def parse_value_records(records: Tensor, d: int, bits: int):
    """(..., value_bytes) -> codes (..., D) int64, norm (...,) fp32."""
    lay = _layout(d, 1, False, bits)
    codes = L.unpack_codes(_field(records, lay, "v_codes"), d, bits)
    return codes, L.bytes_to_scalar(_field(records, lay, "v_norm"))


def decode_keys(records: Tensor, rotation: Tensor, projection: Tensor, centroids: Tensor,
                bits: int, qjl: bool) -> Tensor:
    """(..., key_bytes) -> (..., D) fp32, the prod dequantization x_mse + sqrt(pi/2)/D gamma S'^T z
    (un-rotated, times the norm).  For tests and baselines: attention never materialises it."""
    d = rotation.shape[0]
    codes, signs, norm, gamma = parse_key_records(records, d, bits, qjl)
    y = centroids[codes]
    if qjl:
        y = y + qjl_scale(d) * gamma.unsqueeze(-1) * (signs @ projection)
    return unrotate(y, rotation) * norm.unsqueeze(-1)


def decode_values(records: Tensor, rotation: Tensor, centroids: Tensor, bits: int) -> Tensor:
    """(..., value_bytes) -> (..., D) fp32."""
    d = rotation.shape[0]
    codes, norm = parse_value_records(records, d, bits)
    return unrotate(centroids[codes], rotation) * norm.unsqueeze(-1)


# -- scores and attention ----------------------------------------------------------------------

def key_scores(query: Tensor, key_records: Tensor, rotation: Tensor, projection: Tensor,
               centroids: Tensor, bits: int, qjl: bool) -> Tensor:
    """Inner-product estimates <q, k>.

    query (B, Tq, D) float, key_records (B, Tk, key_bytes) uint8 -> (B, Tq, Tk) fp32.
    """
    d = rotation.shape[0]
    codes, signs, norm, gamma = parse_key_records(key_records, d, bits, qjl)
    q_rot = rotate(query, rotation)
    est = q_rot @ centroids[codes].transpose(-1, -2)
    if qjl:
        u = q_rot @ projection.t()
        est = est + qjl_scale(d) * (u @ signs.transpose(-1, -2)) * gamma.unsqueeze(-2)
    return est * norm.unsqueeze(-2)


def _group_queries(query: Tensor, num_kv_heads: int) -> Tensor:
    """(T, Hq, D) -> (Hkv, G, T, D) fp32; query head h reads KV head h // G."""
    t, hq, d = query.shape
    g = hq // num_kv_heads
    return query.to(torch.float32).reshape(t, num_kv_heads, g, d).permute(1, 2, 0, 3)


def _ungroup(out: Tensor) -> Tensor:
    """(Hkv, G, T, D) -> (T, Hkv*G, D)."""
    hkv, g, t, d = out.shape
    return out.permute(2, 0, 1, 3).reshape(t, hkv * g, d)


def _compressed_logits(qg: Tensor, key_records: Tensor, rotation: Tensor, projection: Tensor,
                       centroids: Tensor, bits: int, qjl: bool) -> Tensor:
    """qg (Hkv, G, Tq, D), key_records (Tc, Hkv, kb) -> (Hkv, G, Tq, Tc) fp32 estimates."""
    hkv, g, tq, d = qg.shape
    recs = key_records.permute(1, 0, 2)  # (Hkv, Tc, kb)
    est = key_scores(qg.reshape(hkv, g * tq, d), recs, rotation, projection, centroids, bits, qjl)
    return est.reshape(hkv, g, tq, key_records.shape[0])  # explicit: Tq may be 0


def _compressed_values(p: Tensor, value_records: Tensor, rotation: Tensor, centroids: Tensor,
                       bits: int) -> Tensor:
    """p (Hkv, G, Tq, Tc), value_records (Tc, Hkv, vb) -> (Hkv, G, Tq, D): sum_t p n_t Pi^T c."""
    d = rotation.shape[0]
    codes, norm = parse_value_records(value_records.permute(1, 0, 2), d, bits)  # (Hkv, Tc, ...)
    rotated = centroids[codes] * norm.unsqueeze(-1)  # (Hkv, Tc, D), still in the rotated domain
    return unrotate(torch.einsum("hgqt,htd->hgqd", p, rotated), rotation)


def attention(query: Tensor, key_records: Tensor, value_records: Tensor, sink_key: Tensor,
              sink_value: Tensor, recent_key: Tensor, recent_value: Tensor, rotation: Tensor,
              projection: Tensor, key_centroids: Tensor, value_centroids: Tensor, key_bits: int,
              qjl: bool, value_bits: int, scale: float, causal: bool) -> Tensor:
    """One softmax over sinks (exact), compressed tokens and recent tokens (exact), in that order.

    query (Tq, Hq, D); key_records (Tc, Hkv, kb); value_records (Tc, Hkv, vb); sink_* (S, Hkv, D);
    recent_* (R, Hkv, D).  The sequence is L = S + Tc + R tokens long and the queries are its last
    Tq positions (query i sits at L - Tq + i), so with causal=True query i sees keys 0..L-Tq+i.
    Returns (Tq, Hq, D) in query.dtype.
    """
    hkv = key_records.shape[1]
    qg = _group_queries(query, hkv)
    sk, sv = sink_key.to(torch.float32).permute(1, 0, 2), sink_value.to(torch.float32).permute(1, 0, 2)
    rk, rv = recent_key.to(torch.float32).permute(1, 0, 2), recent_value.to(torch.float32).permute(1, 0, 2)
    logits = torch.cat([
        torch.einsum("hgqd,hkd->hgqk", qg, sk),
        _compressed_logits(qg, key_records, rotation, projection, key_centroids, key_bits, qjl),
        torch.einsum("hgqd,hkd->hgqk", qg, rk),
    ], dim=-1) * scale
    n_s, n_c, n_r = sk.shape[1], key_records.shape[0], rk.shape[1]
    total, tq = n_s + n_c + n_r, query.shape[0]
    if causal:
        q_pos = torch.arange(tq, device=query.device) + (total - tq)
        k_pos = torch.arange(total, device=query.device)
        logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    out = (torch.einsum("hgqk,hkd->hgqd", p[..., :n_s], sv)
           + _compressed_values(p[..., n_s:n_s + n_c], value_records, rotation, value_centroids,
                                value_bits)
           + torch.einsum("hgqk,hkd->hgqd", p[..., n_s + n_c:], rv))
    return _ungroup(out).to(query.dtype)


# -- paged cache -------------------------------------------------------------------------------

def _page_region(cache: Tensor, lay: L.SlotLayout, name: str, block_size: int) -> Tensor:
    """View (NB, Hkv, block_size, size) of one component inside every page of `cache`."""
    nb, hkv, _ = cache.shape
    off, size = block_size * lay.slot_offset(name), lay.size(name)
    return cache[:, :, off:off + block_size * size].view(nb, hkv, block_size, size)


def write_cache(key: Tensor, value: Tensor, cache: Tensor, slot_mapping: Tensor, rotation: Tensor,
                projection: Tensor, key_centroids: Tensor, value_centroids: Tensor, key_bits: int,
                qjl: bool, value_bits: int) -> None:
    """Encode key/value (T, Hkv, D) and store token i at slot slot_mapping[i] of the paged cache
    (NB, Hkv, block_size * slot_bytes) uint8; slot = block * block_size + offset, < 0 is skipped."""
    d = rotation.shape[0]
    lay = _layout(d, key_bits, qjl, value_bits)
    block_size = cache.shape[2] // lay.slot_bytes
    krec = encode_keys(key, rotation, projection, key_centroids, key_bits, qjl)
    vrec = encode_values(value, rotation, value_centroids, value_bits)
    slots = slot_mapping.to(torch.int64)
    valid = slots >= 0
    safe = torch.where(valid, slots, torch.zeros_like(slots))
    blk, off = safe // block_size, safe % block_size
    for name, _size in lay.components:
        rec = krec if name.startswith("k_") else vrec
        new = _field(rec, lay, name)  # (T, Hkv, size)
        region = _page_region(cache, lay, name, block_size)
        old = region[blk, :, off]
        # Padding slots add 0 (mod 256) to whatever is there: a masked write with static shapes.
        delta = torch.where(valid[:, None, None], new.to(torch.int16) - old.to(torch.int16), 0)
        heads = torch.arange(region.shape[1], device=cache.device)
        region.index_put_((blk[:, None], heads[None, :], off[:, None]),
                          (delta % 256).to(torch.uint8), accumulate=True)


def write_raw(key: Tensor, value: Tensor, raw_key: Tensor, raw_value: Tensor, rows: Tensor,
              slots: Tensor, slot_mapping: Tensor) -> None:
    """raw_key[rows[i], slots[i]] = key[i] (and values) for the tokens with slot_mapping[i] >= 0.
    key/value (T, Hkv, D); raw pool (N, R, Hkv, D); rows/slots/slot_mapping (T,) int."""
    keep = (slot_mapping >= 0).nonzero().flatten()
    r, s = rows.to(torch.int64)[keep], slots.to(torch.int64)[keep]
    raw_key.index_put_((r, s), key[keep].to(raw_key.dtype))
    raw_value.index_put_((r, s), value[keep].to(raw_value.dtype))


def gather_pages(cache: Tensor, block_table: Tensor, d: int, key_bits: int, qjl: bool,
                 value_bits: int) -> tuple[Tensor, Tensor]:
    """cache (NB, Hkv, P), block_table (B, MB) -> key records (B, MB*bs, Hkv, kb), value records."""
    lay = _layout(d, key_bits, qjl, value_bits)
    block_size = cache.shape[2] // lay.slot_bytes
    pages = cache[block_table.to(torch.int64)]  # (B, MB, Hkv, P)
    b, mb, hkv, _ = pages.shape
    fields = {}
    for name, size in lay.components:
        off = block_size * lay.slot_offset(name)
        f = pages[..., off:off + block_size * size].reshape(b, mb, hkv, block_size, size)
        fields[name] = f.permute(0, 1, 3, 2, 4).reshape(b, mb * block_size, hkv, size)
    keys = torch.cat([fields[n] for n, _ in lay.components if n.startswith("k_")], dim=-1)
    values = torch.cat([fields[n] for n, _ in lay.components if n.startswith("v_")], dim=-1)
    return keys, values


def paged_decode_attention(query: Tensor, cache: Tensor, block_table: Tensor, kv_lens: Tensor,
                           raw_key: Tensor, raw_value: Tensor, raw_index: Tensor, raw_lens: Tensor,
                           rotation: Tensor,
                           projection: Tensor, key_centroids: Tensor, value_centroids: Tensor,
                           key_bits: int, qjl: bool, value_bits: int, scale: float,
                           kv_start: int) -> Tensor:
    """One query token per sequence over its compressed pages and its exact raw tokens.

    query (B, Hq, D); cache (NB, Hkv, P) uint8; block_table (B, MB) int32; kv_lens (B,) int32: the
    compressed tokens are page positions kv_start..kv_lens[b]-1; raw_key/raw_value (N, R, Hkv, D)
    is a pool of exact tokens, sequence b owning row raw_index[b] of which the first raw_lens[b]
    are valid (sinks and the recent buffer: order does not matter to a single query).
    Returns (B, Hq, D) in query.dtype.
    """
    b, hq, d = query.shape
    hkv = cache.shape[1]
    g = hq // hkv
    keys, values = gather_pages(cache, block_table, d, key_bits, qjl, value_bits)
    n = keys.shape[1]
    qg = query.to(torch.float32).reshape(b, hkv, g, d)
    # compressed part, batched over (B*Hkv)
    krec = keys.permute(0, 2, 1, 3).reshape(b * hkv, n, keys.shape[-1])  # explicit: B may be 0
    est = key_scores(qg.reshape(b * hkv, g, d), krec, rotation, projection, key_centroids,
                     key_bits, qjl).reshape(b, hkv, g, n)
    pos = torch.arange(n, device=query.device)
    comp_ok = (pos[None, :] >= kv_start) & (pos[None, :] < kv_lens.to(torch.int64)[:, None])
    rows = raw_index.to(torch.int64)
    rk = raw_key[rows].to(torch.float32).permute(0, 2, 1, 3)  # (B, Hkv, R, D)
    rv = raw_value[rows].to(torch.float32).permute(0, 2, 1, 3)
    raw_logits = torch.einsum("bhgd,bhrd->bhgr", qg, rk)
    raw_ok = torch.arange(raw_key.shape[1], device=query.device)[None, :] < raw_lens.to(torch.int64)[:, None]
    logits = torch.cat([est.masked_fill(~comp_ok[:, None, None, :], float("-inf")),
                        raw_logits.masked_fill(~raw_ok[:, None, None, :], float("-inf"))], -1) * scale
    p = torch.softmax(logits, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # a sequence with no tokens at all outputs zeros
    codes, norm = parse_value_records(values.permute(0, 2, 1, 3), d, value_bits)  # (B, Hkv, N, .)
    rotated = value_centroids[codes] * norm.unsqueeze(-1)
    # Unwritten page slots and unused raw rows hold arbitrary bytes (NaN/Inf norms): p = 0 there,
    # but 0 * NaN = NaN, so zero the values themselves.
    rotated = torch.where(comp_ok[:, None, :, None], rotated, 0.0)
    rv = torch.where(raw_ok[:, None, :, None], rv, 0.0)
    out = unrotate(torch.einsum("bhgn,bhnd->bhgd", p[..., :n], rotated), rotation)
    out = out + torch.einsum("bhgr,bhrd->bhgd", p[..., n:], rv)
    return out.reshape(b, hq, d).to(query.dtype)


def _rotated_pages(cache: Tensor, block_table: Tensor, rotation: Tensor, projection: Tensor,
                   key_centroids: Tensor, value_centroids: Tensor, key_bits: int, qjl: bool,
                   value_bits: int) -> tuple[Tensor, Tensor]:
    """Every page position of every sequence as rotated-domain vectors: keys k_eff with
    <Pi q, k_eff> equal to the key_scores estimate, values n c[code] (not yet un-rotated).
    Returns two (B, MB*block_size, Hkv, D) fp32 tensors."""
    d = rotation.shape[0]
    keys, values = gather_pages(cache, block_table, d, key_bits, qjl, value_bits)
    codes, signs, norm, gamma = parse_key_records(keys, d, key_bits, qjl)
    k_eff = key_centroids[codes]
    if qjl:
        k_eff = k_eff + qjl_scale(d) * gamma.unsqueeze(-1) * (signs @ projection)
    vcodes, vnorm = parse_value_records(values, d, value_bits)
    return k_eff * norm.unsqueeze(-1), value_centroids[vcodes] * vnorm.unsqueeze(-1)


def paged_dequantize(cache: Tensor, block_table: Tensor, lens: Tensor, offsets: Tensor,
                     num_tokens: int, rotation: Tensor, projection: Tensor,
                     key_centroids: Tensor, value_centroids: Tensor, key_bits: int, qjl: bool,
                     value_bits: int, kv_start: int,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Page positions kv_start .. lens[r]-1 of request r (block_table row r) as original-domain
    keys (decode_keys) and values (decode_values), at rows offsets[r] + position - kv_start of
    two (num_tokens, Hkv, D) tensors in `dtype`; rows no request covers are zero."""
    d = rotation.shape[0]
    hkv = cache.shape[1]
    keys, values = gather_pages(cache, block_table, d, key_bits, qjl, value_bits)
    r, n = keys.shape[0], keys.shape[1]
    k = decode_keys(keys, rotation, projection, key_centroids, key_bits, qjl)
    v = decode_values(values, rotation, value_centroids, value_bits)
    pos = torch.arange(n, device=cache.device)
    ok = (pos[None, :] >= kv_start) & (pos[None, :] < lens.to(torch.int64)[:, None])
    rows = offsets.to(torch.int64)[:, None] + pos[None, :] - kv_start
    # positions outside the range go to a spare last row, dropped below (static shapes)
    rows = torch.where(ok, rows, num_tokens).reshape(r * n)
    out_k = torch.zeros((num_tokens + 1, hkv, d), dtype=torch.float32, device=cache.device)
    out_v = torch.zeros_like(out_k)
    keep = ok[..., None, None]
    out_k = out_k.index_copy(0, rows, torch.where(keep, k, 0.0).reshape(r * n, hkv, d))
    out_v = out_v.index_copy(0, rows, torch.where(keep, v, 0.0).reshape(r * n, hkv, d))
    return out_k[:num_tokens].to(dtype), out_v[:num_tokens].to(dtype)


# Queries per step of the prefill reference: bounds its (tile, Hq, keys of the batch) logits.
_PREFILL_LOGIT_ELEMENTS = 1 << 24


def paged_prefill_attention(query: Tensor, key: Tensor, value: Tensor, cu_seqlens_q: Tensor,
                            cache: Tensor, block_table: Tensor, prefix_lens: Tensor,
                            raw_key: Tensor, raw_value: Tensor, raw_index: Tensor,
                            raw_lens: Tensor, rotation: Tensor, projection: Tensor,
                            key_centroids: Tensor, value_centroids: Tensor, key_bits: int,
                            qjl: bool, value_bits: int, scale: float, kv_start: int,
                            decoded_key: Tensor | None = None,
                            decoded_value: Tensor | None = None,
                            decoded_start: Tensor | None = None,
                            prior_out: Tensor | None = None,
                            prior_lse: Tensor | None = None) -> Tensor:
    """Varlen chunked prefill: each sequence's chunk attends to its compressed prefix, its raw pool
    tokens and, causally, to itself, in one softmax.

    query (T, Hq, D); key/value (T, Hkv, D), the chunk's own exact K/V; cu_seqlens_q (B+1,) int:
    sequence b owns tokens cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1.  cache (NB, Hkv, P) uint8,
    block_table (B, MB) int32, prefix_lens (B,) int32: compressed page positions
    kv_start .. prefix_lens[b]-1 are visible to every query of sequence b.  raw_key/raw_value
    (N, R, Hkv, D): sequence b's row raw_index[b], first raw_lens[b] tokens, visible to every query
    of b (they sit before the chunk).  Chunk token i sees chunk tokens j <= i of its sequence.
    Returns (T, Hq, D) in query.dtype.

    With decoded_key / decoded_value (N, Hkv, D) and decoded_start (B,), compressed position p
    of sequence b is row decoded_start[b] + p - kv_start of them (original domain, as
    paged_dequantize writes it) instead of the decoded page.

    With prior_out (T, Hq, D) (fp32, fp16 or bf16) and prior_lse (T, Hq) fp32, a softmax partial
    of each query over other keys (paged_prefill_prefix's output), the result is the softmax
    over both key sets: the prior enters as one more key of logit prior_lse and value prior_out
    (ignored where prior_lse is -inf).

    Every query is scored against every sequence's keys and masked to its own, with the queries
    taken in static tiles: static shapes (it traces) at the price of B-fold work.
    """
    out, _ = _prefill(query, key, value, cu_seqlens_q, cache, block_table, prefix_lens, raw_key,
                      raw_value, raw_index, raw_lens, rotation, projection, key_centroids,
                      value_centroids, key_bits, qjl, value_bits, scale, kv_start, decoded_key,
                      decoded_value, decoded_start, prior_out, prior_lse, prefix_only=False)
    return out.to(query.dtype)


def paged_prefill_prefix(query: Tensor, cu_seqlens_q: Tensor, cache: Tensor, block_table: Tensor,
                         prefix_lens: Tensor, rotation: Tensor, projection: Tensor,
                         key_centroids: Tensor, value_centroids: Tensor, key_bits: int,
                         qjl: bool, value_bits: int, scale: float, kv_start: int,
                         decoded_key: Tensor | None = None, decoded_value: Tensor | None = None,
                         decoded_start: Tensor | None = None, prior_out: Tensor | None = None,
                         prior_lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The compressed-prefix part of paged_prefill_attention alone, as a softmax partial: each
    query of sequence b over compressed positions kv_start .. prefix_lens[b]-1 (from the pages,
    or from the decoded rows), merged with the prior if given.  Returns (out (T, Hq, D) fp32,
    the softmax-weighted values; lse (T, Hq) fp32, log-sum-exp of scale * q . k over those keys);
    a query with no key has out 0 and lse -inf."""
    t, hq, d = query.shape
    hkv = cache.shape[1]
    none = torch.zeros((t, hkv, d), dtype=query.dtype, device=query.device)
    no_raw = torch.zeros((1, 1, hkv, d), dtype=query.dtype, device=query.device)
    zeros = torch.zeros_like(prefix_lens)
    return _prefill(query, none, none, cu_seqlens_q, cache, block_table, prefix_lens, no_raw,
                    no_raw, zeros, zeros, rotation, projection, key_centroids, value_centroids,
                    key_bits, qjl, value_bits, scale, kv_start, decoded_key, decoded_value,
                    decoded_start, prior_out, prior_lse, prefix_only=True)


def _prefill(query, key, value, cu_seqlens_q, cache, block_table, prefix_lens, raw_key, raw_value,
             raw_index, raw_lens, rotation, projection, key_centroids, value_centroids, key_bits,
             qjl, value_bits, scale, kv_start, decoded_key, decoded_value, decoded_start,
             prior_out, prior_lse, prefix_only: bool) -> tuple[Tensor, Tensor]:
    """paged_prefill_attention (prefix_only: paged_prefill_prefix): (out fp32, lse fp32)."""
    t, hq, d = query.shape
    hkv = cache.shape[1]
    g = hq // hkv
    dev = query.device
    if decoded_key is None:
        k_rot, v_rot = _rotated_pages(cache, block_table, rotation, projection, key_centroids,
                                      value_centroids, key_bits, qjl, value_bits)
        b, n = k_rot.shape[0], k_rot.shape[1]
    else:
        b = block_table.shape[0]
        n = block_table.shape[1] * (cache.shape[2] // _layout(d, key_bits, qjl,
                                                               value_bits).slot_bytes)
        pos = torch.arange(n, device=dev)
        ok = (pos[None, :] >= kv_start) & (pos[None, :] < prefix_lens.to(torch.int64)[:, None])
        # positions outside the prefix read an appended zero row (masked below in any case)
        nd = decoded_key.shape[0]
        idx = torch.where(ok, decoded_start.to(torch.int64)[:, None] + pos[None, :] - kv_start,
                          nd)
        pad = torch.zeros((1, hkv, d), dtype=torch.float32, device=dev)
        k_rot = torch.cat([decoded_key.to(torch.float32), pad])[idx]
        v_rot = torch.cat([decoded_value.to(torch.float32), pad])[idx]
    k_rot, v_rot = k_rot.reshape(b * n, hkv, d), v_rot.reshape(b * n, hkv, d)
    rows = raw_index.to(torch.int64)
    r = raw_key.shape[1]
    rk = raw_key[rows].to(torch.float32).reshape(b * r, hkv, d)
    rv = raw_value[rows].to(torch.float32).reshape(b * r, hkv, d)
    kk, vv = key.to(torch.float32), value.to(torch.float32)

    cu = cu_seqlens_q.to(torch.int64)
    tok = torch.arange(t, device=dev)
    seq = torch.searchsorted(cu[1:], tok, right=True)  # (T,) sequence of each chunk token
    comp_seq = torch.arange(b, device=dev).repeat_interleave(n)
    comp_pos = torch.arange(n, device=dev).repeat(b)
    comp_ok_key = (comp_pos >= kv_start) & (comp_pos < prefix_lens.to(torch.int64)[comp_seq])
    raw_seq = torch.arange(b, device=dev).repeat_interleave(r)
    raw_ok_key = torch.arange(r, device=dev).repeat(b) < raw_lens.to(torch.int64)[raw_seq]

    # Unwritten page slots and unused raw rows hold arbitrary bytes (NaN/Inf): p = 0 there, but
    # 0 * NaN = NaN, so zero the values themselves.
    v_rot = torch.where(comp_ok_key[:, None, None], v_rot, 0.0)
    rv = torch.where(raw_ok_key[:, None, None], rv, 0.0)
    q32 = query.to(torch.float32).reshape(t, hkv, g, d)
    # the decoded prefix is in the original domain: nothing to rotate
    q_rot = rotate(q32, rotation) if decoded_key is None else q32
    tile = max(1, _PREFILL_LOGIT_ELEMENTS // max(1, hq * (b * n + b * r + t)))
    outs, lses = [], []
    for t0 in range(0, t, tile):
        sl = slice(t0, min(t, t0 + tile))
        s_q = seq[sl]
        lc = torch.einsum("thgd,khd->thgk", q_rot[sl], k_rot)
        ok_c = (comp_seq[None, :] == s_q[:, None]) & comp_ok_key[None, :]
        parts = [lc.masked_fill(~ok_c[:, None, None, :], float("-inf"))]
        if not prefix_only:
            lr = torch.einsum("thgd,khd->thgk", q32[sl], rk)
            lk = torch.einsum("thgd,khd->thgk", q32[sl], kk)
            ok_r = (raw_seq[None, :] == s_q[:, None]) & raw_ok_key[None, :]
            ok_k = (seq[None, :] == s_q[:, None]) & (tok[None, :] <= tok[sl][:, None])
            parts += [lr.masked_fill(~ok_r[:, None, None, :], float("-inf")),
                      lk.masked_fill(~ok_k[:, None, None, :], float("-inf"))]
        logits = torch.cat(parts, -1) * scale
        if prior_lse is not None:
            # the prior as one more key: logit prior_lse, value prior_out
            logits = torch.cat([logits, prior_lse[sl].to(torch.float32).reshape(-1, hkv, g, 1)],
                               -1)
        lse = torch.logsumexp(logits, -1)
        seen = torch.isfinite(lse)
        p = torch.where(seen[..., None], torch.exp(logits - torch.where(seen, lse, 0.0)[..., None]),
                        0.0)
        o = torch.einsum("thgk,khd->thgd", p[..., :b * n], v_rot)
        if decoded_key is None:
            o = unrotate(o, rotation)
        if not prefix_only:
            o = o + torch.einsum("thgk,khd->thgd", p[..., b * n:b * n + b * r], rv)
            o = o + torch.einsum("thgk,khd->thgd", p[..., b * n + b * r:b * n + b * r + t], vv)
        if prior_out is not None:
            # a row without a prior (lse -inf, weight 0) ignores its prior_out, NaN included
            w = p[..., -1:]
            o = o + torch.where(w > 0, w * prior_out[sl].to(torch.float32).reshape(-1, hkv, g, d),
                                0.0)
        outs.append(o.reshape(-1, hq, d))
        lses.append(lse.reshape(-1, hq))
    if not outs:
        return query.new_empty((0, hq, d), dtype=torch.float32), query.new_empty(
            (0, hq), dtype=torch.float32)
    return torch.cat(outs, 0), torch.cat(lses, 0)


def scale_default(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
