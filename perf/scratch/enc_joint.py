"""Offline sm_90 compile of encode_pair_kernel with JOINT (a bulk write's keys and values in one
persistent launch; seed format, head_dim 128, 64 rows, 4 warps): registers, spills, shared memory
and instruction counts, against the two encode_kernel launches it replaces.
`PYTHONPATH=. python perf/scratch/enc_joint.py [exact16=1] [num_stages=3] [one_tile=0]`."""
import sys
sys.path.insert(0, "perf")
import sass_report as S
import triton
from tq_ops import preset
from tq_ops.triton.encode import encode_pair_kernel
from tq_ops.triton.unpack import group_width

exact16 = bool(int(sys.argv[1])) if len(sys.argv) > 1 else True
stages = int(sys.argv[2]) if len(sys.argv) > 2 else 3
one_tile = bool(int(sys.argv[3])) if len(sys.argv) > 3 else False
cfg = preset("seed", head_dim=128)
lay = cfg.layout
consts = dict(H=8, D=128, DP=128, DG=group_width(128), TB=64, K_BITS=cfg.key_mse_bits,
              QJL=cfg.use_qjl, V_BITS=cfg.value_bits, BS=128,
              K_OFF_C=lay.slot_offset("k_codes"), K_OFF_S=lay.slot_offset("k_signs"),
              K_OFF_N=lay.slot_offset("k_norm"), K_OFF_G=lay.slot_offset("k_gamma"),
              V_OFF_C=lay.slot_offset("v_codes"), V_OFF_N=lay.slot_offset("v_norm"),
              K_F32=False, V_F32=False, EXACT16=exact16, JOINT=True, ONE_TILE=one_tile)
types = {"k_ptr": "*fp16", "v_ptr": "*fp16", "out_ptr": "*u8", "slot_ptr": "*i32"}
k = S.compile_sm90(encode_pair_kernel, consts, types,
                   aligned=("k_st", "k_sh", "v_st", "v_sh", "page_stride", "head_stride"),
                   num_warps=4, num_stages=stages)
sass = S.hot_loop(k.asm["cubin"], whole=True)
print("joint exact16", exact16, "one_tile", one_tile, "stages", stages, "smem", k.metadata.shared, "instructions",
      len(sass), S.ptxas_summary(k.asm["ptx"]))
for part in ("keys", "values"):
    e = S.compile_encode("seed", 128, part, 64, 4, 0, exact16=exact16)
    print(part, "smem", e.metadata.shared, "instructions",
          len(S.hot_loop(e.asm["cubin"], whole=True)), S.ptxas_summary(e.asm["ptx"]))
