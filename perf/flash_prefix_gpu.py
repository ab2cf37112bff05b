"""GPU check and timing of tq_vllm's FlashAttention route for the decoded prefix of a chunked
prefill (tq_vllm.attend.Flash, TQ_PREFILL_FLASH): vLLM's flash_attn_varlen_func attends the
paged_dequantize rows, paged_prefill_attention the raw pool and the chunk with that partial as
its prior.  Needs vLLM on the machine (its vllm_flash_attn); on an H100/H200 that is FA3.

    PYTHONPATH=. python perf/flash_prefix_gpu.py

Part 1, correctness (fp16 and bf16 queries; two requests in 16-token flush groups, one a fresh
prompt whose first group has no compressed position): the route against the Triton route and
against tq_ops.reference over the same decoded rows.  Part 2, timing (CUDA events, best of 5
after a warm-up; same run and card): gpu_check's two prefill shapes through prefill_varlen
either way, against flash SDPA over fp16 K/V of the same request (perf/common.py)."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as C  # noqa: E402
from gpu_check import ATT_RTOL, OUT_RTOL  # noqa: E402
from request_groups_gpu import D, DEV, build  # noqa: E402

from tq_ops import reference as R  # noqa: E402
from tq_vllm import attend, compat  # noqa: E402


def run(case, flash):
    codec, w, plan, q, k, v, cache, raw_k, raw_v = case
    out = torch.full(q.shape, float("nan"), device=DEV, dtype=q.dtype)
    attend.prefill_varlen(codec, w, plan, q, k, v, cache, raw_k, raw_v, D ** -0.5, out, flash)
    return out


def reference_decoded(case):
    """tq_ops.reference's prefill over the same fp16 decoded rows (the plan's one call)."""
    codec, w, plan, q, k, v, cache, raw_k, raw_v = case
    f = codec.config
    mats = (codec.rotation, codec.qjl_projection, codec.key_centroids, codec.value_centroids,
            f.key_mse_bits, f.use_qjl, f.value_bits)
    dk, dv = R.paged_dequantize(cache, plan.req_block_table, plan.req_lens, plan.req_offsets,
                                plan.decoded_rows, *mats, w.sink_tokens, torch.float16)
    return R.paged_prefill_attention(q, k, v, plan.cu, cache, plan.block_table, plan.prefix,
                                     raw_k, raw_v, plan.raw_index, plan.pool, *mats, D ** -0.5,
                                     w.sink_tokens, dk, dv, plan.decoded_start)


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return min(times)


def main():
    flash, which = compat.flash_varlen(D)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; flash: {which}")
    if flash is None:
        raise SystemExit("no FlashAttention: nothing to check")
    ok = True
    print("part 1: two requests (done 0 / 700, new 350 / 200), 16-token flush groups, 32/8 "
          "heads, D=128")
    for dtype in (torch.float16, torch.bfloat16):
        case = build([0, 700], [350, 200], 16, 16, dtype=dtype,
                     row_align=attend.FLASH_PAGE_ROWS)
        got, tri = run(case, flash).float(), run(case, None).float()
        ref = reference_decoded(case).float()
        scale = float(ref.abs().max())
        e_tri = float((got - tri).abs().max()) / scale
        e_ref = float((got - ref).abs().max()) / scale
        e_tri_ref = float((tri - ref).abs().max()) / scale
        # each route within ATT_RTOL of the exact softmax over the same fp16 rows, plus its
        # output rounding; the flash route also rounds its prior to fp16 (2^-11 at most)
        tol_ref = ATT_RTOL + OUT_RTOL[dtype] + 2.0 ** -11
        tol_tri = 2 * ATT_RTOL + 2 * OUT_RTOL[dtype] + 2.0 ** -11
        good = (not got.isnan().any() and e_ref <= tol_ref and e_tri <= tol_tri)
        ok &= good
        print(f"  {str(dtype):15s} flash vs reference {e_ref:.2e} (tol {tol_ref:.2e}), vs "
              f"triton {e_tri:.2e} (tol {tol_tri:.2e}); triton vs reference {e_tri_ref:.2e}  "
              f"{'ok' if good else 'FAILED'}")
        del case
    torch.cuda.empty_cache()
    print("part 2: timing, fp16, one request, page 128 (ms, best of 5)")
    print(f"  {'prefix':>7} {'chunk':>6} {'group':>5} {'sdpa':>8} {'triton':>8} {'flash':>8} "
          f"{'triton/sdpa':>11} {'flash/sdpa':>10} {'flash rel diff':>14}")
    for prefix, chunk, group in [(30720, 2048, 2048), (16384, 16384, 128)]:
        sd = C.sdpa_prefill_case(prefix, chunk)
        sd_ms = timed(sd)
        del sd
        case = build([prefix], [chunk], group, 128, row_align=attend.FLASH_PAGE_ROWS)
        tri_ms = timed(lambda: run(case, None))
        fl_ms = timed(lambda: run(case, flash))
        a, b = run(case, flash).float(), run(case, None).float()
        err = float((a - b).abs().max() / b.abs().max())
        ok &= err <= 2 * ATT_RTOL + 2 * OUT_RTOL[torch.float16] + 2.0 ** -11
        print(f"  {prefix:7d} {chunk:6d} {group:5d} {sd_ms:8.3f} {tri_ms:8.3f} {fl_ms:8.3f} "
              f"{tri_ms / sd_ms:10.2f}x {fl_ms / sd_ms:9.2f}x {err:14.2e}")
        del case
        torch.cuda.empty_cache()
    print("FLASH PREFIX " + ("OK" if ok else "FAILED"))
    return ok


if __name__ == "__main__":
    t0 = time.time()
    good = main()
    print(f"({time.time() - t0:.0f} s)")
    sys.exit(0 if good else 1)
