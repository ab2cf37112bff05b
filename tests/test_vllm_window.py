"""The vLLM backend's bookkeeping without vLLM (runs in the main CPU suite): the exact/compressed
rule of tq_vllm.window, the prefill segments, the raw-pool write plan, the host row table, and a
simulated engine that feeds one sequence through the backend's functions in arbitrary chunks
and must reproduce a dense attention that applies the rule directly to dequantized keys."""
from __future__ import annotations

import itertools

import pytest
import torch

import tq_ops  # noqa: F401
from tq_ops import reference
from tq_ops.codec import TQCodec
from tq_ops.config import TQConfig
from tq_vllm import attend
from tq_vllm.rows import RawRows
from tq_vllm.window import Window, segments

WINDOWS = [Window(16, 0), Window(16, 4), Window(0, 0), Window(1, 3), Window(8, 20)]
WINDOW_IDS = [f"F{w.flush_interval}-S{w.sink_tokens}" for w in WINDOWS]


def exact_positions(w: Window, p: int) -> list[int]:
    """The rule, written out: sinks, and the query's own group up to p."""
    return [j for j in range(p + 1) if j < w.sink_tokens or j >= w.ring_start(p)]


@pytest.mark.parametrize("w", WINDOWS, ids=WINDOW_IDS)
def test_exact_tokens_fill_a_prefix_of_the_row(w):
    for p in range(0, 120):
        exact = exact_positions(w, p)
        assert w.raw_len(p) == len(exact)
        assert sorted(w.slot(j) for j in exact) == list(range(len(exact)))
        assert all(w.slot(j) < w.row_slots for j in exact)
        # the compressed part is exactly [S, ring_start(p))
        comp = [j for j in range(p + 1) if j not in exact]
        assert comp == list(range(w.sink_tokens, w.ring_start(p)))
    p = torch.arange(0, 120)
    assert torch.equal(w.raw_len_t(p), torch.tensor([w.raw_len(int(x)) for x in p]))
    assert torch.equal(w.slot_t(p), torch.tensor([w.slot(int(x)) for x in p]))


@pytest.mark.parametrize("w", WINDOWS, ids=WINDOW_IDS)
@pytest.mark.parametrize("first,end", [(0, 50), (5, 6), (13, 70), (32, 33), (17, 17 + 40)])
def test_segments_share_one_split(w, first, end):
    segs = segments(w, 0, 100, first, end)
    assert segs[0].start == first and segs[-1].end == end
    for a, b in zip(segs, segs[1:]):
        assert a.end == b.start and b.tok_start == a.tok_start + a.end - a.start
    for seg in segs:
        for p in range(seg.start, seg.end):
            exact = exact_positions(w, p)
            assert w.ring_start(p) == seg.prefix_len or (
                seg.prefix_len <= w.sink_tokens and w.ring_start(p) <= w.sink_tokens)
            # pool tokens: the exact ones before the segment; the rest come from the chunk
            assert seg.pool_len == len([j for j in exact if j < seg.start])
            assert all(j in exact for j in range(seg.start, p + 1))


def test_rows_follow_requests_and_refuse_lost_tokens():
    w = Window(16, 0)
    rows = RawRows(2, w)
    assert rows.assign(["a", "b"], {"a", "b"}, [0, 0], [20, 9]) == [0, 1]
    # batch order changes, rows do not
    assert rows.assign(["b", "a"], {"a", "b"}, [9, 20], [10, 21]) == [1, 0]
    # "a" finished: its row is freed and reused
    assert rows.assign(["c", "b"], {"b", "c"}, [0, 10], [5, 11]) == [0, 1]
    # a request that continues mid-group without its tokens is refused with a reason
    with pytest.raises(RuntimeError, match="not in its raw-pool row"):
        rows.assign(["d"], {"b", "c", "d"}, [40], [41])


def test_rows_reclaim_idle_rows_and_detect_it():
    w = Window(16, 0)
    rows = RawRows(1, w)
    rows.assign(["a"], {"a"}, [0], [20])
    # "a" waits (preempted or unscheduled); "b" needs the only row
    assert rows.assign(["b"], {"a", "b"}, [0], [4]) == [0]
    # "a" resuming at a flush point (recompute after preemption) needs nothing from before ...
    assert rows.assign(["a"], {"a", "b"}, [16], [17]) == [0]
    # ... but "b", whose row "a" took back, cannot continue mid-group
    with pytest.raises(RuntimeError, match="request b continues at position 4"):
        rows.assign(["b"], {"a", "b"}, [4], [5])


