"""A/B of the encode quantizer (default and exact16_matrices-declared bulk writes): `python ab_quantize.py` runs rounds of old/new trees in
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
    for tokens, declared in ((C.ENCODE_TOKENS, False), (C.ENCODE_TOKENS, True), (8, False)):
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
                                             cfg.use_qjl, cfg.value_bits,
                                             exact16_matrices=declared)
        run()
        torch.cuda.synchronize()
        h = hashlib.sha256(cache.cpu().numpy().tobytes()).hexdigest()[:16]
        torch.save(cache.cpu(), f"/tmp/ab_{os.path.basename(tree.rstrip('/'))}_{tokens}{declared}.pt")
        ms = C.gpu_ms(run, rep=300)
        out[f"{tokens}{'d' if declared else ''}"] = dict(ms=ms, tbps=2 * k.numel() * 2 / ms * 1e-9, sha=h,
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
    print("tree  case    ms (rounds)                TB/s    bytes hash        kernels us (last round)")
    for name, rs in res.items():
        for case in ("32768", "32768d", "8"):
            b = [r[case]["ms"] for r in rs]
            print(f"{name:4}  {case:6}  {' '.join(f'{x:.4f}' for x in b)}  "
                  f"{rs[0][case]['tbps'] if case != '8' else 0:.3f}  {rs[0][case]['sha']}  "
                  f"{rs[-1][case]['kernels']}")
    same = all(r[c]["sha"] == res["old"][0][c]["sha"] for rs in res.values() for r in rs
               for c in ("32768", "32768d", "8"))
    print("identical bytes in every run:", same)
    import torch
    for tokens, declared in ((32768, False), (32768, True), (8, False)):
        a, b = (torch.load(f"/tmp/ab_{os.path.basename(TREES[n].rstrip('/'))}_{tokens}{declared}.pt")
                for n in ("old", "new"))
        print(f"bytes differing old/new, {tokens} tokens declared={declared}: "
              f"{int((a != b).sum())} of {a.numel()}")


if __name__ == "__main__":
    one(sys.argv[2]) if len(sys.argv) > 2 else main()
