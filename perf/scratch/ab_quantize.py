"""A/B of the encode quantizer: `python ab_quantize.py` runs rounds of old/new trees in
subprocesses (same card, same call) and prints a table; `python ab_quantize.py one TREE` times
write_cache in TREE (bulk 32768 x 8 and a decode step's 8 x 8) and hashes the bytes it wrote."""
import hashlib, json, os, statistics, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TREES = {"old": os.path.join(HERE, "old"), "new": ROOT}


def one(tree):
    sys.path[:0] = [tree, os.path.join(tree, "perf")]
    import torch
    import common as C
    import gpu_check as G
    from tq_ops import TQCodec, preset
    assert C.__file__.startswith(tree), C.__file__
    out = {}
    for tokens in (C.ENCODE_TOKENS, 8):
        cfg = preset("seed", head_dim=128)
        codec = TQCodec.build(cfg, "cuda")
        gen = torch.Generator(device="cuda").manual_seed(1)
        bs = 128
        nb = -(-tokens // bs)
        cache = torch.full((nb, 8, bs * cfg.slot_bytes), 0xAB, dtype=torch.uint8, device="cuda")
        slots = torch.randperm(nb * bs, generator=gen, device="cuda")[:tokens].to(torch.int32)
        k = torch.randn((tokens, 8, 128), generator=gen, device="cuda", dtype=torch.float16) * 3
        v = torch.randn((tokens, 8, 128), generator=gen, device="cuda", dtype=torch.float16)

        def run():
            torch.ops.turboquant.write_cache(k, v, cache, slots, codec.rotation,
                                             codec.qjl_projection, codec.key_centroids,
                                             codec.value_centroids, cfg.key_mse_bits,
                                             cfg.use_qjl, cfg.value_bits)
        run()
        torch.cuda.synchronize()
        h = hashlib.sha256(cache.cpu().numpy().tobytes()).hexdigest()[:16]
        ms = C.gpu_ms(run, rep=300)
        out[str(tokens)] = dict(ms=ms, tbps=2 * k.numel() * 2 / ms * 1e-9, sha=h,
                                kernels=G.kernel_breakdown(run))
    print("RESULT " + json.dumps(out), flush=True)


def main():
    res = {"old": [], "new": []}
    for rnd in range(3):
        for name in (("old", "new") if rnd % 2 == 0 else ("new", "old")):
            p = subprocess.run([sys.executable, __file__, "one", TREES[name]],
                               capture_output=True, text=True, cwd=TREES[name])
            line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                print(name, "failed", p.stderr[-3000:]); return
            res[name].append(json.loads(line[0][7:]))
    print(json.dumps(res))
    print("tree  bulk ms (3 rounds)        TB/s   8-token us   bytes hash (bulk, small)  kernels us (bulk, last round)")
    for name, rs in res.items():
        b = [r["32768"]["ms"] for r in rs]; s = [r["8"]["ms"] * 1e3 for r in rs]
        print(f"{name:4}  {' '.join(f'{x:.4f}' for x in b)}  {32768*8*128*4/statistics.median(b)*1e-9:.3f}  "
              f"{statistics.median(s):.2f}  {rs[0]['32768']['sha']} {rs[0]['8']['sha']}  {rs[-1]['32768']['kernels']}")
    same = all(r["32768"]["sha"] == res["old"][0]["32768"]["sha"] and r["8"]["sha"] == res["old"][0]["8"]["sha"]
               for rs in res.values() for r in rs)
    print("identical bytes in every run:", same)


if __name__ == "__main__":
    one(sys.argv[2]) if len(sys.argv) > 2 else main()
