"""Per-kernel GPU time (torch.profiler, eager launches) beside the graph-replay op time of the
decode op at the large decode shapes, page 64, default arguments: how much of an op call the
query prep and the merge take next to the split kernel.
PYTHONPATH=. python perf/scratch/kernel_shares.py [batch,ctx ...]"""
import json, os, sys
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "perf")]
import torch
import common as C
import gpu_check as G
shapes = [tuple(int(x) for x in a.split(",")) for a in sys.argv[1:]] or [
    (1, 4096), (1, 32768), (1, 131072), (8, 32768)]
for rnd in range(2):
    for b, ctx in shapes:
        case = C.decode_case(b, ctx, block_size=64)
        row = dict(op_ms=round(C.gpu_ms(case.run), 4),
                   kernels_us=G.kernel_breakdown(case.run, reps=50))
        print(f"({b}, {ctx}) round {rnd}", json.dumps(row), flush=True)
        del case
        torch.cuda.empty_cache()
