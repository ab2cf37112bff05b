import sys
sys.path.insert(0,'perf')
import sass_report as S
from tq_ops.triton.encode import MODE_CACHE, MODE_RECORDS, encode_kernel
from tq_ops.triton.unpack import group_width
from tq_ops import preset
for d in (64, 96, 128):
  cfg = preset("seed", head_dim=d); lay = cfg.layout
  for part in ("keys", "values"):
    for rows, warps in ((64, 4), (128, 8)):
      for xt in ("fp16", "fp32"):
        for mode in (MODE_CACHE, MODE_RECORDS):
          keys = part == "keys"; bits = cfg.key_mse_bits if keys else cfg.value_bits
          qjl = keys and cfg.use_qjl; pre = "k" if keys else "v"
          consts = dict(H=8, D=d, DP=max(16, 1 << (d-1).bit_length()), DG=group_width(d), TB=rows, BITS=bits, QJL=qjl, BS=128,
                  OFF_C=lay.slot_offset(f"{pre}_codes"), OFF_N=lay.slot_offset(f"{pre}_norm"),
                  OFF_S=lay.slot_offset("k_signs") if qjl else 0, OFF_G=lay.slot_offset("k_gamma") if qjl else 0,
                  MODE=mode, NORM_F32=mode==MODE_RECORDS, X_F32=xt=="fp32")
          k = S.compile_sm90(encode_kernel, consts, {"x_ptr": "*"+xt, "out_ptr": "*u8", "slot_ptr": "*i32", "norm_ptr": "*fp32"}, aligned=("x_st","x_sh","page_stride","head_stride"), num_warps=warps)
          print(d, part, rows, warps, xt, "cache" if mode==MODE_CACHE else "records", k.metadata.shared, "OVER" if k.metadata.shared > 232448 else "")
