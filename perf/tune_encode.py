"""Launch-config exploration for the encode + cache-write kernel (GPU, one call).

    PYTHONPATH=. python perf/tune_encode.py

Times `turboquant::write_cache` of 32768 tokens x 8 KV heads of fp16 K and V (seed format,
shuffled slots: perf/common.py's encode case), and of 8 tokens (a decode step's write at batch
8: latency), with each candidate `EncodeConfig` for the key
launch (2-bit MSE + QJL) and the value launch (3-bit), checks that every candidate writes the
same cache bytes as the first (cache poisoned before each), and prints TB/s of fp16 input.
Not a benchmark of record (perf/gpu_check.py is); the table in tq_ops/triton/encode.py is
edited by hand from its output.
"""
from __future__ import annotations

import math
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common as C  # noqa: E402
from tq_ops import TQCodec, preset  # noqa: E402
from tq_ops.triton import encode as E  # noqa: E402

# (key config, value config): rows per tile, warps, persistent programs per SM
CANDIDATES = [
    (E.EncodeConfig(64, 4, 2), E.EncodeConfig(64, 4, 2)),
    (E.EncodeConfig(64, 4, 1), E.EncodeConfig(64, 4, 2)),
    (E.EncodeConfig(64, 8, 1), E.EncodeConfig(64, 8, 1)),
    (E.EncodeConfig(128, 8, 1), E.EncodeConfig(64, 4, 2)),
    (E.EncodeConfig(128, 8, 1), E.EncodeConfig(128, 8, 1)),
]
# a decode step's write: one token per sequence of a batch of 8 (latency, not throughput)
SMALL_TOKENS = 8


def main() -> int:
    print(f"device: {torch.cuda.get_device_name(0)}")
    cfg = preset("seed", head_dim=C.HEAD_DIM)
    codec = TQCodec.build(cfg, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens, bs = C.ENCODE_TOKENS, C.BLOCK_SIZE
    nblocks = math.ceil(tokens / bs)
    cache = torch.empty((nblocks, C.HKV, bs * cfg.slot_bytes), dtype=torch.uint8, device="cuda")
    slots = torch.randperm(nblocks * bs, generator=gen, device="cuda")[:tokens].to(torch.int32)
    k = torch.randn((tokens, C.HKV, C.HEAD_DIM), generator=gen, device="cuda",
                    dtype=torch.float16)
    v = torch.randn((tokens, C.HKV, C.HEAD_DIM), generator=gen, device="cuda",
                    dtype=torch.float16)
    nbytes = 2 * k.numel() * k.element_size()

    def run(n=tokens):
        torch.ops.turboquant.write_cache(k[:n], v[:n], cache, slots[:n], codec.rotation,
                                         codec.qjl_projection, codec.key_centroids,
                                         codec.value_centroids, cfg.key_mse_bits, cfg.use_qjl,
                                         cfg.value_bits)

    first = None
    for kc, vc in CANDIDATES:
        configs = {**E.ENCODE_CONFIGS, ("sm90", C.HEAD_DIM, 2): kc, ("sm90", C.HEAD_DIM, 3): vc}
        # LATENCY_ROWS 0: the small write takes the candidate too (not DEFAULT_ENCODE)
        with mock.patch.dict(E.ENCODE_CONFIGS, configs, clear=True), \
                mock.patch.object(E, "LATENCY_ROWS", 0):
            cache.fill_(0xA5)
            run()
            torch.cuda.synchronize()
            same = ("" if first is None
                    else f", same bytes as the first: {torch.equal(cache, first)}")
            if first is None:
                first = cache.clone()
            ms = C.gpu_ms(run, rep=100)
            small_ms = C.gpu_ms(lambda: run(SMALL_TOKENS), rep=100)
        print(f"keys {kc} values {vc}: {ms:.4f} ms, {nbytes / ms * 1e-9:.3f} TB/s{same}; "
              f"{SMALL_TOKENS} tokens {small_ms * 1e3:.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
