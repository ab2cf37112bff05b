"""Offline sm_90 compile of the decode split kernel or the encode kernel: registers, spills,
shared memory and the instruction mix of the hot loop.  Runs on a machine without a GPU (Triton
ships ptxas and cuobjdump), so kernel changes can be weighed before spending device time.

    PYTHONPATH=. python perf/sass_report.py [--format seed] [--head-dim 128] [--group 4]
        [--block-size 128] [--block-n 64] [--warps 1] [--stages 2] [--maxnreg N] [--slow]
        [--table-keys] [--smem-values]
    PYTHONPATH=. python perf/sass_report.py --kernel encode-keys|encode-values [--format seed]
        [--rows 64] [--warps 4] [--exact16]
    PYTHONPATH=. python perf/sass_report.py --kernel prep|merge [--format seed] [--head-dim 128]
        [--splits 24]
    PYTHONPATH=. python perf/sass_report.py --kernel prefill [--format seed] [--head-dim 128]
        [--decoded] [--block-q N] [--warps N]
    PYTHONPATH=. python perf/sass_report.py --kernel dequant [--format seed] [--head-dim 128]
        [--block-size 128] [--out fp16|bf16|fp32]

The split kernel's constexprs are the launcher's (tq_ops.ops.paged_decode_attention.
split_constants); pointer arguments (and strides) are declared 16-byte aligned, as Triton
specialises them at a real launch (without that, the loads are not vectorised and the counts
are not the GPU's).  The hot loop is the longest backward branch's body: per tile of block_n
tokens per warp for the split kernel (instructions per (token, KV head) = count * warps /
block_n), per tile of `rows` (token, head) rows per warp for encode (the cache-write mode,
fp16 input).  perf/NOTES.md has readings.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tq_ops import preset  # noqa: E402
from tq_ops.ops.paged_decode_attention import split_constants  # noqa: E402
from tq_ops.triton.decode import decode_split_kernel  # noqa: E402

FP32_POINTERS = ("qr_ptr", "u_ptr", "qo_ptr", "o_ptr", "m_ptr", "l_ptr", "kc_ptr", "vc_ptr")
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sm90(fn, consts: dict, pointer_types: dict, *, aligned=(), floats=(),
                 num_warps: int, num_stages: int = 2, maxnreg: int = 0):
    """Compile kernel `fn` for sm_90 as a real launch would specialise it: the constexprs
    `consts`, pointer arguments typed by `pointer_types` (default *fp32) and 16-byte aligned,
    the integer arguments named in `aligned` divisible by 16, those in `floats` fp32."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointer_types.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in floats else "i32"
            if name in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def compile_split(fmt: str, head_dim: int, group: int, block_size: int, block_n: int,
                  warps: int, stages: int, maxnreg: int, fast: bool, planes: bool = True,
                  words: bool = True, int8: bool = False):
    cfg = preset(fmt, head_dim=head_dim)
    hkv = 8
    consts = split_constants(hkv, group, head_dim, cfg.key_mse_bits, cfg.use_qjl,
                             cfg.value_bits, block_size, block_n,
                             hkv * block_size * cfg.slot_bytes, on_cuda=True)
    consts["FAST"] = fast
    consts["KEY_PLANES"] = planes
    consts["VALUE_WORDS"] = words
    consts["INT8_KEYS"] = int8
    fn = decode_split_kernel
    # vLLM's: bf16 queries and raw pool
    types = {n: "*fp32" if n in FP32_POINTERS else "*u8" if n == "cache_ptr" else
             "*fp16" if n == "qp_ptr" else "*i8" if n == "q8_ptr" else
             "*bf16" if n in ("q_ptr", "raw_k_ptr", "raw_v_ptr")
             else "*i32" for n in fn.arg_names if n.endswith("_ptr")}
    return compile_sm90(fn, consts, types,
                        aligned=("page_stride", "rk_s0", "rk_s1", "rk_s2", "rv_s0", "rv_s1",
                                 "rv_s2"), floats=("q_scale",), num_warps=warps,
                        num_stages=stages, maxnreg=maxnreg)


