"""Triton bodies of the turboquant ops, one module per kernel family.

    unpack   shared @triton.jit helpers: page addressing, bit-plane loads, code unpacking
    encode   norm + rotate + quantize + pack (+ QJL sketch), into records or the paged cache
    decode   paged decode attention: query prep, split-K kernel, log-sum-exp merge
    prefill  paged chunked-prefill attention (flash-style, varlen)
    codec    rotate / unrotate, QJL sketch, MSE dequantize, key scores
    raw_pool copies of exact tokens into the raw pool beside the paged cache
    launch   the fixed launch-config tables and the device facts they are keyed by

Kernels never use @triton.autotune (CUDA-graph capture): every launch config comes from a table
keyed by (arch, head_dim, bits) in the family's module.
"""
