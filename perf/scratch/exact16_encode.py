"""Encode key and value launches timed apart: the split-precision kernel against the EXACT16
variant (integer Hadamard rotation, fp16 projection), per launch config; and the cache bytes of
both against each other.  PYTHONPATH=. python perf/scratch/exact16_encode.py [--short]"""
import json, math, sys
import torch
import triton
sys.path.insert(0, "perf")
import common as C
from tq_ops import TQCodec, preset, layout
from tq_ops.ops.write_cache import launch_encode
from tq_ops.triton.encode import EncodeConfig

torch.manual_seed(0)
cfg = preset("seed", head_dim=128)
codec = TQCodec.build(cfg, "cuda")
rot = codec.rotation
proj16 = codec.qjl_projection.half().float()
T, H, D, BS = 32768, 8, 128, 16
lay = layout.SlotLayout(D, cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits)
nblocks = T // BS
gen = torch.Generator(device="cuda").manual_seed(1)
slots = torch.randperm(nblocks * BS, generator=gen, device="cuda")[:T].to(torch.int32)
k = torch.randn((T, H, D), generator=gen, device="cuda", dtype=torch.float16)
v = torch.randn((T, H, D), generator=gen, device="cuda", dtype=torch.float16)
koffs = dict(OFF_C=lay.slot_offset("k_codes"), OFF_N=lay.slot_offset("k_norm"),
             OFF_S=lay.slot_offset("k_signs"), OFF_G=lay.slot_offset("k_gamma"))
voffs = dict(OFF_C=lay.slot_offset("v_codes"), OFF_N=lay.slot_offset("v_norm"))

def new_cache():
    return torch.full((nblocks, H, BS * lay.slot_bytes), 0xAB, dtype=torch.uint8, device="cuda")

def keys(cache, ex, cf):
    launch_encode(k, rot, proj16, codec.key_centroids, cfg.key_mse_bits, True, cache, koffs, BS,
                  cache.stride(0), cache.stride(1), slot_mapping=slots, exact16=ex, config=cf)

def values(cache, ex, cf):
    launch_encode(v, rot, proj16, codec.value_centroids, cfg.value_bits, False, cache, voffs, BS,
                  cache.stride(0), cache.stride(1), slot_mapping=slots, exact16=ex, config=cf)

out = {}
# correctness: exact16 bytes against the split-precision bytes
ref, new = new_cache(), new_cache()
keys(ref, False, EncodeConfig(128, 8, 1)); values(ref, False, EncodeConfig(64, 4, 2))
keys(new, True, EncodeConfig(64, 4, 2)); values(new, True, EncodeConfig(64, 4, 2))
torch.cuda.synchronize()
diff = (ref != new)
out["bytes_differing"] = int(diff.sum())
out["bytes_total"] = ref.numel()
# a false declaration poisons the norms.  S' itself has fp16 entries since session 22
# (qjl_matrix), so the false one is S' x (1 + 2^-12), as in tests/test_kernels_interpret.py
bad = new_cache()
launch_encode(k, rot, codec.qjl_projection * (1 + 2 ** -12), codec.key_centroids, cfg.key_mse_bits, True, bad,
              koffs, BS, bad.stride(0), bad.stride(1), slot_mapping=slots, exact16=True,
              config=EncodeConfig(64, 4, 2))
torch.cuda.synchronize()
def norms(cache):
    return cache[:, :, BS * koffs["OFF_N"]:BS * koffs["OFF_N"] + 2 * BS].contiguous().view(
        torch.float16)
out["poisoned_norms_all_nan"] = bool(norms(bad).isnan().all())
out["good_norms_finite"] = bool(norms(new).isfinite().all())
ALL_CONFIGS = (EncodeConfig(128, 8, 1), EncodeConfig(64, 4, 2), EncodeConfig(64, 4, 3),
               EncodeConfig(64, 4, 1), EncodeConfig(32, 4, 4))
CONFIGS = ALL_CONFIGS[:2] if "--short" in sys.argv else ALL_CONFIGS
cases = []
for part, fn in (("keys", keys), ("values", values)):
    for ex in (False, True):
        for cf in CONFIGS:
            cases.append((part, fn, ex, cf))
res = {}
for rnd in range(2):
    for part, fn, ex, cf in cases:
        c = new_cache()
        try:
            ms = C.gpu_ms(lambda: fn(c, ex, cf), rep=100)
        except Exception as e:  # noqa: BLE001
            ms = float("nan"); print(part, ex, cf, "failed", type(e).__name__, str(e)[:200])
        key = f"{part} exact16={ex} rows={cf.rows} warps={cf.num_warps} pps={cf.programs_per_sm}"
        res.setdefault(key, []).append(round(ms * 1e3, 1))
        del c
out["us"] = res
print("RESULT " + json.dumps(out))
for k_, v_ in res.items():
    print(f"{k_:55s} {v_}")
