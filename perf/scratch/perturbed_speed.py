"""The op's time with codebooks other than the built-in ones (the portable-decoder path), page 64,
default arguments, against the built-in path.  Run from a build folder (perf/ab_decode.py says
how to make one): cd BUILD && PYTHONPATH=. python PATH/perf/scratch/perturbed_speed.py ."""
import json, os, sys
build = os.path.abspath(sys.argv[1])
sys.path[:0] = [build, os.path.join(build, "perf")]
import torch
import common as C
assert os.path.abspath(C.__file__).startswith(build)
out = {}
for batch, ctx in ((1, 4096), (8, 32768), (1, 131072)):
    case = C.decode_case(batch, ctx, block_size=64)
    a = list(case.args)
    a[10] = a[10] * (1 + 1e-3)
    a[11] = a[11] * (1 - 1e-3)
    fn = lambda: torch.ops.turboquant.paged_decode_attention(*a)
    ref = torch.ops.turboquant.paged_decode_attention(*case.args, True).float()
    o = fn().float()
    out[f"({batch}, {ctx // 1024}k)"] = dict(ms=C.gpu_ms(fn, rep=100), builtin_ms=C.gpu_ms(case.run),
                                            rel=float((o - ref).abs().max() / ref.abs().max()))
    del case
    torch.cuda.empty_cache()
print("RESULT " + json.dumps(out))
