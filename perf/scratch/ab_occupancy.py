"""Op time of the decode at the issue's shapes (page 64) with the split kernel's register cap
and resident-program count varied (DecodeConfig.max_registers / resident_programs_per_sm),
interleaved rounds in one process; outputs compared with the table config's.
PYTHONPATH=. python perf/scratch/ab_occupancy.py [rounds]"""
import dataclasses, json, os, sys
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "perf")]
import torch
import common as C
from tq_ops.ops.paged_decode_attention import launch
from tq_ops.triton.decode import decode_config
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
base = decode_config("sm90", 128, 2)
variants = {"r168p12": base}
for regs, res in ((152, 13), (144, 14), (136, 15), (128, 16)):
    variants[f"r{regs}p{res}"] = dataclasses.replace(base, max_registers=regs,
                                                     resident_programs_per_sm=res)
shapes = [(1, 4096), (1, 32768), (1, 131072), (8, 4096), (8, 32768), (32, 16384), (64, 8192)]
res = {}
for b, ctx in shapes:
    case = C.decode_case(b, ctx, block_size=64)
    ref = launch(*case.args, raw=True, config=base).float()
    for name, cfg in variants.items():
        out = launch(*case.args, raw=True, config=cfg).float()
        res.setdefault(f"({b}, {ctx})", {})[name + " maxdiff"] = float((out - ref).abs().max())
    for rnd in range(rounds):
        for name, cfg in variants.items():
            ms = C.gpu_ms(lambda: launch(*case.args, raw=True, config=cfg))
            res[f"({b}, {ctx})"].setdefault(name, []).append(round(ms, 4))
    print(f"({b}, {ctx})", json.dumps(res[f"({b}, {ctx})"]), flush=True)
    del case
    torch.cuda.empty_cache()
if os.environ.get("OUT"):
    json.dump(res, open(os.path.join(os.environ["OUT"], "ab_occupancy.json"), "w"), indent=1)
