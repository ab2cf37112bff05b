"""Bulk writes of a few tiles, per source tree: the write_cache op as it launches (one joint
encode_pair_kernel launch wherever keys and values share an encode_config) against the same
write as two encode_kernel launches (keys, then values, at the configs encode_config gives),
graph-captured (perf/common.gpu_ms), fp16 K/V (and seed-bf16: the seed format in bf16), 8 KV
heads, head_dim 128, pages of 128.  Where keys and values get different configs (the seed
format's split keys), also the op with both at DEFAULT_ENCODE, one joint launch ("joint64";
it patches write_cache.encode_config, which code since session 28's pair_configs no longer
calls: there it times the op again).
`python ab_small_writes.py TREE...` runs each tree in its own process, two rounds in alternating
order, and prints us per call.  Trees: perf/scratch/make_trees.sh."""
import json, os, sys

TOKENS = (17, 64, 256, 1024, 4096)
FORMATS = ("k3v3", "k2q1v2", "seed", "seed-bf16")


def one(tree):
    sys.path[:0] = [tree, os.path.join(tree, "perf")]
    import math
    import torch
    import common as C
    from tq_ops import TQCodec, preset
    from tq_ops.ops.write_cache import launch_encode
    from unittest import mock
    W = sys.modules["tq_ops.ops.write_cache"]  # the package attribute is the op itself
    from tq_ops.triton.encode import DEFAULT_ENCODE, encode_config
    from tq_ops.triton.launch import arch
    assert C.__file__.startswith(tree), C.__file__
    H, D, BS = 8, 128, 128
    out = {}
    for fmt in FORMATS:
        dtype = torch.bfloat16 if fmt.endswith("-bf16") else torch.float16
        cfg = preset(fmt.removesuffix("-bf16"), head_dim=D)
        codec = TQCodec.build(cfg, "cuda")
        lay = cfg.layout
        for tokens in TOKENS:
            gen = torch.Generator(device="cuda").manual_seed(tokens)
            nblocks = math.ceil(tokens / BS) + 1
            cache = torch.empty((nblocks, H, BS * lay.slot_bytes), dtype=torch.uint8,
                                device="cuda")
            slots = torch.randperm(nblocks * BS, generator=gen, device="cuda")[:tokens]
            slots = slots.to(torch.int32)
            k = torch.randn((tokens, H, D), generator=gen, device="cuda", dtype=dtype)
            v = torch.randn((tokens, H, D), generator=gen, device="cuda", dtype=dtype)
            rows = tokens * H
            a = arch(k.device)
            kcfg = encode_config(a, D, cfg.key_mse_bits, rows)
            vcfg = encode_config(a, D, cfg.value_bits, rows)
            koffs = dict(OFF_C=lay.slot_offset("k_codes"), OFF_N=lay.slot_offset("k_norm"))
            if cfg.use_qjl:
                koffs.update(OFF_S=lay.slot_offset("k_signs"), OFF_G=lay.slot_offset("k_gamma"))
            voffs = dict(OFF_C=lay.slot_offset("v_codes"), OFF_N=lay.slot_offset("v_norm"))

            def op():
                torch.ops.turboquant.write_cache(
                    k, v, cache, slots, codec.rotation, codec.qjl_projection,
                    codec.key_centroids, codec.value_centroids, cfg.key_mse_bits, cfg.use_qjl,
                    cfg.value_bits, False)

            def two():
                launch_encode(k, codec.rotation, codec.qjl_projection, codec.key_centroids,
                              cfg.key_mse_bits, cfg.use_qjl, cache, koffs, BS, cache.stride(0),
                              cache.stride(1), slot_mapping=slots, config=kcfg)
                launch_encode(v, codec.rotation, codec.qjl_projection, codec.value_centroids,
                              cfg.value_bits, False, cache, voffs, BS, cache.stride(0),
                              cache.stride(1), slot_mapping=slots, config=vcfg)

            variants = {"op": op, "two": two}
            if kcfg != vcfg:
                def joint64():
                    with mock.patch.object(W, "encode_config", lambda *a, **kw: DEFAULT_ENCODE):
                        op()
                variants["joint64"] = joint64
            # same bytes either way (the cache is poisoned before each)
            res = []
            for fn in variants.values():
                cache.fill_(0xAB)
                fn()
                torch.cuda.synchronize()
                res.append(cache.clone())
            same = all(bool(torch.equal(res[0], x)) for x in res[1:])
            shared = kcfg == vcfg
            for name, fn in variants.items():
                if name == "joint64":
                    with mock.patch.object(W, "encode_config", lambda *a, **kw: DEFAULT_ENCODE):
                        ms = C.gpu_ms(op, rep=100)
                else:
                    ms = C.gpu_ms(fn, rep=100)
                out[f"{fmt} {tokens:5d} tok {name}"] = round(ms * 1e3, 2)
            out[f"{fmt} {tokens:5d} tok same-bytes/shared-cfg"] = f"{same}/{shared}"
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ab_rounds import cli
    cli(one, __file__, width=16)
