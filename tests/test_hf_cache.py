"""tq_ops.hf_cache: the transformers cache on a tiny random Llama built from a config (no downloads).

Checks that the cache works as `past_key_values` in generate and in a forward loop, equals exact
attention when nothing is compressed, keeps a separate state per layer that follows the flush rule,
and that its attention output is the one of the stored compressed records (recomputed here
independently, in float64, from the records' decoded keys and values).
"""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tq_ops import TQConfig, reference  # noqa: E402
from tq_ops.hf_cache import LayerPlan, TurboQuantCache, TurboQuantLayer, register  # noqa: E402

D = 64
# Tolerance for "the same computation in another fp32 summation order": float32 eps (1.2e-7) times
# a few hundred for sums over D=64 and T<=300 terms through 2-3 layers.  Measured spreads: 4e-7 on
# logits, 3e-7 on attention outputs.
FP32_TOL = 2e-5


def tiny_llama(layers: int = 3, seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=D, max_position_embeddings=1024)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(register())
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_everything_raw_equals_exact_attention(model):
    x = ids(2, 48)
    ref = model(x).logits  # no cache: transformers' SDPA
    cache = TurboQuantCache.for_model(model, "seed", flush_interval=10**6)
    out = model(x, past_key_values=cache).logits
    assert (out - ref).abs().max() < FP32_TOL
    assert all(layer.token_counts() == dict(sink=0, compressed=0, recent=48)
               for layer in cache.layers)


@torch.inference_mode()
def test_generate_everything_raw_matches_dynamic_cache(model):
    x = ids(1, 20)
    mask = torch.ones_like(x)
    ref = model.generate(x, attention_mask=mask, max_new_tokens=12, do_sample=False)
    cache = TurboQuantCache.for_model(model, "k3v3", flush_interval=10**6)
    out = model.generate(x, attention_mask=mask, past_key_values=cache, max_new_tokens=12,
                         do_sample=False)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == 20 + 12 - 1  # the last generated token is never fed back


@pytest.mark.parametrize("name", ["seed", "k3v3", "k4v4"])
@torch.inference_mode()
def test_generate_with_compression(model, name):
    x = ids(2, 40)
    cache = TurboQuantCache.for_model(model, name, sink_tokens=2, flush_interval=16)
    out = model.generate(x, attention_mask=torch.ones_like(x), past_key_values=cache,
                         max_new_tokens=10, do_sample=False)
    assert out.shape == (2, 50)
    counts = cache.layers[0].token_counts()
    # 49 tokens fed: 2 sinks, 47 others; the last update flushed the whole 16-blocks before it.
    assert counts["sink"] == 2 and counts["compressed"] % 16 == 0
    assert counts["compressed"] + counts["recent"] == 47 and counts["recent"] <= 16


