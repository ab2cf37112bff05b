"""us per EXACT16 encode launch (64, 4, 2) against the tiles each persistent program encodes
(1..16), fp16, seed format: the slope is a tile of every program, the intercept the launch,
the per-program prologue and the pipeline's fill and drain.  Run from the repository root:
`PYTHONPATH=. python perf/scratch/enc_intercept.py`."""
import json, os, sys
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "perf")]
import torch
import common as C
from tq_ops import TQCodec, preset, layout
from tq_ops.ops.write_cache import launch_encode
from tq_ops.triton.encode import EncodeConfig
cfg = preset("seed", head_dim=128)
codec = TQCodec.build(cfg, "cuda")
H, D, BS = 8, 128, 128
sms = torch.cuda.get_device_properties(0).multi_processor_count
lay = layout.SlotLayout(D, cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits)
offs = {"keys": dict(OFF_C=lay.slot_offset("k_codes"), OFF_N=lay.slot_offset("k_norm"),
                     OFF_S=lay.slot_offset("k_signs"), OFF_G=lay.slot_offset("k_gamma")),
        "values": dict(OFF_C=lay.slot_offset("v_codes"), OFF_N=lay.slot_offset("v_norm"))}
gen = torch.Generator(device="cuda").manual_seed(1)
for k in (1, 2, 4, 8, 16):
    T = sms * 2 * 64 * k // H
    T = (T + BS - 1) // BS * BS
    slots = torch.randperm(T, generator=gen, device="cuda").to(torch.int32)
    cache = torch.full((T // BS, H, BS * lay.slot_bytes), 0xAB, dtype=torch.uint8, device="cuda")
    row = {}
    for part in ("keys", "values"):
        x = torch.randn((T, H, D), generator=gen, device="cuda", dtype=torch.float16)
        keys = part == "keys"
        cents = codec.key_centroids if keys else codec.value_centroids
        bits = cfg.key_mse_bits if keys else cfg.value_bits
        def run():
            launch_encode(x, codec.rotation, codec.qjl_projection, cents, bits, keys, cache,
                          offs[part], BS, cache.stride(0), cache.stride(1), slot_mapping=slots,
                          exact16=True, config=EncodeConfig(64, 4, 2))
        row[part] = round(C.gpu_ms(run, rep=200) * 1e3, 2)
    print("tiles/program", k, "tokens", T, row, flush=True)
