"""torch.compile(fullgraph=True) of encode + cache write + attention on CPU (style.md A11): one
graph and no breaks, the turboquant ops visible at the Dynamo level, results equal to eager, no
recompiles across batch sizes with dynamic=True."""
from __future__ import annotations

import pytest
import torch

from helpers import codec
from tq_ops import TQConfig

tq = torch.ops.turboquant
D, HQ, HKV, BS = 64, 4, 2, 4
FMT = dict(key_bits=2, qjl=True, value_bits=3)


def decode_step(q, k_new, v_new, cache, slots, table, kv_lens, raw_k, raw_v, raw_index, raw_lens,
                rot, proj, kc, vc):
    """A vLLM-style decode step: write the new tokens into the paged cache, then attend."""
    tq.write_cache(k_new, v_new, cache, slots, rot, proj, kc, vc, 2, True, 3)
    return tq.paged_decode_attention(q, cache, table, kv_lens, raw_k, raw_v, raw_index, raw_lens,
                                     rot, proj, kc, vc, 2, True, 3, D ** -0.5, 0)


def contiguous_step(q, k, v, sink_k, sink_v, recent_k, recent_v, rot, proj, kc, vc):
    """Encode a block of tokens and attend over sinks + those compressed tokens + recent ones."""
    kr = tq.encode_keys(k, rot, proj, kc, 2, True)
    vr = tq.encode_values(v, rot, vc, 3)
    return tq.attention(q, kr, vr, sink_k, sink_v, recent_k, recent_v, rot, proj, kc, vc, 2, True,
                        3, D ** -0.5, True)


def decode_inputs(b: int, seed: int = 0):
    """b sequences with 3 tokens already in their own page and one new token each."""
    c = codec(D, FMT["key_bits"], FMT["qjl"], FMT["value_bits"])
    g = torch.Generator().manual_seed(seed)
    sb = TQConfig(head_dim=D, key_mse_bits=2, key_qjl_bits=1, value_bits=3).slot_bytes
    cache = torch.zeros(b + 1, HKV, BS * sb, dtype=torch.uint8)
    table = (torch.arange(b, dtype=torch.int32) + 1)[:, None]
    old = torch.randn(3 * b, HKV, D, generator=g)
    old_slots = torch.cat([table[i, 0] * BS + torch.arange(3, dtype=torch.int32) for i in range(b)])
    tq.write_cache(old, old, cache, old_slots, c.rotation, c.qjl_projection, c.key_centroids,
                   c.value_centroids, 2, True, 3)
    slots = (table[:, 0] * BS + 3).to(torch.int32)
    return (torch.randn(b, HQ, D, generator=g), torch.randn(b, HKV, D, generator=g),
            torch.randn(b, HKV, D, generator=g), cache, slots, table,
            torch.full((b,), 4, dtype=torch.int32), torch.randn(b, 2, HKV, D, generator=g),
            torch.randn(b, 2, HKV, D, generator=g), torch.arange(b, dtype=torch.int32),
            torch.ones(b, dtype=torch.int32), c.rotation, c.qjl_projection, c.key_centroids,
            c.value_centroids)


def contiguous_inputs(seed: int = 0):
    c = codec(D, FMT["key_bits"], FMT["qjl"], FMT["value_bits"])
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (r(3, HQ, D), r(6, HKV, D), r(6, HKV, D), r(1, HKV, D), r(1, HKV, D), r(2, HKV, D),
            r(2, HKV, D), c.rotation, c.qjl_projection, c.key_centroids, c.value_centroids)


CASES = {"paged decode": (decode_step, lambda: decode_inputs(3)),
         "contiguous": (contiguous_step, contiguous_inputs)}


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("case", list(CASES))
def test_one_graph_no_breaks(case):
    fn, make = CASES[case]
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*make())
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons


@pytest.mark.parametrize("case", list(CASES))
def test_turboquant_ops_in_dynamo_graph(case):
    fn, make = CASES[case]
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*make())
    want = {"paged decode": ["write_cache", "paged_decode_attention"],
            "contiguous": ["encode_keys", "encode_values", "attention"]}[case]
    # Dynamo records the OpOverloadPacket ("turboquant.attention") or the overload
    # ("turboquant.attention.default") depending on the torch version.
    got = [t.removesuffix(".default").removeprefix("turboquant.") for t in seen
           if t.startswith("turboquant.")]
    assert got == want, seen


@pytest.mark.parametrize("backend", ("eager", "aot_eager", "inductor"))
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_equals_eager(case, backend):
    """eager / aot_eager run the same kernels: bitwise equal.  Inductor generates its own C++
    for the reference's torch code (triton_op bodies are traced), so fp32 sums may be reordered:
    outputs within fp32 tolerance, cache bytes equal (no code sits within ~1e-7 of a midpoint in
    these inputs; a flip there would be an allowed tie, see tests/tolerances.py)."""
    fn, make = CASES[case]
    args_eager, args_comp = make(), make()
    want = fn(*args_eager)
    torch._dynamo.reset()
    got = torch.compile(fn, backend=backend, fullgraph=True)(*args_comp)
    if backend == "inductor":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)
    for a, b in zip(args_eager, args_comp):  # the mutated cache included
        if isinstance(a, torch.Tensor) and a.dtype == torch.uint8:
            assert torch.equal(a, b), "cache bytes differ between compiled and eager"


def test_no_recompile_across_batch_sizes():
    """The first batch size avoids every static size of the inputs (head dim 64, codebooks of 4
    and 8, 2 KV heads, 4 query heads): with duck sizing a batch of 8 would share the 3-bit value
    codebook's symbol and be specialised to 8 by its shape check."""
    torch._dynamo.reset()
    f = torch.compile(decode_step, backend="eager", fullgraph=True, dynamic=True)
    f(*decode_inputs(5))
    with torch.compiler.set_stance("fail_on_recompile"):
        for b in (3, 7, 33):
            out = f(*decode_inputs(b, seed=b))
            assert out.shape == (b, HQ, D)
