"""Valid CPU sample arguments for every torch.ops.turboquant op (opcheck, bad-input tests)."""
from __future__ import annotations

import torch

from helpers import codec
from tq_ops import TQConfig

tq = torch.ops.turboquant


def _paged(fmt, d, hkv, block_size=4, num_blocks=5, dtype=torch.float32, seed=0):
    """A small paged cache with 3 sequences written through write_cache, plus decode inputs."""
    kb, qjl, vb = fmt
    c = codec(d, kb, qjl, vb)
    g = torch.Generator().manual_seed(seed)
    sb = TQConfig(head_dim=d, key_mse_bits=kb, key_qjl_bits=int(qjl), value_bits=vb).slot_bytes
    cache = torch.zeros(num_blocks, hkv, block_size * sb, dtype=torch.uint8)
    lens = torch.tensor([5, 0, 3], dtype=torch.int32)
    table = torch.tensor([[3, 1], [0, 0], [4, 0]], dtype=torch.int32)
    slots = torch.tensor([12, 13, 14, 15, 4, -1, 16, 17, 18], dtype=torch.int32)
    k = torch.randn(9, hkv, d, generator=g).to(dtype)
    v = torch.randn(9, hkv, d, generator=g).to(dtype)
    tq.write_cache(k, v, cache, slots, c.rotation, c.qjl_projection, c.key_centroids,
                   c.value_centroids, kb, qjl, vb)
    raw_k = torch.randn(4, 2, hkv, d, generator=g).to(dtype)
    raw_v = torch.randn(4, 2, hkv, d, generator=g).to(dtype)
    return c, cache, table, lens, slots, k, v, raw_k, raw_v


