"""Registration of every torch.ops.turboquant op: golden schema strings (any schema change is a
reviewed diff) and torch.library.opcheck (schema / autograd registration / fake tensor /
aot_dispatch_dynamic) on CPU samples.  Numerical correctness is the oracle tests' job."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from op_samples import samples
from tq_ops.ops import __all__ as OPS

tq = torch.ops.turboquant

GOLDEN_SCHEMAS = {
    "attention": "turboquant::attention(Tensor query, Tensor key_records, Tensor value_records, "
                 "Tensor sink_key, Tensor sink_value, Tensor recent_key, Tensor recent_value, "
                 "Tensor rotation, Tensor projection, Tensor key_centroids, "
                 "Tensor value_centroids, SymInt key_bits, bool qjl, SymInt value_bits, "
                 "float scale, bool causal) -> Tensor",
    "encode_keys": "turboquant::encode_keys(Tensor key, Tensor rotation, Tensor projection, "
                   "Tensor centroids, SymInt bits, bool qjl) -> Tensor",
    "encode_values": "turboquant::encode_values(Tensor value, Tensor rotation, Tensor centroids, "
                     "SymInt bits) -> Tensor",
    "key_scores": "turboquant::key_scores(Tensor query, Tensor key_records, Tensor rotation, "
                  "Tensor projection, Tensor centroids, SymInt bits, bool qjl) -> Tensor",
    "mse_dequantize": "turboquant::mse_dequantize(Tensor codes, Tensor norms, Tensor rotation, "
                      "Tensor centroids, SymInt bits) -> Tensor",
    "mse_quantize": "turboquant::mse_quantize(Tensor x, Tensor rotation, Tensor centroids, "
                    "SymInt bits) -> (Tensor, Tensor)",
    "paged_decode_attention": "turboquant::paged_decode_attention(Tensor query, Tensor cache, "
                              "Tensor block_table, Tensor kv_lens, Tensor raw_key, "
                              "Tensor raw_value, Tensor raw_index, Tensor raw_lens, "
                              "Tensor rotation, Tensor projection, Tensor key_centroids, "
                              "Tensor value_centroids, SymInt key_bits, bool qjl, "
                              "SymInt value_bits, float scale, SymInt kv_start, "
                              "bool builtin_codebooks=False) -> Tensor",
    "paged_prefill_attention": "turboquant::paged_prefill_attention(Tensor query, Tensor key, "
                               "Tensor value, Tensor cu_seqlens_q, Tensor cache, "
                               "Tensor block_table, Tensor prefix_lens, Tensor raw_key, "
                               "Tensor raw_value, Tensor raw_index, Tensor raw_lens, "
                               "Tensor rotation, Tensor projection, Tensor key_centroids, "
                               "Tensor value_centroids, SymInt key_bits, bool qjl, "
                               "SymInt value_bits, float scale, SymInt kv_start, "
                               "Tensor? decoded_key=None, Tensor? decoded_value=None, "
                               "Tensor? decoded_start=None, Tensor? prior_out=None, "
                               "Tensor? prior_lse=None) -> Tensor",
    "paged_prefill_prefix": "turboquant::paged_prefill_prefix(Tensor query, Tensor cu_seqlens_q, "
                            "Tensor cache, Tensor block_table, Tensor prefix_lens, "
                            "Tensor rotation, Tensor projection, Tensor key_centroids, "
                            "Tensor value_centroids, SymInt key_bits, bool qjl, "
                            "SymInt value_bits, float scale, SymInt kv_start, "
                            "Tensor? decoded_key=None, Tensor? decoded_value=None, "
                            "Tensor? decoded_start=None, Tensor? prior_out=None, "
                            "Tensor? prior_lse=None) -> (Tensor, Tensor)",
    "paged_dequantize": "turboquant::paged_dequantize(Tensor cache, Tensor block_table, "
                        "Tensor lens, Tensor offsets, SymInt num_tokens, Tensor rotation, "
                        "Tensor projection, Tensor key_centroids, Tensor value_centroids, "
                        "SymInt key_bits, bool qjl, SymInt value_bits, SymInt kv_start, "
                        "ScalarType dtype) -> (Tensor, Tensor)",
    "qjl_sketch": "turboquant::qjl_sketch(Tensor residual, Tensor projection) -> (Tensor, Tensor)",
    "rotate": "turboquant::rotate(Tensor x, Tensor rotation) -> Tensor",
    "unrotate": "turboquant::unrotate(Tensor y, Tensor rotation) -> Tensor",
    "write_cache": "turboquant::write_cache(Tensor key, Tensor value, Tensor(a2!) cache, "
                   "Tensor slot_mapping, Tensor rotation, Tensor projection, "
                   "Tensor key_centroids, Tensor value_centroids, SymInt key_bits, bool qjl, "
                   "SymInt value_bits, bool exact16_matrices=False) -> ()",
    "write_raw": "turboquant::write_raw(Tensor key, Tensor value, Tensor(a2!) raw_key, "
                 "Tensor(a3!) raw_value, Tensor rows, Tensor slots, Tensor slot_mapping) -> ()",
}


def test_every_op_has_a_golden_schema():
    assert sorted(OPS) == sorted(GOLDEN_SCHEMAS), "ops and golden schemas differ: add/remove one"


@pytest.mark.parametrize("op", sorted(GOLDEN_SCHEMAS))
def test_golden_schema(op):
    assert str(getattr(tq, op).default._schema) == GOLDEN_SCHEMAS[op]


OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("op", sorted(OPS))
def test_opcheck_cpu(op):
    for i, args in enumerate(samples(op)):
        result = torch.library.opcheck(getattr(tq, op).default, args, test_utils=OPCHECK_TESTS,
                                       raise_exception=False)
        assert set(result) == set(OPCHECK_TESTS)
        bad = {k: v for k, v in result.items() if v != "SUCCESS"}
        assert not bad, f"{op} sample {i}: {bad}"


def test_samples_cover_all_ops_and_mutation_is_visible():
    """Sanity of the samples: write_cache really changes the cache (opcheck's test_schema only
    catches undeclared mutation), so the declared mutation is exercised."""
    args = samples("write_cache")[0]
    cache = torch.zeros_like(args[2])
    tq.write_cache(*args[:2], cache, *args[3:])
    assert not np.array_equal(cache.numpy(), np.zeros_like(cache.numpy()))
