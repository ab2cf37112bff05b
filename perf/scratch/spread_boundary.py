import json, sys, time
sys.path.insert(0, ".")
from tq_vllm import testing as T
from tq_ops.config import PRESET_FIELDS
ck = T.smollm2_checkpoint("out/smollm2-135m")
ids = T.tokens(ck, T.shakespeare(40_000))
ppl_ids = ids[:2048]; greedy_ids = ids[2048:2048 + 300]
preset = sys.argv[1]; seeds = [int(x) for x in sys.argv[2].split(",")]
fmt = dict(PRESET_FIELDS[preset], head_dim=64, flush_interval=128, sink_tokens=0, rotation_seed=0)
t = time.time()
res = T.scenario_spread(dict(checkpoint=str(ck), format=fmt, ppl_ids=ppl_ids, greedy_ids=greedy_ids,
                             greedy_n=32, eps=float(sys.argv[3]) if len(sys.argv) > 3 else 3e-7, seeds=seeds, exact_layers=[0, 1, 28, 29]))
print("RESULT", json.dumps(res), time.time() - t)
