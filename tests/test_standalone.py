"""The seed's standalone API: TurboQuantAttentionImpl(num_heads, head_size, scale, num_kv_heads,
tq_config, layer_idx).forward(query, key, value): per-sequence state, prefill then decode, the
flush buffer, sinks, GQA; outputs checked against exact attention (oracle) and against a direct
tq_ops attention over the same records."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle as O
from tolerances import assert_close_verbose, fp32_tol
from tq_ops import TurboQuantAttentionImpl, TurboQuantConfig

tq = torch.ops.turboquant
HQ, HKV, D = 4, 2, 64
SCALE = D ** -0.5


def make(flush=4, sinks=0, b_mse=2, b_qjl=1, value_bits=3):
    cfg = TurboQuantConfig(num_heads=HQ, num_kv_heads=HKV, head_dim=D, flush_interval=flush,
                           sink_tokens=sinks, b_mse=b_mse, b_qjl=b_qjl, value_bits=value_bits,
                           device="cpu")
    return TurboQuantAttentionImpl(HQ, D, SCALE, HKV, cfg, layer_idx=3)


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, HQ, D, generator=g), torch.randn(n, HKV, D, generator=g),
            torch.randn(n, HKV, D, generator=g))


def run_sequence(impl, q, k, v, prefill, sequence_id=0):
    """Prefill the first `prefill` tokens in one call, then decode one token per call."""
    outs = [impl.forward(q[:prefill], k[:prefill], v[:prefill], sequence_id)] if prefill else []
    for t in range(prefill, q.shape[0]):
        outs.append(impl.forward(q[t:t + 1], k[t:t + 1], v[t:t + 1], sequence_id))
    return torch.cat(outs)


def test_sequences_are_isolated():
    """Two sequences interleaved step by step give exactly what each gives alone."""
    a, b = tokens(11, 1), tokens(9, 2)
    alone_a = run_sequence(make(), *a, prefill=5)
    alone_b = run_sequence(make(), *b, prefill=3)
    impl = make()
    out_a = [impl.forward(a[0][:5], a[1][:5], a[2][:5], "A")]
    out_b = [impl.forward(b[0][:3], b[1][:3], b[2][:3], "B")]
    for ta, tb in zip(range(5, 11), range(3, 9)):
        out_b.append(impl.forward(b[0][tb:tb + 1], b[1][tb:tb + 1], b[2][tb:tb + 1], "B"))
        out_a.append(impl.forward(a[0][ta:ta + 1], a[1][ta:ta + 1], a[2][ta:ta + 1], "A"))
    assert torch.equal(torch.cat(out_a), alone_a)
    assert torch.equal(torch.cat(out_b), alone_b)
    assert impl.num_tokens("A") == 11 and impl.num_tokens("B") == 9
    impl.reset("A")
    assert impl.num_tokens("A") == 0 and impl.num_tokens("B") == 9


def test_prefill_compresses_then_decode_flushes_at_interval():
    impl = make(flush=4)
    q, k, v = tokens(14, 3)
    impl.forward(q[:5], k[:5], v[:5])
    st = impl._states[0]
    assert st.key_records.shape[0] == 5 and st.buffer_key.shape[0] == 0
    buffered, compressed = [], []
    for t in range(5, 14):
        impl.forward(q[t:t + 1], k[t:t + 1], v[t:t + 1])
        st = impl._states[0]
        buffered.append(st.buffer_key.shape[0])
        compressed.append(st.key_records.shape[0])
    assert buffered == [1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert compressed == [5, 5, 5, 9, 9, 9, 9, 13, 13]
    # the buffer holds the newest tokens exactly
    assert torch.equal(st.buffer_key, k[13:14]) and torch.equal(st.buffer_value, v[13:14])
    lay = impl.format.layout
    assert impl.memory_bytes() == 13 * HKV * (lay.key_bytes + lay.value_bytes) + 2 * HKV * D * 4


def _direct(q, comp_k, comp_v, sink_k, sink_v, recent_k, recent_v, impl):
    """tq_ops.attention over records encoded directly from the same tokens."""
    c, f = impl.codec, impl.format
    kr = tq.encode_keys(comp_k, c.rotation, c.qjl_projection, c.key_centroids, f.key_mse_bits,
                        f.use_qjl)
    vr = tq.encode_values(comp_v, c.rotation, c.value_centroids, f.value_bits)
    return tq.attention(q, kr, vr, sink_k, sink_v, recent_k, recent_v, c.rotation,
                        c.qjl_projection, c.key_centroids, c.value_centroids, f.key_mse_bits,
                        f.use_qjl, f.value_bits, SCALE, True)


@pytest.mark.parametrize("sinks", (0, 2), ids=("no-sinks", "2-sinks"))
def test_outputs_equal_direct_tq_ops_attention(sinks):
    """Every output equals tq_ops.attention over [sinks exact | compressed | buffer exact],
    the compressed part being the tokens flushed so far; the prefill output is causal attention
    over its own exact chunk (plus nothing compressed yet)."""
    flush, pre, n = 3, 6, 13
    impl = make(flush=flush, sinks=sinks)
    q, k, v = tokens(n, 4)
    out = run_sequence(impl, q, k, v, prefill=pre)
    s = sinks
    # prefill: sinks + the rest of the chunk, all exact
    want = tq.attention(q[:pre], *(torch.zeros(0, HKV, n_, dtype=torch.uint8)
                                   for n_ in (impl.format.layout.key_bytes,
                                              impl.format.layout.value_bytes)),
                        k[:s], v[:s], k[s:pre], v[s:pre], impl.codec.rotation,
                        impl.codec.qjl_projection, impl.codec.key_centroids,
                        impl.codec.value_centroids, impl.format.key_mse_bits,
                        impl.format.use_qjl, impl.format.value_bits, SCALE, True)
    assert torch.equal(out[:pre], want)
    comp_end = pre
    for t in range(pre, n):
        recent = slice(comp_end, t + 1)
        want = _direct(q[t:t + 1], k[s:comp_end], v[s:comp_end], k[:s], v[:s], k[recent],
                       v[recent], impl)
        assert torch.equal(out[t:t + 1], want), f"decode step {t}"
        if t + 1 - comp_end >= flush:
            comp_end = t + 1
    st = impl._states[0]
    assert torch.equal(st.sink_key, k[:s]) and torch.equal(st.sink_value, v[:s])


def test_prefill_output_is_exact_causal_attention():
    impl = make()
    q, k, v = tokens(7, 5)
    out = impl.forward(q, k, v)
    want = O.exact_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), SCALE,
                             True)
    assert_close_verbose(out, want, 4 * fp32_tol(D), 4 * fp32_tol(D), "prefill vs exact")


@pytest.mark.parametrize("sinks", (0, 3), ids=("no-sinks", "3-sinks"))
def test_all_raw_when_flush_interval_is_large_matches_exact_gqa_attention(sinks):
    """Decoding one token at a time with flush_interval larger than the sequence keeps every
    token exact: the output is exact causal GQA attention (query head h reads KV head h // 2),
    to fp32 accuracy."""
    impl = make(flush=1000, sinks=sinks)
    q, k, v = tokens(12, 6)
    out = run_sequence(impl, q, k, v, prefill=0)
    assert impl._states[0].key_records.shape[0] == 0
    for t in range(12):
        want = O.exact_attention(q[t:t + 1].double().numpy(), k[:t + 1].double().numpy(),
                                 v[:t + 1].double().numpy(), SCALE, True)
        assert_close_verbose(out[t:t + 1], want, 4 * fp32_tol(D), 4 * fp32_tol(D), f"step {t}")
    # GQA mapping: head h uses KV head h // 2, not h % 2
    wrong = O.exact_attention(q[-1:].double().numpy(), k.double().numpy()[:, [1, 0]],
                              v.double().numpy()[:, [1, 0]], SCALE, True)
    assert not np.allclose(out[-1:].numpy(), wrong, atol=1e-3)


def test_flattened_heads_and_half_precision():
    impl = make(flush=2)
    q, k, v = (t.half() for t in tokens(5, 8))
    out = impl.forward(q.reshape(5, HQ * D), k.reshape(5, HKV * D), v.reshape(5, HKV * D))
    assert out.shape == (5, HQ * D) and out.dtype == torch.float16
    out = impl.forward(q[:1], k[:1], v[:1])
    assert out.shape == (1, HQ, D) and torch.isfinite(out).all()


def test_boundary_layers_stay_exact():
    """TQ_BOUNDARY_LAYERS / boundary_layers=2 of 6 layers: layers 0, 1, 4, 5 compress nothing
    (prefill then decode past several flush points stays exact causal GQA attention); layers 2
    and 3 compress as usual."""
    cfg = TurboQuantConfig(num_layers=6, num_heads=HQ, num_kv_heads=HKV, head_dim=D,
                           flush_interval=4, boundary_layers=2, device="cpu")
    assert [cfg.is_exact_layer(i) for i in range(6)] == [True, True, False, False, True, True]
    q, k, v = tokens(13, 9)
    for layer in range(6):
        impl = TurboQuantAttentionImpl(HQ, D, SCALE, HKV, cfg, layer_idx=layer)
        out = run_sequence(impl, q, k, v, prefill=5)
        state = impl._states[0]
        if not cfg.is_exact_layer(layer):
            assert state.key_records.shape[0] > 0
            continue
        assert state.key_records.shape[0] == 0 and state.buffer_key.shape[0] == 13
        for t in range(13):
            want = O.exact_attention(q[:t + 1].double().numpy(), k[:t + 1].double().numpy(),
                                     v[:t + 1].double().numpy(), SCALE, True)[-1:]
            assert_close_verbose(out[t:t + 1], want, 4 * fp32_tol(D), 4 * fp32_tol(D),
                                 f"layer {layer} step {t}")


def test_boundary_layers_refuse_an_unknown_layer_index():
    from tq_ops import TQConfigError

    cfg = TurboQuantConfig(num_layers=6, boundary_layers=1, device="cpu")
    with pytest.raises(TQConfigError, match="layer_idx=6 is outside 0..5"):
        cfg.is_exact_layer(6)
    with pytest.raises(TQConfigError, match="boundary_layers=-1 must be >= 0"):
        TurboQuantConfig(boundary_layers=-1, device="cpu")
    # without boundary layers any index is a compressed layer, as before
    assert not TurboQuantConfig(num_layers=6, device="cpu").is_exact_layer(40)
