"""head_dim 64 decode: the table row (PRMT-table keys, values through shared memory) against the
bit-plane keys and the pair value decoder, op time at page 64 in interleaved rounds in one
process, with SDPA flash fp16 at the same shapes; outputs compared with the table row's.
PYTHONPATH=. python perf/scratch/ab_hd64.py [rounds]"""
import dataclasses, json, os, sys
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "perf")]
import torch
import common as C
from tq_ops.ops.paged_decode_attention import launch
from tq_ops.triton.decode import DecodeConfig
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
table = DecodeConfig(64, 1, 2, 14, 64, 256, key_planes=False, value_words=False)
new = DecodeConfig(64, 1, 2, 12, 64, 256, max_registers=168)
variants = {"table": table, "planes+words r168": new,
            "planes+words r144 p14": dataclasses.replace(new, max_registers=144,
                                                         resident_programs_per_sm=14),
            "planes+smem r168": dataclasses.replace(new, value_words=False),
            "table keys+words r168": dataclasses.replace(new, key_planes=False)}
cases = [((32, 8, 64), s) for s in ((1, 4096), (1, 32768), (1, 131072), (8, 4096), (8, 32768),
                                     (32, 16384), (64, 8192))]
cases += [((9, 3, 64), s) for s in ((1, 8192), (8, 8192), (32, 8192))]
res = {}
print("clock", C.sm_clock(), flush=True)
# anchor: the head_dim 128 op at (8, 32k) through the op and through launch() with its table row
anchor = C.decode_case(8, 32768, block_size=64)
print("anchor (8, 32k) d128 op / launch ms", round(C.gpu_ms(anchor.run), 4),
      round(C.gpu_ms(lambda: launch(*anchor.args, raw=True)), 4), C.sm_clock(), flush=True)
del anchor
for heads, (b, ctx) in cases:
    key = f"{heads} ({b}, {ctx})"
    case = C.decode_case(b, ctx, block_size=64, heads=heads)
    ref = launch(*case.args, raw=True, config=table).float()
    row = res.setdefault(key, {})
    for name, cfg in variants.items():
        out = launch(*case.args, raw=True, config=cfg).float()
        row[name + " maxdiff"] = float((out - ref).abs().max())
    sd, _ = C.sdpa_case(b, ctx, heads=heads)
    for rnd in range(rounds):
        row.setdefault("sdpa", []).append(round(C.gpu_ms(sd), 4))
        for name, cfg in variants.items():
            ms = C.gpu_ms(lambda: launch(*case.args, raw=True, config=cfg))
            row.setdefault(name, []).append(round(ms, 4))
    row["clock"] = C.sm_clock()
    print(key, json.dumps(row), flush=True)
    del case, sd
    torch.cuda.empty_cache()
if os.environ.get("OUT"):
    json.dump(res, open(os.path.join(os.environ["OUT"], "ab_hd64.json"), "w"), indent=1)
