"""Split counts at small contexts, page 64 (gpu_check's table), built-in codebooks declared."""
import json, os, statistics, sys
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "perf")]
import torch
import common as C
import gpu_check as G
from tq_ops.ops.paged_decode_attention import launch
from tq_ops.triton.decode import decode_config, num_splits

sms = torch.cuda.get_device_properties(0).multi_processor_count
cfg = decode_config("sm90", 128, 2)
SH = json.loads(os.environ["SH"])
for batch, ctx, cands in SH:
    sd, _ = C.sdpa_case(batch, ctx)
    sd_ms = C.gpu_ms(sd)
    case = C.decode_case(batch, ctx, block_size=64)
    table = num_splits(batch, 8, ctx, sms, cfg)
    ref = launch(*case.args, builtin_codebooks=True).float()
    fns = {}
    for s in cands:
        fns[s] = (lambda s=s: launch(*case.args, builtin_codebooks=True, splits=s))
        err = float((fns[s]().float() - ref).abs().max() / ref.abs().max())
        assert err < 5e-3, (s, err)
    times = {s: [] for s in cands}
    for _ in range(3):
        for s in cands:
            times[s].append(C.gpu_ms(fns[s], rep=100))
    print(f"({batch},{ctx}) sdpa {sd_ms:.4f} table splits {table}")
    for s in cands:
        ms = statistics.median(times[s])
        kb = G.kernel_breakdown(fns[s])
        print(f"  splits {s:4} ms {ms:.4f} ({' '.join(f'{x:.4f}' for x in times[s])}) vs sdpa {sd_ms/ms:.3f}x {kb}")
    del case, fns
    torch.cuda.empty_cache()
