"""Launch-config exploration for the paged decode and prefill kernels (GPU, one call).

    PYTHONPATH=. python perf/tune_decode.py [--workers 4] [--out DIR] [--no-prefill] [--rounds N]

Not a benchmark of record (perf/gpu_check.py is): it times the op with every candidate
`DecodeConfig` (tile, warps, stages) and split count at the issue's decode
shapes, page size 128 (what the vLLM backend asks for), and prefill block sizes, so the fixed
tables in tq_ops/triton/decode.py and prefill.py can be chosen from measurements (results of its
runs: perf/NOTES.md).  Each candidate
is first checked against the CPU reference on a small case (outputs poisoned first).

Workers compile their share of the candidates in parallel (compilation dominates) and take a
file lock for timing, so timings never overlap on the GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

PAGE = 128
SHAPES = [(1, 4096), (1, 32768), (1, 131072), (8, 4096), (8, 32768), (32, 16384), (64, 8192)]
RAW = 64  # exact raw-pool tokens per sequence in the "+raw" variant (vLLM's buffer averages 64)


def candidates():
    from tq_ops.triton.decode import decode_config

    # the table's head_dim-128 row, the uncapped PRMT-table decoders, and a 128-register cap with
    # 16 resident.  Session 3: without the slow path the split kernel needs 168 registers (was
    # 255): 12 resident one-warp programs per SM.  Session 6: the bit-plane key decoders take
    # ptxas to 251 registers (8 resident) unless capped.  Sessions 7 to 30 ran this script with
    # launches that went through wrap_triton's dispatch, which drops the cap and with it the
    # capped decoders (tq_ops.ops.paged_decode_attention.split_launch): their "within 1-3% of
    # each other" compared the table decoders with themselves.  Session 31 (bare launches,
    # perf/scratch/ab_occupancy.py): caps 152-128 with 13-16 resident no faster than 168 / 12
    # beyond 1% anywhere, up to 20% slower (perf/NOTES.md).
    row = decode_config("sm90", 128, 2)
    return [row,
            dataclasses.replace(row, max_registers=0, key_planes=False, value_words=False,
                                int8_keys=False),
            dataclasses.replace(row, max_registers=128, resident_programs_per_sm=16)]


def cfg_id(cfg) -> str:
    regs = f"r{cfg.max_registers}" if cfg.max_registers else ""
    keys = "" if cfg.key_planes else "-tablekeys"
    values = "" if cfg.value_words else "-smemvalues"
    int8 = "-int8keys" if cfg.int8_keys else ""
    return (f"n{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}p{cfg.resident_programs_per_sm}"
            f"{regs}{keys}{values}{int8}")


PREFILL = [(16, 4), (32, 4), (32, 8), (64, 8)]


class Lock:
    def __init__(self, path):
        self.f = open(path, "w")

    def __enter__(self):
        fcntl.flock(self.f, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)


def check(launch, cfg) -> float:
    """Relative error of the kernel with cfg against the CPU reference (ragged lengths, raw
    tokens, page 128, outputs poisoned)."""
    from tq_ops import TQCodec, preset
    from tq_ops import reference as R

    c = TQCodec.build(preset("seed", head_dim=128), "cpu")
    f = c.config
    gen = torch.Generator().manual_seed(1)
    b, hkv, g, lens, mb = 3, 8, 4, [5, 300, 1100], 9
    cache = torch.randint(0, 256, (b * mb + 1, hkv, PAGE * f.slot_bytes), generator=gen,
                          dtype=torch.uint8)
    bt = (torch.randperm(b * mb, generator=gen) + 1).reshape(b, mb).to(torch.int32)
    for i, n in enumerate(lens):
        sl = bt[i].long()[torch.arange(n) // PAGE] * PAGE + torch.arange(n) % PAGE
        R.write_cache(torch.randn(n, hkv, 128, generator=gen), torch.randn(n, hkv, 128, generator=gen),
                      cache, sl, c.rotation, c.qjl_projection, c.key_centroids,
                      c.value_centroids, f.key_mse_bits, f.use_qjl, f.value_bits)
    q = torch.randn(b, hkv * g, 128, generator=gen)
    rk, rv = torch.randn(b, 70, hkv, 128, generator=gen), torch.randn(b, 70, hkv, 128, generator=gen)
    args = [q, cache, bt, torch.tensor(lens, dtype=torch.int32), rk, rv,
            torch.tensor([2, 0, 1], dtype=torch.int32), torch.tensor([3, 70, 0], dtype=torch.int32),
            c.rotation, c.qjl_projection, c.key_centroids, c.value_centroids, f.key_mse_bits,
            f.use_qjl, f.value_bits, 128 ** -0.5, 0]
    ref = R.paged_decode_attention(*args)
    dev = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    dev[0] = dev[0].half()
    dev[4], dev[5] = dev[4].half(), dev[5].half()
    t = torch.empty(1 << 26, dtype=torch.uint8, device="cuda")
    t.fill_(0xFF)
    del t
    got = launch(*dev, raw=True, config=cfg).float().cpu()
    return float((got - ref).abs().max() / ref.abs().max())


def emit(rec: dict) -> None:
    """One JSON line to $TUNE_LOG (appended under a lock, so a timed-out run keeps what it
    measured) and to stdout."""
    line = json.dumps(rec)
    print(line, flush=True)
    with open(os.environ["TUNE_LOG"], "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")


def worker(indices: list[int], lock_path: str) -> None:
    import common as C
    from tq_ops.ops.paged_decode_attention import launch
    from tq_ops.triton.decode import num_splits

    cands = candidates()
    lock = Lock(lock_path)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = {}
    for b, ctx in SHAPES:
        cases[(b, ctx, 0)] = C.decode_case(b, ctx, block_size=PAGE)
    cases[(8, 32768, RAW)] = C.decode_case(8, 32768, block_size=PAGE, raw_tokens=RAW)
    for i in indices:
        cfg = cands[i]
        rec = dict(kind="decode", cfg=cfg_id(cfg))
        try:
            rec["rel_err"] = check(launch, cfg)
            runs = []
            for (b, ctx, raw), case in cases.items():
                base = num_splits(b, 8, ctx, sms, cfg)
                for ns in sorted({base, num_splits(b, 8, ctx, sms, cfg, waves=2)}):
                    def fn(case=case, ns=ns):
                        return launch(*case.args, raw=True, config=cfg, splits=ns)
                    fn()  # compile outside the lock
                    runs.append((b, ctx, raw, ns, base, fn))
            torch.cuda.synchronize()
            # one round per lock hold: the workers' rounds interleave, so a drift of the card
            # over the run (clocks, temperature) spreads over every candidate alike
            rounds = [[] for _ in runs]
            for _ in range(int(os.environ.get("TUNE_ROUNDS", "1"))):
                with lock:
                    for got, (*_, fn) in zip(rounds, runs):
                        got.append(C.gpu_ms(fn, rep=40))
            rec["times"] = [dict(batch=b, ctx=ctx, raw=raw, splits=ns, default_splits=base,
                                 ms=statistics.median(got), ms_rounds=got)
                            for (b, ctx, raw, ns, base, _), got in zip(runs, rounds)]
        except Exception as e:  # a config that fails to compile or run is reported, not fatal
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        emit(rec)
    del cases
    torch.cuda.empty_cache()
    if 0 in indices and not os.environ.get("TUNE_NO_PREFILL"):
        prefill(lock)


def prefill_case(batch: int, prefix: int, chunk: int):
    """batch sequences, each a chunk of `chunk` new tokens over `prefix` compressed ones."""
    import common as C
    from tq_ops import TQCodec, preset

    cfg = preset("seed", head_dim=C.HEAD_DIM)
    codec = TQCodec.build(cfg, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    per = math.ceil((prefix + chunk) / PAGE)
    cache = torch.empty((batch * per + 1, C.HKV, PAGE * cfg.slot_bytes), dtype=torch.uint8,
                        device="cuda")
    bt = (torch.randperm(batch * per, generator=gen, device="cuda") + 1).reshape(batch, per)
    bt = bt.to(torch.int32)
    for i in range(batch):
        pos = torch.arange(prefix, device="cuda")
        sl = bt[i, pos // PAGE].long() * PAGE + pos % PAGE
        k = torch.randn((prefix, C.HKV, C.HEAD_DIM), generator=gen, device="cuda",
                        dtype=torch.float16)
        torch.ops.turboquant.write_cache(k, k.clone(), cache, sl, codec.rotation,
                                         codec.qjl_projection, codec.key_centroids,
                                         codec.value_centroids, cfg.key_mse_bits, cfg.use_qjl,
                                         cfg.value_bits)
    t = batch * chunk
    q = torch.randn((t, C.HQ, C.HEAD_DIM), generator=gen, device="cuda", dtype=torch.float16)
    k = torch.randn((t, C.HKV, C.HEAD_DIM), generator=gen, device="cuda", dtype=torch.float16)
    cu = torch.arange(0, t + 1, chunk, dtype=torch.int32, device="cuda")
    raw = torch.zeros((1, 1, C.HKV, C.HEAD_DIM), dtype=torch.float16, device="cuda")
    zi = torch.zeros((batch,), dtype=torch.int32, device="cuda")
    args = (q, k, k.clone(), cu, cache, bt, torch.full((batch,), prefix, dtype=torch.int32,
                                                       device="cuda"),
            raw, raw, zi, zi, codec.rotation, codec.qjl_projection, codec.key_centroids,
            codec.value_centroids, cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits,
            C.HEAD_DIM ** -0.5, 0)
    return args


def sdpa_prefill(batch: int, prefix: int, chunk: int):
    """Cost stand-in for the exact model's chunked prefill: flash SDPA of the chunk's queries
    over prefix + chunk fp16 keys without a mask (the causal triangle of the chunk is ~3% of the
    work at these sizes)."""
    import common as C
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q = torch.randn((batch, C.HQ, chunk, C.HEAD_DIM), device="cuda", dtype=torch.float16)
    k = torch.randn((batch, C.HKV, prefix + chunk, C.HEAD_DIM), device="cuda",
                    dtype=torch.float16)

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, k, enable_gqa=True)
    return run


def prefill(lock) -> None:
    import common as C
    from tq_ops.ops.paged_prefill_attention import launch

    for batch, prefix, chunk in ((1, 30720, 2048), (4, 8192, 512)):
        args = prefill_case(batch, prefix, chunk)
        base = sdpa_prefill(batch, prefix, chunk)
        fns = []
        for bq, w in PREFILL:
            def fn(bq=bq, w=w):
                return launch(*args, block_q=bq, num_warps=w)
            try:
                ref = fns[0][2]() if fns else None
                out = fn()
                err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max()) \
                    if ref is not None else 0.0
                fns.append((bq, w, fn, err))
            except Exception as e:
                emit(dict(kind="prefill", batch=batch, prefix=prefix, chunk=chunk, block_q=bq,
                          warps=w, error=f"{type(e).__name__}: {e}"[:300]))
        with lock:
            sd = C.gpu_ms(base, rep=100)
            for bq, w, fn, err in fns:
                emit(dict(kind="prefill", batch=batch, prefix=prefix, chunk=chunk, block_q=bq,
                          warps=w, ms=C.gpu_ms(fn, rep=40), sdpa_ms=sd, rel_err_vs_first=err))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--worker", type=str, help=argparse.SUPPRESS)
    ap.add_argument("--lock", type=str, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=str)
    ap.add_argument("--no-prefill", action="store_true", help="decode configs only")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every candidate this many times, interleaved; report medians")
    a = ap.parse_args()
    if a.worker is None:  # workers inherit it from the parent's environment
        os.environ["TUNE_ROUNDS"] = str(a.rounds)
    if a.no_prefill:
        os.environ["TUNE_NO_PREFILL"] = "1"
    if a.worker is not None:
        worker([int(x) for x in a.worker.split(",") if x], a.lock)
        return 0
    import common as C

    n = len(candidates())
    tmp = tempfile.mkdtemp()
    lock_path = os.path.join(tmp, "gpu.lock")
    os.environ["TUNE_LOG"] = os.path.join(a.out or tmp, "tune_decode.jsonl")
    shares = [list(range(i, n, a.workers)) for i in range(a.workers)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                               ",".join(map(str, s)), "--lock", lock_path],
                              stdout=subprocess.PIPE, text=True) for s in shares if s]
    lock = Lock(lock_path)
    with lock:
        sdpa = {}
        for b, ctx in SHAPES:
            fn, _ = C.sdpa_case(b, ctx)
            sdpa[(b, ctx)] = C.gpu_ms(fn, rep=40)
            emit(dict(kind="sdpa", batch=b, ctx=ctx, ms=sdpa[(b, ctx)]))
            del fn
        torch.cuda.empty_cache()
    recs = []
    for p in procs:
        out, _ = p.communicate()
        for line in out.splitlines():
            if line.startswith("{"):
                recs.append(json.loads(line))
    recs = [r for r in recs if r["kind"] != "sdpa"]
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "tune_decode_summary.json"), "w") as f:
            json.dump(dict(sdpa=[dict(batch=b, ctx=c, ms=v) for (b, c), v in sdpa.items()],
                           records=recs), f, indent=1)
    print(f"device: {torch.cuda.get_device_name(0)}")
    dec = [r for r in recs if r["kind"] == "decode"]
    for r in dec:
        if "error" in r:
            print(f"{r['cfg']}: ERROR {r['error']}")
        else:
            print(f"{r['cfg']}: rel_err {r['rel_err']:.2e}")
    keys = [(b, c, 0) for b, c in SHAPES] + [(8, 32768, RAW)]
    print("\ndecode ms (best split count per config, median of the rounds, (max-min)/median in "
          "brackets; sdpa flash fp16 in its own column)")
    ids = [r["cfg"] for r in dec if "times" in r]
    print("shape | sdpa | " + " | ".join(ids))
    for b, c, raw in keys:
        cells = []
        for r in dec:
            if "times" not in r:
                continue
            ts = [t for t in r["times"] if (t["batch"], t["ctx"], t["raw"]) == (b, c, raw)]
            best = min(ts, key=lambda t: t["ms"])
            got = best.get("ms_rounds") or [best["ms"]]
            spread = f" ({(max(got) - min(got)) / best['ms']:.0%})" if len(got) > 1 else ""
            cells.append(f"{best['ms']:.4f}@{best['splits']}{spread}")
        sd = sdpa.get((b, c), float("nan"))
        print(f"({b},{c // 1024}k{'+raw' if raw else ''}) | {sd:.4f} | " + " | ".join(cells))
    for r in recs:
        if r["kind"] == "prefill":
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