def samples(op: str):
    """(args, kwargs) CPU samples for `op`; formats vary bits, QJL, GQA and dtype."""
    out = []
    for d, fmt, hq, hkv, dtype in ((64, (2, True, 3), 4, 2, torch.float32),
                                   (96, (3, False, 2), 3, 1, torch.float16)):
        kb, qjl, vb = fmt
        c = codec(d, kb, qjl, vb)
        g = torch.Generator().manual_seed(d)
        x = torch.randn(2, 5, d, generator=g).to(dtype)
        rot, proj, kc, vc = c.rotation, c.qjl_projection, c.key_centroids, c.value_centroids
        krec = tq.encode_keys(x, rot, proj, kc, kb, qjl)
        if op == "rotate" or op == "unrotate":
            out.append((x, rot))
        elif op == "mse_quantize":
            out.append((x, rot, vc, vb))
        elif op == "mse_dequantize":
            codes, norms = tq.mse_quantize(x, rot, vc, vb)
            out.append((codes, norms, rot, vc, vb))
        elif op == "qjl_sketch":
            out.append((x, proj))
        elif op == "encode_keys":
            out.append((x, rot, proj, kc, kb, qjl))
        elif op == "encode_values":
            out.append((x, rot, vc, vb))
        elif op == "key_scores":
            out.append((torch.randn(2, 3, d, generator=g).to(dtype), krec, rot, proj, kc, kb, qjl))
        elif op == "attention":
            kr = tq.encode_keys(x[0, :4, None].expand(4, hkv, d).contiguous(), rot, proj, kc, kb,
                                qjl)
            vr = tq.encode_values(x[1, :4, None].expand(4, hkv, d).contiguous(), rot, vc, vb)
            raw = lambda n: torch.randn(n, hkv, d, generator=g).to(dtype)  # noqa: E731
            out.append((torch.randn(3, hq, d, generator=g).to(dtype), kr, vr, raw(2), raw(2),
                        raw(1), raw(1), rot, proj, kc, vc, kb, qjl, vb, d ** -0.5, True))
        elif op == "write_cache":
            c_, cache, _, _, slots, k, v, _, _ = _paged(fmt, d, hkv, dtype=dtype)
            out.append((k, v, cache, slots, rot, proj, kc, vc, kb, qjl, vb))
            if d & (d - 1) == 0:   # TQCodec's matrices qualify: the vLLM backend's declaration
                out.append((k, v, cache.clone(), slots, rot, proj, kc, vc, kb, qjl, vb, True))
        elif op == "paged_decode_attention":
            _, cache, table, lens, _, _, _, raw_k, raw_v = _paged(fmt, d, hkv, dtype=dtype)
            q = torch.randn(3, hq, d, generator=g).to(dtype)
            out.append((q, cache, table, lens, raw_k, raw_v,
                        torch.tensor([2, 0, 3], dtype=torch.int32),
                        torch.tensor([1, 0, 2], dtype=torch.int32), rot, proj, kc, vc, kb, qjl,
                        vb, d ** -0.5, 1))
        elif op == "paged_prefill_attention":
            _, cache, table, lens, _, _, _, raw_k, raw_v = _paged(fmt, d, hkv, dtype=dtype)
            t = 4
            out.append((torch.randn(t, hq, d, generator=g).to(dtype),
                        torch.randn(t, hkv, d, generator=g).to(dtype),
                        torch.randn(t, hkv, d, generator=g).to(dtype),
                        torch.tensor([0, 2, 2, 4], dtype=torch.int32), cache, table, lens,
                        raw_k, raw_v, torch.tensor([2, 0, 3], dtype=torch.int32),
                        torch.tensor([1, 0, 2], dtype=torch.int32), rot, proj, kc, vc, kb, qjl,
                        vb, d ** -0.5, 1))
            # the decoded prefix: sequences 0 and 2 own rows 0..3 and 4..5 of it
            dk, dv = tq.paged_dequantize(cache, table, lens, torch.tensor([0, 4, 4],
                                         dtype=torch.int32), 6, rot, proj, kc, vc, kb, qjl, vb,
                                         1, dtype)
            out.append(out[-1][:20] + (dk, dv, torch.tensor([0, 4, 4], dtype=torch.int32)))
            # a prior partial over further keys (paged_prefill_prefix's output); in 16 bits for
            # 16-bit queries, as tq_vllm passes FlashAttention's
            po = torch.randn(t, hq, d, generator=g).to(dtype)
            pl = torch.randn(t, hq, generator=g)
            pl[0, 0] = float("-inf")  # a query with no prior key: its values are ignored
            po[0, 0] = float("nan")
            out.append(out[-1] + (po, pl))
        elif op == "paged_prefill_prefix":
            _, cache, table, lens, _, _, _, _, _ = _paged(fmt, d, hkv, dtype=dtype)
            t = 4
            base = (torch.randn(t, hq, d, generator=g).to(dtype),
                    torch.tensor([0, 2, 2, 4], dtype=torch.int32), cache, table, lens, rot, proj,
                    kc, vc, kb, qjl, vb, d ** -0.5, 1)
            out.append(base)
            dk, dv = tq.paged_dequantize(cache, table, lens, torch.tensor([0, 4, 4],
                                         dtype=torch.int32), 6, rot, proj, kc, vc, kb, qjl, vb,
                                         1, dtype)
            po = torch.randn(t, hq, d, generator=g)
            pl = torch.randn(t, hq, generator=g)
            out.append(base + (dk, dv, torch.tensor([0, 4, 4], dtype=torch.int32), po, pl))
        elif op == "paged_dequantize":
            _, cache, table, lens, _, _, _, _, _ = _paged(fmt, d, hkv, dtype=dtype)
            out.append((cache, table, lens, torch.tensor([0, 4, 4], dtype=torch.int32), 6, rot,
                        proj, kc, vc, kb, qjl, vb, 1, dtype))
        elif op == "write_raw":
            _, _, _, _, slots, k, v, raw_k, raw_v = _paged(fmt, d, hkv, dtype=dtype)
            # 9 tokens into a (4, 2) pool: distinct (row, slot) per written token; token 5 has
            # a negative paged slot (padding) and is skipped
            rows = torch.tensor([0, 0, 1, 1, 2, 0, 2, 3, 3], dtype=torch.int64)
            rslots = torch.tensor([0, 1, 0, 1, 0, 0, 1, 0, 1], dtype=torch.int64)
            out.append((k, v, raw_k.to(torch.bfloat16), raw_v.to(torch.bfloat16), rows, rslots,
                        slots))
        else:
            raise AssertionError(f"no opcheck sample for new op {op!r}: add one")
    return out