def _dense_reference(cfg: TQConfig, codec: TQCodec, w: Window, q, k, v, scale):
    """Attention of every position p over keys 0..p: exact keys/values where the rule says so,
    dequantized ones (whose inner products are the op's estimates) elsewhere."""
    kd = reference.decode_keys(reference.encode_keys(k, codec.rotation, codec.qjl_projection,
                                                     codec.key_centroids, cfg.key_mse_bits,
                                                     cfg.use_qjl),
                               codec.rotation, codec.qjl_projection, codec.key_centroids,
                               cfg.key_mse_bits, cfg.use_qjl)
    vd = reference.decode_values(reference.encode_values(v, codec.rotation,
                                                         codec.value_centroids, cfg.value_bits),
                                 codec.rotation, codec.value_centroids, cfg.value_bits)
    t, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty(t, hq, d, dtype=torch.float64)
    for p in range(t):
        exact = torch.zeros(p + 1, dtype=torch.bool)
        exact[exact_positions(w, p)] = True
        kk = torch.where(exact[:, None, None], k[:p + 1], kd[:p + 1]).double()
        vv = torch.where(exact[:, None, None], v[:p + 1], vd[:p + 1]).double()
        kk = kk.repeat_interleave(hq // hkv, dim=1)
        vv = vv.repeat_interleave(hq // hkv, dim=1)
        logits = torch.einsum("hd,khd->hk", q[p].double(), kk) * scale
        out[p] = torch.einsum("hk,khd->hd", torch.softmax(logits, -1), vv)
    return out


SCHEDULES = {"prompt-then-decode": [37] + [1] * 12, "chunks": [10, 23, 1, 1, 30, 1, 2, 1],
             "token-by-token": [1] * 45, "one-shot": [49]}


@pytest.mark.parametrize("w", [Window(16, 0), Window(16, 4), Window(0, 2)],
                         ids=["F16-S0", "F16-S4", "F0-S2"])
@pytest.mark.parametrize("schedule", list(SCHEDULES), ids=list(SCHEDULES))
def test_simulated_engine_matches_the_rule(w, schedule):
    """One sequence through write_cache, raw_write_plan, decode and both prefill paths, chunked
    as the scheduler might; the outputs equal the dense rule whatever the chunking."""
    torch.manual_seed(0)
    cfg = TQConfig(head_dim=64, flush_interval=w.flush_interval, sink_tokens=w.sink_tokens)
    codec = TQCodec.build(cfg)
    hq, hkv, d, bs = 4, 2, 64, 16
    sched = SCHEDULES[schedule]
    t = sum(sched)
    q, k, v = (torch.randn(t, h, d) for h in (hq, hkv, hkv))
    scale = d ** -0.5
    nblk = -(-t // bs)
    cache = torch.zeros(nblk + 3, hkv, bs * cfg.slot_bytes, dtype=torch.uint8)
    table = torch.randperm(nblk + 3)[:nblk].to(torch.int32)  # pages in any order
    rows = 3  # pool rows: 0..2 real (the sequence uses row 1), row 3 scratch
    raw_k = torch.full((rows + 1, w.row_slots, hkv, d), float("nan"))
    raw_v = raw_k.clone()
    out_c = torch.empty(t, hq, d)
    out_v = torch.empty(t, hq, d)
    pos = 0
    for n in sched:
        sl = slice(pos, pos + n)
        slots = table[torch.arange(pos, pos + n) // bs].long() * bs + torch.arange(pos, pos + n) % bs
        torch.ops.turboquant.write_cache(k[sl], v[sl], cache, slots, codec.rotation,
                                         codec.qjl_projection, codec.key_centroids,
                                         codec.value_centroids, cfg.key_mse_bits, cfg.use_qjl,
                                         cfg.value_bits)
        qsl = torch.tensor([0, n])
        seq = torch.tensor([pos + n])
        row = torch.tensor([1])
        decode = n == 1
        pre, post, rslots = attend.raw_write_plan(w, qsl, seq, row, n, int(decode), rows)
        attend.write_raw(raw_k, raw_v, k[sl], v[sl], pre, rslots, slots)
        if decode:
            p = pos
            res = attend.decode(codec, w, q[sl], cache, table[None], w.ring_start_t(torch.tensor(
                [p])).int(), raw_k, raw_v, row.int(), w.raw_len_t(torch.tensor([p])).int(), scale)
            out_c[sl] = res
            out_v[sl] = res
        else:
            segs = segments(w, 0, 0, pos, pos + n)
            attend.prefill_contiguous(codec, w, segs, q[sl], k[sl], v[sl], cache, table[None],
                                      raw_k, raw_v, [1], scale, out_c[sl])
            plan = attend.segment_plan(segs, table[None], row.int(), q.device, w.sink_tokens)
            assert plan.decoded_rows == max(0, max(s.prefix_len for s in segs) - w.sink_tokens)
            attend.prefill_varlen(codec, w, plan, q[sl], k[sl], v[sl], cache, raw_k, raw_v,
                                  scale, out_v[sl])
            attend.write_raw(raw_k, raw_v, k[sl], v[sl], post, rslots, slots)
        pos += n
    want = _dense_reference(cfg, codec, w, q, k, v, scale).float()
    torch.testing.assert_close(out_c, want, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out_v, want, atol=2e-4, rtol=2e-4)


def test_layer_problems_give_reasons():
    from tq_vllm.config import layer_problems

    assert layer_problems(head_size=64) == []
    reasons = layer_problems(head_size=72, use_mla=True, has_sliding_window=True,
                             attn_type="encoder_only", alibi=True, kv_cache_dtype="fp8")
    text = "; ".join(reasons)
    for word in ("MLA", "sliding-window", "encoder_only", "ALiBi", "fp8", "head_size 72"):
        assert word in text
    assert len(reasons) == 6
    assert list(itertools.chain(layer_problems(head_size=128, dtype=torch.float64))) != []


def test_backend_declares_builtin_codebooks_for_its_codecs():
    from tq_ops import TQCodec, preset

    for fmt in ("seed", "k4v4"):
        codec = TQCodec.build(preset(fmt, head_dim=64))
        assert attend.has_builtin_codebooks(codec)
    codec = TQCodec.build(preset("seed", head_dim=64))
    codec.value_centroids.mul_(1.01)
    assert not attend.has_builtin_codebooks(codec)


def test_boundary_layers_from_module_paths(monkeypatch):
    from tq_vllm.config import is_boundary_layer

    monkeypatch.setenv("TQ_BOUNDARY_LAYERS", "2")
    path = "model.layers.{}.self_attn.attn"
    assert [is_boundary_layer(path.format(i), 30) for i in (0, 1, 2, 27, 28, 29)] == \
        [True, True, False, False, True, True]
    with pytest.raises(ValueError, match="cannot tell the layer index"):
        is_boundary_layer("model.blocks.3.layers.1.attn", 30)
    with pytest.raises(ValueError, match="keeps all 4 layers"):
        is_boundary_layer(path.format(0), 4)
    monkeypatch.setenv("TQ_BOUNDARY_LAYERS", "0")
    assert not is_boundary_layer("model.blocks.3.layers.1.attn", 4)
    monkeypatch.setenv("TQ_BOUNDARY_LAYERS", "-1")
    with pytest.raises(ValueError, match="TQ_BOUNDARY_LAYERS='-1' is invalid"):
        is_boundary_layer(path.format(0), 30)


def _two_requests(done: list[int], new: list[int], dtype: torch.dtype):
    """Two requests with `done` positions in the cache and `new` in this step, 16-token flush
    groups and 4 sinks, 4/2 heads of 64, 16-token pages in shuffled order: (window, codec,
    cache, block table, raw pool K and V (3 rows), the step's q, k, v in `dtype`, its
    segments)."""
    w = Window(16, 4)
    cfg = TQConfig(head_dim=64, flush_interval=16, sink_tokens=4)
    codec = TQCodec.build(cfg)
    hq, hkv, d, bs = 4, 2, 64, 16
    nblk = [-(-(a + b) // bs) for a, b in zip(done, new)]
    cache = torch.zeros(sum(nblk) + 2, hkv, bs * cfg.slot_bytes, dtype=torch.uint8)
    perm = torch.randperm(sum(nblk) + 2).to(torch.int32)
    table = torch.zeros(2, max(nblk), dtype=torch.int32)
    table[0, :nblk[0]] = perm[:nblk[0]]
    table[1, :nblk[1]] = perm[nblk[0]:nblk[0] + nblk[1]]
    for b in range(2):
        n = done[b] + new[b]
        pos = torch.arange(n)
        reference.write_cache(torch.randn(n, hkv, d), torch.randn(n, hkv, d), cache,
                              table[b, pos // bs].long() * bs + pos % bs, codec.rotation,
                              codec.qjl_projection, codec.key_centroids, codec.value_centroids,
                              cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits)
    raw_k = torch.randn(3, w.row_slots, hkv, d).to(dtype)
    raw_v = torch.randn(3, w.row_slots, hkv, d).to(dtype)
    t = sum(new)
    q, k, v = (torch.randn(t, h, d).to(dtype) for h in (hq, hkv, hkv))
    segs = (segments(w, 0, 0, done[0], done[0] + new[0])
            + segments(w, 1, new[0], done[1], done[1] + new[1]))
    return w, codec, cache, table, raw_k, raw_v, q, k, v, segs


# budget in rows of the decoded prefix -> the request groups prefill_varlen makes (first
# request, end request, decoded whole), and whether the slab path runs; request 0 has the
# shorter prefix
BUDGETS = {"decoded": (lambda rows: 1 << 20, [(0, 2, True)], False),
           "each-request": (lambda rows: max(rows), [(0, 1, True), (1, 2, True)], False),
           "first-request": (lambda rows: min(rows), [(0, 1, True), (1, 2, False)], True),
           "many-slabs": (lambda rows: 8, [(0, 1, False), (1, 2, False)], True),
           "over-budget": (lambda rows: 0, [(0, 1, False), (1, 2, False)], False)}


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_varlen_plan_of_two_requests(budget, monkeypatch):
    """Two requests' chunks in one batch (several flush groups each): the segment plan gives
    each request one row range of the decoded prefix, and prefill_varlen equals the
    per-segment contiguous path whether it decodes both prefixes in one call, cuts the batch
    into one call per request, attends a request over the budget in decoded slabs (fp32
    partials merged through paged_prefill_prefix's prior), or, with no budget at all, reads
    the prefixes from the pages."""
    torch.manual_seed(1)
    done, new = [40, 70], [35, 20]   # positions computed by earlier steps / in this step
    w, codec, cache, table, raw_k, raw_v, q, k, v, segs = _two_requests(
        done, new, torch.float32)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    t = sum(new)
    plan = attend.segment_plan(segs, table, torch.tensor([2, 0], dtype=torch.int32), q.device,
                               w.sink_tokens)
    longest = [max(s.prefix_len for s in segs if s.req == b) - w.sink_tokens for b in range(2)]
    assert plan.decoded_rows == sum(longest)
    assert plan.req_offsets.tolist() == [0, longest[0]]
    assert plan.decoded_start.tolist() == [0 if s.req == 0 else longest[0] for s in segs]
    assert longest[0] < longest[1]
    rows_for, groups, slabs = BUDGETS[budget]
    budget_rows = rows_for(longest)
    assert attend.request_groups(plan, budget_rows) == groups
    # fp32 queries decode into fp32: 2 x 4 bytes per (row, KV head, coordinate)
    budget_bytes = budget_rows * hkv * d * 8
    monkeypatch.setattr(attend, "DECODED_PREFIX_BUDGET_BYTES", budget_bytes)
    if budget == "many-slabs":  # several query groups, slabs of a few positions
        group, rows = attend.slab_shape(new[0], hq, d, hkv, torch.float32, budget_bytes)
        assert group < 16 and 0 < rows < 8, (group, rows)
    calls = []
    monkeypatch.setattr(attend, "tq", _Recorder(attend.tq, calls))
    out_c, out_v = torch.empty(t, hq, d), torch.empty(t, hq, d)
    attend.prefill_contiguous(codec, w, segs, q, k, v, cache, table, raw_k, raw_v, [2, 0],
                              d ** -0.5, out_c)
    out_v.fill_(float("nan"))
    attend.prefill_varlen(codec, w, plan, q, k, v, cache, raw_k, raw_v, d ** -0.5, out_v)
    torch.testing.assert_close(out_v, out_c, atol=2e-5, rtol=2e-5)
    attention = [dec for name, dec in calls if name == "paged_prefill_attention"]
    prefix = [dec for name, dec in calls if name == "paged_prefill_prefix"]
    if slabs:  # every call over decoded rows, some through the prefix op
        assert prefix and all(prefix) and all(attention), calls
    else:
        assert not prefix and len(attention) == len(groups)
        assert attention == [dec for _, _, dec in groups], calls


@pytest.mark.parametrize("budget", ["decoded", "each-request", "first-request"])
def test_flash_prefix_matches_the_triton_path(budget, monkeypatch):
    """tq_vllm's FlashAttention route for the decoded prefix (here a float64 stand-in with FA's
    arguments, tests/helpers.reference_flash): requests on FLASH_PAGE_ROWS pages, one request
    with no compressed position in its first segment, fp16 queries.  The output equals the
    Triton path's (the same decoded rows, the prefix through the op's own loop) within the
    fp16 rounding of the two outputs and of the flash partial; a page, row or lse slip fails."""
    from helpers import reference_flash

    torch.manual_seed(2)
    done, new = [0, 90], [45, 20]   # request 0 is a fresh prompt: its first group has no prefix
    w, codec, cache, table, raw_k, raw_v, q, k, v, segs = _two_requests(
        done, new, torch.float16)
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    t = sum(new)
    assert segs[0].prefix_len <= w.sink_tokens < max(s.prefix_len for s in segs if s.req == 0)
    raw_index = torch.tensor([2, 0], dtype=torch.int32)
    plan = attend.segment_plan(segs, table, raw_index, q.device, w.sink_tokens,
                               attend.FLASH_PAGE_ROWS)
    assert all(o % attend.FLASH_PAGE_ROWS == 0 for o in plan.req_offsets.tolist())
    # longest prefixes 32 and 96, less 4 sinks: 28 and 92 rows, each rounded up to a page
    assert plan.req_rows == (64, 128) and plan.decoded_rows == 192
    rows = {"decoded": 1 << 20, "each-request": 128, "first-request": 100}[budget]
    monkeypatch.setattr(attend, "DECODED_PREFIX_BUDGET_BYTES", rows * hkv * d * 4)
    used = []

    def flash(*args):
        used.append(args[5].tolist())  # seqused_k
        return reference_flash(*args)

    out_f = torch.full((t, hq, d), float("nan"), dtype=torch.float16)
    attend.prefill_varlen(codec, w, plan, q, k, v, cache, raw_k, raw_v, d ** -0.5, out_f,
                          flash)
    plain = attend.segment_plan(segs, table, raw_index, q.device, w.sink_tokens)
    out_t = torch.full((t, hq, d), float("nan"), dtype=torch.float16)
    attend.prefill_varlen(codec, w, plain, q, k, v, cache, raw_k, raw_v, d ** -0.5, out_t)
    # whole calls use flash; the slabs of a request over the budget do not
    calls = {"decoded": 1, "each-request": 2, "first-request": 1}[budget]
    assert len(used) == calls and used[0][0] == 0, used
    scale = float(out_t.float().abs().max())
    # both outputs rounded to fp16 (half an ulp each, 2^-12 relative: 2^-11 together) and the
    # fp16 partial (another 2^-12 of the largest value), on a float64 / float32 difference
    torch.testing.assert_close(out_f.float(), out_t.float(), rtol=0,
                               atol=(2.0 ** -11 + 2.0 ** -12) * scale + 1e-5)
    with pytest.raises(ValueError, match="row_align a multiple of"):
        attend.prefill_varlen(codec, w, plain, q, k, v, cache, raw_k, raw_v, d ** -0.5, out_t,
                              flash)


class _Recorder:
    """torch.ops.turboquant, recording the names of the ops called through it."""

    DECODED_KEY_AT = {"paged_prefill_attention": 20, "paged_prefill_prefix": 14}

    def __init__(self, ops, calls):
        self._ops, self._calls = ops, calls

    def __getattr__(self, name):
        op = getattr(self._ops, name)

        def call(*args, **kwargs):
            # (name, whether decoded rows were passed as decoded_key)
            at = self.DECODED_KEY_AT.get(name)
            self._calls.append((name, at is not None and len(args) > at
                                and args[at] is not None))
            return op(*args, **kwargs)
        return call


@pytest.mark.parametrize("rows, budget, groups", [
    ([5, 0, 200, 3, 3], 10, [(0, 2, True), (2, 3, False), (3, 5, True)]),
    ([4, 4, 4], 8, [(0, 2, True), (2, 3, True)]),
    ([0, 0], 0, [(0, 2, False)]),
    ([9, 1], 8, [(0, 1, False), (1, 2, True)]),
], ids=["mixed", "pairs", "no-rows", "first-over"])
def test_request_groups_fill_the_budget_in_order(rows, budget, groups):
    from types import SimpleNamespace

    assert attend.request_groups(SimpleNamespace(req_rows=tuple(rows)), budget) == groups