def expected_attention(layer: TurboQuantLayer, q: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 softmax over [sinks | decoded compressed | recent] for batch row 0.

    q (Tq, Hq, D).  The keys are the records' prod/MSE reconstructions (reference.decode_keys):
    the estimator is linear in q, so <q, decoded key> is exactly what the op estimates."""
    cfg, codec = layer.config, layer.compressor.codec
    k_dec = reference.decode_keys(layer.comp_key[0], codec.rotation, codec.qjl_projection,
                                  codec.key_centroids, cfg.key_mse_bits, cfg.use_qjl)
    v_dec = reference.decode_values(layer.comp_value[0], codec.rotation, codec.value_centroids,
                                    cfg.value_bits)
    k = torch.cat([layer.sink_key[0].double(), k_dec.double(), layer.recent_key[0].double()])
    v = torch.cat([layer.sink_value[0].double(), v_dec.double(), layer.recent_value[0].double()])
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # (T, Hq, D)
    logits = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    tq, t = q.shape[0], k.shape[0]
    mask = torch.arange(t)[None, :] > (torch.arange(tq) + t - tq)[:, None]
    p = torch.softmax(logits.masked_fill(mask, float("-inf")), -1)
    return torch.einsum("hqk,khd->qhd", p, vv)


@pytest.mark.parametrize("name", ["seed", "k3v3", "k2q1v2"])
@pytest.mark.parametrize("sinks,flush", [(0, 0), (3, 8), (0, 32)])
def test_layer_attention_reads_the_compressed_records(name, sinks, flush):
    cfg = TQConfig(head_dim=D, sink_tokens=sinks, flush_interval=flush).replace(
        **__import__("tq_ops.config", fromlist=["PRESET_FIELDS"]).PRESET_FIELDS[name])
    layer = TurboQuantLayer(cfg, None)
    g = torch.Generator().manual_seed(3)
    scale = 1 / math.sqrt(D)
    seen_compressed = False
    for step, size in enumerate([20, 1, 1, 7, 16, 1, 30, 1]):
        k = torch.randn(1, 2, size, D, generator=g)
        v = torch.randn(1, 2, size, D, generator=g)
        q = torch.randn(1, size, 4, D, generator=g) * 2
        handle, _ = layer.update(k, v)
        assert handle.layer is layer
        out = layer.attend(q, scale)[0]
        want = expected_attention(layer, q[0], scale)
        assert (out.double() - want).abs().max() < FP32_TOL
        seen_compressed |= layer.comp_key.shape[1] > 0
    assert seen_compressed
    n = layer.token_counts()
    assert n["sink"] == sinks and n["sink"] + n["compressed"] + n["recent"] == 77
    if flush == 0:
        assert n["recent"] == 0
    assert layer.comp_key.dtype == torch.uint8 and layer.comp_key.shape[-1] == cfg.layout.key_bytes
    assert layer.comp_value.shape[-1] == cfg.layout.value_bytes


def test_compressed_output_differs_from_exact():
    """The compressed path is really taken: 2+1-bit keys change the output by a quantization-sized
    amount (relative error between 1e-3 and 1), where exact layers give exact attention."""
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(1, 2, 64, D, generator=g), torch.randn(1, 2, 64, D, generator=g)
    q = torch.randn(1, 64, 4, D, generator=g)
    cfg = TQConfig(head_dim=D, flush_interval=0)
    comp, exact = TurboQuantLayer(cfg, None), TurboQuantLayer(cfg, None, exact=True)
    comp.update(k, v)
    exact.update(k, v)
    out_c, out_e = comp.attend(q, D ** -0.5), exact.attend(q, D ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True,
        scale=D ** -0.5).transpose(1, 2)
    assert (out_e - ref).abs().max() < FP32_TOL
    rel = float((out_c - ref).norm() / ref.norm())
    assert 1e-3 < rel < 1


def test_flush_rule_chunk_aligned_equals_token_by_token():
    """Fed in chunks aligned to the flush boundary or one token at a time, a layer ends in the same
    state (bitwise) and every query sees the same keys."""
    cfg = TQConfig(head_dim=D, key_mse_bits=3, key_qjl_bits=0, sink_tokens=4, flush_interval=16)
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(1, 2, 70, D, generator=g), torch.randn(1, 2, 70, D, generator=g)
    q = torch.randn(1, 70, 4, D, generator=g)
    a, b = TurboQuantLayer(cfg, None), TurboQuantLayer(cfg, None)
    outs_a = []
    for t in range(70):
        a.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        outs_a.append(a.attend(q[:, t:t + 1], D ** -0.5))
    outs_b, pos = [], 0
    for size in [20, 16, 16, 16, 2]:
        b.update(k[:, :, pos:pos + size], v[:, :, pos:pos + size])
        outs_b.append(b.attend(q[:, pos:pos + size], D ** -0.5))
        pos += size
    assert torch.equal(a.comp_key, b.comp_key) and torch.equal(a.comp_value, b.comp_value)
    assert torch.equal(a.recent_key, b.recent_key) and torch.equal(a.sink_key, b.sink_key)
    assert (torch.cat(outs_a, 1) - torch.cat(outs_b, 1)).abs().max() < FP32_TOL


@torch.inference_mode()
def test_forward_loop_per_layer_state_and_boundary_layers(model):
    cache = TurboQuantCache.for_model(model, "k4v3", boundary_layers=1, sink_tokens=2,
                                      flush_interval=8)
    x = ids(2, 30)
    model(x[:, :10], past_key_values=cache)
    for t in range(10, 30):
        model(x[:, t:t + 1], past_key_values=cache)
    assert len(cache.layers) == 3 and len({id(l) for l in cache.layers}) == 3
    first, middle, last = cache.layers
    assert first.exact and last.exact and not middle.exact
    for exact in (first, last):
        assert exact.token_counts() == dict(sink=0, compressed=0, recent=30)
    assert middle.token_counts() == dict(sink=2, compressed=24, recent=4)
    assert middle.comp_key.shape == (2, 24, 2, TQConfig(head_dim=D, key_mse_bits=4,
                                                        key_qjl_bits=0).layout.key_bytes)
    assert cache.get_seq_length() == 30
    # bytes: exact layers 30 raw tokens; middle 6 raw + 24 compressed, per row and KV head
    slot = middle.config.slot_bytes
    assert cache.memory_bytes() == 2 * 2 * (2 * 30 * 2 * D * 2 + 6 * 2 * D * 2 + 24 * slot)


@torch.inference_mode()
def test_batch_rows_are_independent(model):
    """Row 1 of a batch gets the same result as the same sequence run alone."""
    x = ids(2, 40, seed=9)
    both = TurboQuantCache.for_model(model, "seed", flush_interval=8)
    alone = TurboQuantCache.for_model(model, "seed", flush_interval=8)
    out_both = model(x, past_key_values=both).logits
    out_alone = model(x[1:], past_key_values=alone).logits
    assert (out_both[1] - out_alone[0]).abs().max() < FP32_TOL


@torch.inference_mode()
def test_padded_batch_is_refused(model):
    x = ids(2, 12)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    cache = TurboQuantCache.for_model(model, "seed")
    with pytest.raises(NotImplementedError, match="padded"):
        model(x, attention_mask=mask, past_key_values=cache)


def test_head_dim_mismatch_is_explained():
    layer = TurboQuantLayer(TQConfig(head_dim=128), None)
    with pytest.raises(ValueError, match="head_dim"):
        layer.update(torch.zeros(1, 2, 3, D), torch.zeros(1, 2, 3, D))


@pytest.mark.gpu
@torch.inference_mode()
def test_cuda_matches_cpu():
    assert torch.cuda.is_available(), "gpu test selected on a machine without CUDA"
    cpu_model = tiny_llama()
    gpu_model = tiny_llama().cuda()
    x = ids(1, 60)
    outs = []
    for m in (cpu_model, gpu_model):
        cache = TurboQuantCache.for_model(m, "seed", sink_tokens=2, flush_interval=16)
        outs.append(m(x.to(m.device), past_key_values=cache).logits.cpu())
        for t in range(5):
            outs[-1] = m(x[:, t:t + 1].to(m.device), past_key_values=cache).logits.cpu()
    # codes can flip at ties between devices; the logits of a random model stay within 1e-3
    assert (outs[0] - outs[1]).abs().max() < 1e-3


# -- per-layer formats (LayerPlan) -------------------------------------------------------------

K4V3 = TQConfig(head_dim=D, key_mse_bits=4, key_qjl_bits=0, value_bits=3, sink_tokens=2,
                flush_interval=8)
K3V3 = K4V3.replace(key_mse_bits=3)


def test_layer_plan_bits_by_hand():
    # D=64: k4v3 = 32 + 2 (norm) key bytes + 24 + 2 value bytes = 60 B per token and head
    # -> 60 * 8 / 128 = 3.75 bits/ch; k3v3 = 24 + 2 + 24 + 2 = 52 B -> 3.25; exact layers 16
    assert (K4V3.slot_bytes, K3V3.slot_bytes) == (60, 52)
    plan = LayerPlan((K4V3, K3V3, K3V3, K4V3), exact={3})
    assert plan.layer_bits() == [3.75, 3.25, 3.25, 16.0]
    assert plan.bits_per_channel() == (3.75 + 3.25 + 3.25 + 16) / 4
    assert plan.layers_with(K4V3) == [0]  # layer 3 is exact, whatever its config
    # another format's slot size (the eval's baselines) replaces the configs' own
    assert plan.bits_per_channel(slot_bytes=64) == (3 * 4.0 + 16) / 4


@pytest.mark.parametrize("budget,exact,upgraded", [
    # 30 layers at 3.25, each upgrade +0.5 bits / 30 layers: floor((budget - 3.25) * 60) upgrades
    (3.25, (), 0), (3.5, (), 15), (3.6, (), 21), (3.74, (), 29), (3.75, (), 30),
    # 2 exact layers: (2 * 16 + 28 * 3.25 + 0.5 n) / 30 <= 4.4  ->  n <= 18
    (4.4, (0, 29), 18)])
def test_layer_plan_greedy_takes_the_order_prefix_that_fits(budget, exact, upgraded):
    order = list(range(29, -1, -1))  # last layer first
    plan = LayerPlan.greedy(K3V3, K4V3, 30, order, budget, exact)
    want = [i for i in order if i not in exact][:upgraded]
    assert sorted(plan.layers_with(K4V3)) == sorted(want)
    assert plan.bits_per_channel() <= budget + 1e-9
    assert plan.exact == frozenset(exact)


def test_layer_plan_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="below the low format"):
        LayerPlan.greedy(K3V3, K4V3, 30, range(30), 3.0)
    with pytest.raises(ValueError, match="more bytes"):
        LayerPlan.greedy(K4V3, K3V3, 30, range(30), 4.0)
    with pytest.raises(ValueError, match="sink_tokens"):
        LayerPlan((K4V3, K3V3.replace(sink_tokens=4)))
    with pytest.raises(ValueError, match="flush_interval"):
        LayerPlan((K4V3, K3V3.replace(flush_interval=16)))
    with pytest.raises(ValueError, match="outside"):
        LayerPlan((K4V3, K3V3), exact={2})
    with pytest.raises(ValueError, match="layers of head_dim"):
        TurboQuantCache.for_model(tiny_llama(), LayerPlan.uniform(K4V3, 2))
    with pytest.raises(ValueError, match="one format for every layer"):
        TurboQuantCache(LayerPlan((K4V3, K3V3)), compressor=lambda device: None)


@torch.inference_mode()
def test_each_layer_gets_its_plan_config(model):
    plan = LayerPlan((K4V3, K3V3, K4V3), exact={2})
    cache = TurboQuantCache.for_model(model, plan)
    x = ids(1, 30)
    for a, b in [(0, 10), (10, 18), (18, 26), (26, 30)]:  # 2 sinks + 8, then flush-sized chunks
        model(x[:, a:b], past_key_values=cache)
    first, middle, last = cache.layers
    assert (first.config, middle.config, last.config) == plan.configs
    assert not first.exact and not middle.exact and last.exact
    # 2 sinks, 28 others: three whole 8-blocks compressed, in each layer's own format, 4 recent
    assert first.comp_key.shape[-1] == K4V3.layout.key_bytes == 34
    assert middle.comp_key.shape[-1] == K3V3.layout.key_bytes == 26
    assert first.comp_key.shape[1] == middle.comp_key.shape[1] == 24
    assert last.token_counts() == dict(sink=0, compressed=0, recent=30)
    assert cache.bits_per_channel() == (3.75 + 3.25 + 16) / 3
    with pytest.raises(IndexError, match="beyond"):
        cache._make_layer(3)


@pytest.mark.parametrize("budget,fmt", [(3.25, "low"), (3.75, "high")])
@torch.inference_mode()
def test_mix_at_one_format_equals_that_format_bit_for_bit(model, budget, fmt):
    """A plan whose budget puts every layer in one format is that format's uniform cache: the same
    records in every layer and the same logits, bit for bit."""
    plan = LayerPlan.greedy(K3V3, K4V3, 3, [2, 0, 1], budget)
    one = K3V3 if fmt == "low" else K4V3
    assert plan.configs == (one,) * 3
    x = ids(1, 40, seed=4)
    mixed = TurboQuantCache.for_model(model, plan)
    uniform = TurboQuantCache.for_model(model, one)
    out_m = model(x, past_key_values=mixed).logits
    out_u = model(x, past_key_values=uniform).logits
    for t in range(40, 45):  # decode a few tokens on both
        nxt = out_m[:, -1:].argmax(-1)
        out_m = model(nxt, past_key_values=mixed).logits
        out_u = model(nxt, past_key_values=uniform).logits
        assert torch.equal(out_m, out_u)
    for a, b in zip(mixed.layers, uniform.layers):
        assert torch.equal(a.comp_key, b.comp_key) and torch.equal(a.comp_value, b.comp_value)
        assert a.comp_key.shape[1] > 0
