"""Per-kernel GPU time (torch.profiler, eager) and graph-replay op time of the decode op at
(1, 4k), pages 16 and 64, with default arguments and with the built-in codebooks declared:
where the page-16 default/declared gap of session 21 sits.  PYTHONPATH=. python
perf/scratch/small_kernel_times.py"""
import json, os, sys
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "perf")]
import torch
import common as C
import gpu_check as G
out = {}
for rnd in range(2):
    for page in (16, 64):
        case = C.decode_case(1, 4096, block_size=page)
        for declared in (False, True):
            fn = ((lambda: torch.ops.turboquant.paged_decode_attention(*case.args, True))
                  if declared else case.run)
            key = f"page {page} {'declared' if declared else 'default'} round {rnd}"
            out[key] = dict(op_ms=C.gpu_ms(fn), kernels_us=G.kernel_breakdown(fn, reps=50))
            print(key, json.dumps(out[key]), flush=True)
        del case
        torch.cuda.empty_cache()