def compile_encode(fmt: str, head_dim: int, part: str, rows: int, warps: int, maxnreg: int,
                   exact16: bool = False):
    """encode_kernel in cache-write mode for the key or value half of write_cache; `exact16`:
    the variant for declared exact fp16 matrices (one MMA operand per matrix)."""
    from tq_ops.triton.encode import MODE_CACHE, encode_kernel
    from tq_ops.triton.unpack import group_width

    cfg = preset(fmt, head_dim=head_dim)
    lay = cfg.layout
    keys = part == "keys"
    bits = cfg.key_mse_bits if keys else cfg.value_bits
    qjl = keys and cfg.use_qjl
    pre = "k" if keys else "v"
    consts = dict(H=8, D=head_dim, DP=max(16, triton.next_power_of_2(head_dim)),
                  DG=group_width(head_dim), TB=rows, BITS=bits, QJL=qjl, BS=128,
                  OFF_C=lay.slot_offset(f"{pre}_codes"), OFF_N=lay.slot_offset(f"{pre}_norm"),
                  OFF_S=lay.slot_offset("k_signs") if qjl else 0,
                  OFF_G=lay.slot_offset("k_gamma") if qjl else 0,
                  MODE=MODE_CACHE, NORM_F32=False, X_F32=False, EXACT16=exact16)
    types = {"x_ptr": "*fp16", "out_ptr": "*u8", "slot_ptr": "*i32", "norm_ptr": "*u8"}
    # num_stages 3: Triton's default, which launch_encode does not override (with 2 the x loads
    # pipeline one stage less and the shared memory reads 16 KB under the launched kernel's)
    return compile_sm90(encode_kernel, consts, types,
                        aligned=("x_st", "x_sh", "page_stride", "head_stride"),
                        num_warps=warps, num_stages=3, maxnreg=maxnreg)


def compile_prefill(fmt: str, head_dim: int, group: int, block_size: int, block_q: int,
                    warps: int, maxnreg: int, decoded: bool = False, stages: int = 2,
                    prior: bool = False, partial: bool = False):
    """prefill_kernel with the launcher's constexprs (tq_ops.ops.paged_prefill_attention),
    fp16 queries and chunk K/V, bf16 raw pool; `decoded`: the variant over an fp16 decoded
    prefix (paged_dequantize's output)."""
    import math

    from tq_ops.triton.prefill import BLOCK_N, HOIST_MAX_HEAD_DIM, prefill_kernel
    from tq_ops.triton.unpack import asm_tables, group_width

    cfg = preset(fmt, head_dim=head_dim)
    lay = cfg.layout
    kb, qjl, vb = cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits
    kt, vt = asm_tables(head_dim, kb), asm_tables(head_dim, vb)
    consts = dict(
        HKV=8, G=group, GP=triton.next_power_of_2(group), D=head_dim,
        DP=max(32, triton.next_power_of_2(head_dim)), DG=group_width(head_dim), BS=block_size,
        BQ=block_q, BN=BLOCK_N, CBN=math.gcd(block_size, BLOCK_N), KB=kb, QJL=qjl, VB=vb,
        OFF_KC=lay.slot_offset("k_codes"), OFF_KS=lay.slot_offset("k_signs") if qjl else 0,
        OFF_KN=lay.slot_offset("k_norm"), OFF_KG=lay.slot_offset("k_gamma") if qjl else 0,
        OFF_VC=lay.slot_offset("v_codes"), OFF_VN=lay.slot_offset("v_norm"),
        SLOT=lay.slot_bytes, USE_FAST=kt[0] == 1 and vt[0] == 1, KT0=kt[1], KT1=kt[2],
        VT0=vt[1], VT1=vt[2], HOIST_Q=head_dim <= HOIST_MAX_HEAD_DIM, DECODED=decoded,
        PRIOR=prior, PARTIAL=partial)
    types = {n: "*fp32" for n in ("qr_ptr", "u_ptr", "rot_ptr", "kc_ptr", "vc_ptr")}
    types.update({n: "*fp16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "dk_ptr",
                                       "dv_ptr")})
    types.update({n: "*bf16" for n in ("raw_k_ptr", "raw_v_ptr")})
    types.update({"cache_ptr": "*u8"})
    types.update({n: "*i32" for n in ("cu_ptr", "bt_ptr", "prefix_ptr", "raw_idx_ptr",
                                      "raw_lens_ptr", "dstart_ptr")})
    # the raw pool strides are multiples of 16 at a real launch (contiguous (N, R, Hkv, D) pools)
    return compile_sm90(prefill_kernel, consts, types,
                        aligned=("page_stride", "rk_s0", "rk_s1", "rk_s2", "rv_s0", "rv_s1",
                                 "rv_s2"),
                        floats=("q_scale",), num_warps=warps, num_stages=stages,
                        maxnreg=maxnreg)


