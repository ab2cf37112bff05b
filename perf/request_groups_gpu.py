"""GPU check of tq_vllm's request groups (tq_vllm.attend.request_groups): prefill_varlen cut into
groups over the decoded-prefix budget against one call, fp16, two requests with several flush
groups each.  PYTHONPATH=. python perf/request_groups_gpu.py (session 17; not part of gpu_check)."""
import torch
from tq_ops import TQCodec
from tq_ops.config import TQConfig
from tq_vllm import attend
from tq_vllm.window import Window, segments

torch.manual_seed(1)
dev = "cuda"
w = Window(16, 4)
cfg = TQConfig(head_dim=128, flush_interval=16, sink_tokens=4)
codec = TQCodec.build(cfg, dev)
hq, hkv, d, bs = 32, 8, 128, 16
done, new = [400, 700], [350, 200]
nblk = [-(-(a + b) // bs) for a, b in zip(done, new)]
cache = torch.zeros(sum(nblk) + 2, hkv, bs * cfg.slot_bytes, dtype=torch.uint8, device=dev)
perm = torch.randperm(sum(nblk) + 2, device=dev).to(torch.int32)
table = torch.zeros(2, max(nblk), dtype=torch.int32, device=dev)
table[0, :nblk[0]] = perm[:nblk[0]]
table[1, :nblk[1]] = perm[nblk[0]:nblk[0] + nblk[1]]
for b in range(2):
    n = done[b] + new[b]
    pos = torch.arange(n, device=dev)
    torch.ops.turboquant.write_cache(
        torch.randn(n, hkv, d, device=dev, dtype=torch.float16),
        torch.randn(n, hkv, d, device=dev, dtype=torch.float16), cache,
        table[b, pos // bs].long() * bs + pos % bs, codec.rotation, codec.qjl_projection,
        codec.key_centroids, codec.value_centroids, cfg.key_mse_bits, cfg.use_qjl, cfg.value_bits)
raw_k = torch.randn(3, w.row_slots, hkv, d, device=dev, dtype=torch.float16)
raw_v = torch.randn(3, w.row_slots, hkv, d, device=dev, dtype=torch.float16)
t = sum(new)
q, k, v = (torch.randn(t, h, d, device=dev, dtype=torch.float16) for h in (hq, hkv, hkv))
segs = (segments(w, 0, 0, done[0], done[0] + new[0])
        + segments(w, 1, new[0], done[1], done[1] + new[1]))
plan = attend.segment_plan(segs, table, torch.tensor([2, 0], dtype=torch.int32, device=dev),
                           q.device, w.sink_tokens)
rows = plan.req_rows
outs = {}
for name, budget_rows in [("one call", 1 << 20), ("each request", max(rows)),
                          ("first decoded", min(rows)), ("none decoded", 0)]:
    attend.DECODED_PREFIX_BUDGET_BYTES = budget_rows * hkv * d * 4
    out = torch.full((t, hq, d), float("nan"), device=dev, dtype=torch.float16)
    attend.prefill_varlen(codec, w, plan, q, k, v, cache, raw_k, raw_v, d ** -0.5, out)
    torch.cuda.synchronize()
    outs[name] = out.float()
    ref = outs["one call"]
    err = float((out.float() - ref).abs().max() / ref.abs().max())
    print(f"{name:14s} groups {attend.request_groups(plan, budget_rows)}  max rel diff vs one "
          f"call {err:.2e}  nan {bool(out.isnan().any())}")
