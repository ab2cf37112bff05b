"""Encode launches timed apart, per source tree: `python ab_launches.py TREE...` runs each tree
in its own process (rounds alternate the order) and prints us per launch: keys and values, the
split-precision kernel at the op's configs and the EXACT16 one at (64, 4, 2), and the whole
write_cache op with default arguments and with exact16_matrices declared; 32768 tokens x 8
heads, seed format, fp16 (and a few other sizes and formats of the op).  Trees of branches: perf/scratch/make_trees.sh."""
import json, os, sys


def one(tree):
    sys.path[:0] = [tree, os.path.join(tree, "perf")]
    import torch
    import common as C
    from tq_ops import TQCodec, preset, layout
    from tq_ops.ops.write_cache import launch_encode
    from tq_ops.triton.encode import EncodeConfig
    assert C.__file__.startswith(tree), C.__file__
    cfg = preset("seed", head_dim=128)
    codec = TQCodec.build(cfg, "cuda")
    T, H, D, BS = 32768, 8, 128, 128
    lay = layout.SlotLayout(D, cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits)
    gen = torch.Generator(device="cuda").manual_seed(1)
    slots = torch.randperm(T, generator=gen, device="cuda").to(torch.int32)
    x = {"keys": torch.randn((T, H, D), generator=gen, device="cuda", dtype=torch.float16) * 3,
         "values": torch.randn((T, H, D), generator=gen, device="cuda", dtype=torch.float16)}
    offs = {"keys": dict(OFF_C=lay.slot_offset("k_codes"), OFF_N=lay.slot_offset("k_norm"),
                         OFF_S=lay.slot_offset("k_signs"), OFF_G=lay.slot_offset("k_gamma")),
            "values": dict(OFF_C=lay.slot_offset("v_codes"), OFF_N=lay.slot_offset("v_norm"))}
    cache = torch.full((T // BS, H, BS * lay.slot_bytes), 0xAB, dtype=torch.uint8, device="cuda")
    out = {}
    for part, ex, cf in (("keys", False, EncodeConfig(128, 8, 1)), ("keys", True, EncodeConfig(64, 4, 2)),
                         ("values", False, EncodeConfig(64, 4, 2)), ("values", True, EncodeConfig(64, 4, 2))):
        keys = part == "keys"
        cents = codec.key_centroids if keys else codec.value_centroids
        bits = cfg.key_mse_bits if keys else cfg.value_bits

        def run():
            launch_encode(x[part], codec.rotation, codec.qjl_projection, cents, bits, keys, cache,
                          offs[part], BS, cache.stride(0), cache.stride(1), slot_mapping=slots,
                          exact16=ex, config=cf)
        out[f"{part} {'exact16' if ex else 'split'} {cf.rows}/{cf.num_warps}/{cf.programs_per_sm}"] = \
            round(C.gpu_ms(run, rep=200) * 1e3, 1)
    for declared in (False, True):  # the whole op, as gpu_check's encode rows time it
        op, _ = C.encode_case(declared=declared)
        out[f"write_cache op {'declared' if declared else 'default'}"] = \
            round(C.gpu_ms(op, rep=200) * 1e3, 1)
    # smaller writes and a format whose keys and values share a launch config at every size
    for name, kw in (("declared 8192 tok", dict(tokens=8192, declared=True)),
                     ("k3v3 default", dict(fmt="k3v3")),
                     ("k3v3 default 2048 tok", dict(tokens=2048, fmt="k3v3"))):
        op, _ = C.encode_case(**kw)
        out[f"write_cache op {name}"] = round(C.gpu_ms(op, rep=200) * 1e3, 1)
    # bf16 K/V (vLLM's usual dtype), declared
    kb = x["keys"].to(torch.bfloat16); vb = x["values"].to(torch.bfloat16)
    def opb():
        torch.ops.turboquant.write_cache(kb, vb, cache, slots, codec.rotation, codec.qjl_projection,
                                         codec.key_centroids, codec.value_centroids,
                                         cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits, True)
    out["write_cache op declared bf16"] = round(C.gpu_ms(opb, rep=200) * 1e3, 1)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ab_rounds import cli
    cli(one, __file__, width=10)