def compile_dequant(fmt: str, head_dim: int, block_size: int, warps: int, out: str):
    """dequantize_pages_kernel with the launcher's constexprs (tq_ops.ops.paged_dequantize),
    `out` ("fp16", "bf16", "fp32") outputs."""
    import math

    from tq_ops.ops.paged_dequantize import dequant_warps
    from tq_ops.triton.dequant import BLOCK_N, dequantize_pages_kernel

    cfg = preset(fmt, head_dim=head_dim)
    lay = cfg.layout
    qjl = cfg.use_qjl
    dp = max(16, triton.next_power_of_2(head_dim))
    consts = dict(
        HKV=8, D=head_dim, DP=dp, BS=block_size, BN=math.gcd(block_size, BLOCK_N),
        KB=cfg.key_mse_bits, QJL=qjl, VB=cfg.value_bits, OFF_KC=lay.slot_offset("k_codes"),
        OFF_KS=lay.slot_offset("k_signs") if qjl else 0, OFF_KN=lay.slot_offset("k_norm"),
        OFF_KG=lay.slot_offset("k_gamma") if qjl else 0, OFF_VC=lay.slot_offset("v_codes"),
        OFF_VN=lay.slot_offset("v_norm"), SLOT=lay.slot_bytes)
    types = {n: "*fp16" for n in ("pih_ptr", "pil_ptr", "sph_ptr", "spl_ptr")}
    types.update({n: f"*{out}" for n in ("kout_ptr", "vout_ptr")})
    types.update({"cache_ptr": "*u8", "bt_ptr": "*i32", "lens_ptr": "*i32",
                  "offsets_ptr": "*i32"})
    return compile_sm90(dequantize_pages_kernel, consts, types, aligned=("page_stride",),
                        floats=("qjl_scale",), num_warps=warps or dequant_warps(dp))


def compile_small(kernel: str, warps: int, consts: dict):
    """query_prep_kernel (fp16 queries) or decode_merge_kernel, with the
    launcher's constexprs `consts`; their whole SASS is reported (no hot loop to speak of)."""
    from tq_ops.triton.decode import decode_merge_kernel, query_prep_kernel

    fn = query_prep_kernel if kernel == "prep" else decode_merge_kernel
    types = {"q_ptr": "*fp16", "out_ptr": "*fp16", "raw_k_ptr": "*bf16", "raw_v_ptr": "*bf16",
             "raw_idx_ptr": "*i32", "raw_lens_ptr": "*i32", "qp_ptr": "*fp16", "q8_ptr": "*i8"}
    return compile_sm90(fn, consts, types, floats=("q_scale", "u_scale"), num_warps=warps)


