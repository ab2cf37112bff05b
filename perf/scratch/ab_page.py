import sys, os, json
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch, statistics
import common as C
from tq_ops.ops.paged_decode_attention import launch
from tq_ops.triton.decode import decode_config, num_splits
import dataclasses
cfg = decode_config("sm90", 128, 2)
tab = dataclasses.replace(cfg, key_planes=False, value_words=False, max_registers=0)
res = {}
for b, ctx in ((8, 32768), (1, 131072), (32, 16384), (8, 4096)):
    cases = {p: C.decode_case(b, ctx, block_size=p) for p in (32, 64, 128)}
    fns = {}
    for p, case in cases.items():
        for name, c in (("planes", cfg), ("table", tab)):
            fns[(p, name)] = (lambda case=case, c=c: launch(*case.args, config=c))
    for k, f in fns.items(): f()
    torch.cuda.synchronize()
    got = {k: [] for k in fns}
    for r in range(3):
        for k, f in fns.items():
            got[k].append(C.gpu_ms(f, rep=40))
    for k, v in got.items():
        print(b, ctx, k, round(statistics.median(v), 4), [round(x, 4) for x in v], flush=True)
    del cases, fns
    torch.cuda.empty_cache()