def ptxas_summary(ptx: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([os.path.join(NVIDIA_BIN, "ptxas"), "-v", "--gpu-name", "sm_90a", path,
                            "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    # "Potential Performance Loss" lines name wgmma serialised by ptxas (C7510-C7515: registers,
    # calls, accumulator writes between wgmma; perf/NOTES.md, session 15)
    return [ln.strip() for ln in (r.stdout + r.stderr).splitlines()
            if "Used" in ln or "spill" in ln or "Performance Loss" in ln]


def hot_loop(cubin: bytes, whole: bool = False) -> list[str]:
    """Instructions of the longest loop (body of the longest backward branch), or of the whole
    kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    sass = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "-sass", f.name],
                          capture_output=True, text=True).stdout
    os.unlink(f.name)
    ins = [(int(m.group(1), 16), m.group(2)) for m in
           (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", ln) for ln in sass.splitlines()) if m]
    if whole:
        return [t for _, t in ins]
    index = {a: i for i, (a, _) in enumerate(ins)}
    best: list[str] = []
    for i, (a, text) in enumerate(ins):
        m = re.search(r"BRA.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in index:
            body = [t for _, t in ins[index[int(m.group(1), 16)]:i + 1]]
            if len(body) > len(best):
                best = body
    return best


def opcode(text: str) -> str:
    words = text.split()
    return words[1] if words[0].startswith("@") else words[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="split",
                    choices=("split", "encode-keys", "encode-values", "prep", "merge",
                             "prefill", "dequant"))
    ap.add_argument("--splits", type=int, default=24,
                    help="merge: the split count it merges (sets the mode and partials per step)")
    ap.add_argument("--rows", type=int, default=64, help="encode: rows per tile")
    ap.add_argument("--format", default="seed")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--warps", type=int, help="default: 1 (split), 4 (encode)")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--maxnreg", type=int, default=0)
    ap.add_argument("--slow", action="store_true", help="the portable (any-codebook) decoders in a split program")
    ap.add_argument("--table-keys", action="store_true",
                    help="split: the PRMT-table key decoders instead of the bit planes")
    ap.add_argument("--decoded", action="store_true",
                    help="prefill: the variant over a decoded prefix (paged_dequantize)")
    ap.add_argument("--block-q", type=int, default=0,
                    help="prefill: query tokens per program (default: prefill_config)")
    ap.add_argument("--smem-values", action="store_true",
                    help="split: the 3-bit value decoder whose fp16 result goes through shared "
                         "memory instead of the one over value words")
    ap.add_argument("--fp16-keys", action="store_true",
                    help="split, prep: the fp16 key planes instead of the int8 ones of the "
                         "config (DecodeConfig.int8_keys)")
    ap.add_argument("--out", default="fp16", choices=("fp16", "bf16", "fp32"),
                    help="dequant: the outputs' dtype")
    ap.add_argument("--exact16", action="store_true",
                    help="encode: the variant for declared exact fp16 matrices")
    a = ap.parse_args()
    if a.kernel in ("prep", "merge"):
        import importlib

        P = importlib.import_module("tq_ops.ops.paged_decode_attention")
        from tq_ops.triton.unpack import group_width

        dp = 8 * group_width(a.head_dim)
        if a.kernel == "prep":
            from tq_ops.triton.unpack import asm_tables, symmetric_table

            fcfg = preset(a.format, head_dim=a.head_dim)
            kt = asm_tables(a.head_dim, fcfg.key_mse_bits)
            from tq_ops.triton.decode import decode_config

            planes = fcfg.key_mse_bits == 2 and symmetric_table(kt[1], kt[2])
            int8 = (planes and a.head_dim == 128 and not a.fp16_keys
                    and decode_config("sm90", a.head_dim, fcfg.key_mse_bits).int8_keys)
            consts = dict(D=a.head_dim, DP=dp, RB=P.PREP_ROWS, JB=P.WHOLE_MATRIX_COLUMNS,
                          QJL=fcfg.use_qjl, KT0=kt[1], KT1=kt[2], PLANES=planes,
                          INT8_KEYS=int8, G=a.group,
                          GP=max(2, triton.next_power_of_2(a.group)))
            warps = a.warps or P.PREP_WARPS
        else:
            gp = max(2, triton.next_power_of_2(a.group))
            if P.merge_tiles(a.splits, dp):
                # MERGE_TILE_ROWS rows per program, as the op launches it at few splits
                consts = dict(HKV=8, G=a.group, GP=gp, D=a.head_dim, DP=dp,
                              JB=P.MERGE_TILE_COLUMNS, SC=P.MERGE_TILE_STEP, PI_FIRST=True,
                              TILE=P.MERGE_TILE_ROWS)
            else:
                step = P.merge_step(a.splits)
                consts = dict(HKV=8, G=a.group, GP=gp, D=a.head_dim, DP=dp,
                              JB=P.WHOLE_MATRIX_COLUMNS, SC=step,
                              PI_FIRST=step <= P.MERGE_PI_FIRST_MAX_STEP, TILE=0)
            warps = a.warps or P.MERGE_WARPS
        k = compile_small(a.kernel, warps, consts)
        for line in ptxas_summary(k.asm["ptx"]):
            print(line)
        print(f"shared memory: {k.metadata.shared} bytes")
        sass = hot_loop(k.asm["cubin"], whole=True)
        ops = collections.Counter(opcode(t) for t in sass)
        print(f"{len(sass)} instructions; memory: " + ", ".join(
            f"{op} {n}" for op, n in sorted(ops.items()) if op.startswith(("LD", "ST", "BAR"))))
        return 0
    if a.kernel == "dequant":
        k = compile_dequant(a.format, a.head_dim, a.block_size, a.warps or 0, a.out)
        for line in ptxas_summary(k.asm["ptx"]):
            print(line)
        print(f"shared memory: {k.metadata.shared} bytes")
        sass = hot_loop(k.asm["cubin"], whole=True)
        fam = collections.Counter(opcode(t).split(".")[0] for t in sass)
        print(f"{len(sass)} instructions per program (one tile)")
        print("  " + ", ".join(f"{op} {n}" for op, n in fam.most_common(18)))
        return 0
    if a.kernel == "prefill":
        from tq_ops.triton.prefill import prefill_config

        bq, w = prefill_config(a.head_dim, a.decoded, a.group)
        bq = a.block_q or bq
        a.warps = a.warps or w
        k = compile_prefill(a.format, a.head_dim, a.group, a.block_size, bq, a.warps,
                            a.maxnreg, a.decoded, a.stages)
        for line in ptxas_summary(k.asm["ptx"]):
            print(line)
        print(f"shared memory: {k.metadata.shared} bytes")
        # the compressed phase's tile loop is the longest loop of the kernel
        body = hot_loop(k.asm["cubin"])
        fam = collections.Counter(opcode(t).split(".")[0] for t in body)
        print(f"hot loop: {len(body)} instructions per compressed tile per warp "
              f"({len(body) * a.warps} per tile of {bq} queries x {a.group} heads)")
        print("  " + ", ".join(f"{op} {n}" for op, n in fam.most_common(16)))
        return 0
    a.warps = a.warps or (1 if a.kernel == "split" else 4)
    if a.kernel == "split":
        if not a.maxnreg:  # the table's cap, as the op launches it eagerly
            from tq_ops.triton.decode import decode_config

            a.maxnreg = decode_config("sm90", a.head_dim,
                                      preset(a.format, head_dim=a.head_dim).key_mse_bits
                                      ).max_registers
        from tq_ops.triton.decode import decode_config

        int8 = (not a.fp16_keys and not a.table_keys and a.head_dim == 128 and decode_config(
            "sm90", a.head_dim, preset(a.format, head_dim=a.head_dim).key_mse_bits).int8_keys)
        k = compile_split(a.format, a.head_dim, a.group, a.block_size, a.block_n, a.warps,
                          a.stages, a.maxnreg, not a.slow, not a.table_keys, not a.smem_values,
                          int8)
    else:
        k = compile_encode(a.format, a.head_dim, a.kernel.split("-")[1], a.rows, a.warps,
                           a.maxnreg, a.exact16)
    for line in ptxas_summary(k.asm["ptx"]):
        print(line)
    print(f"shared memory: {k.metadata.shared} bytes")
    body = hot_loop(k.asm["cubin"])
    ops = collections.Counter(opcode(t) for t in body)
    families = collections.Counter()
    for op, n in ops.items():
        families[op.split(".")[0]] += n
    if a.kernel == "split":
        print(f"hot loop: {len(body)} instructions per tile of {a.block_n} tokens per warp "
              f"({len(body) * a.warps / a.block_n:.1f} per token-head)")
    else:
        print(f"hot loop: {len(body)} instructions per tile of {a.rows} rows per warp "
              f"({len(body) * a.warps / a.rows:.1f} per (token, head) row)")
    print("  " + ", ".join(f"{op} {n}" for op, n in families.most_common(16)))
    print("  memory: " + ", ".join(f"{op} {n}" for op, n in sorted(ops.items())
                                   if op.startswith(("LD", "ST", "BAR"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
